"""AST of the .attn language: frozen dataclasses whose source spans are excluded from equality."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A half-open region of one source file; lines and columns are 1-based."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int
    start: int = 0  # character offsets, for slicing the source
    end: int = 0
    # The quoted text for spans outside any file (e.g. a CLI argument); not part of identity.
    text: str | None = field(default=None, compare=False, hash=False, repr=False)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


NO_SPAN = Span("<generated>", 0, 0, 0, 0)


def _span() -> Span:
    return field(default=NO_SPAN, compare=False, repr=False, hash=False)


# ---------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Expr:
    """Base class of expressions."""


@dataclass(frozen=True)
class IntLit(Expr):
    value: int
    span: Span = _span()


@dataclass(frozen=True)
class FloatLit(Expr):
    value: float
    span: Span = _span()


@dataclass(frozen=True)
class BoolLit(Expr):
    value: bool
    span: Span = _span()


@dataclass(frozen=True)
class Name(Expr):
    id: str
    span: Span = _span()


@dataclass(frozen=True)
class Unary(Expr):
    op: str  # '-', '+', '!'
    operand: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Binary(Expr):
    op: str  # '+', '-', '*', '/', '//', '%', '**', '&', '|'
    left: Expr
    right: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Compare(Expr):
    """A comparison chain: `a < b <= c` means `a < b & b <= c` (each operand evaluated once)."""

    operands: tuple[Expr, ...]
    ops: tuple[str, ...]
    span: Span = _span()


@dataclass(frozen=True)
class In(Expr):
    """Membership of an integer in a run-time selected set: `k in top_columns(...)`."""

    element: Expr
    container: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Keyword:
    name: str
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Call(Expr):
    """A call of a pattern (its mask) or of a builtin function."""

    func: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[Keyword, ...] = ()
    span: Span = _span()
    name_span: Span = _span()


@dataclass(frozen=True)
class Attr(Expr):
    """`pattern(...).bias`: the score bias of a called pattern."""

    value: Expr
    attr: str
    span: Span = _span()
    attr_span: Span = _span()


# ---------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Range:
    """An inclusive parameter range `in lo..hi`; either end may be open."""

    lo: Expr | None
    hi: Expr | None
    span: Span = _span()


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # 'int', 'float' or 'bool'
    range: Range | None = None
    default: Expr | None = None
    span: Span = _span()
    type_span: Span = _span()


@dataclass(frozen=True)
class Stmt:
    """Base class of pattern-body statements."""


@dataclass(frozen=True)
class Let(Stmt):
    name: str
    value: Expr
    span: Span = _span()
    name_span: Span = _span()


@dataclass(frozen=True)
class Require(Stmt):
    cond: Expr
    message: str | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Mask(Stmt):
    expr: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Bias(Stmt):
    expr: Expr
    span: Span = _span()


@dataclass(frozen=True)
class PatternDef:
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    span: Span = _span()
    name_span: Span = _span()


# ---------------------------------------------------------------- plans


@dataclass(frozen=True)
class SelRange:
    """An inclusive index range `lo..hi` (or a single index when lo == hi and not ranged)."""

    lo: int
    hi: int
    ranged: bool = True
    span: Span = _span()


@dataclass(frozen=True)
class PlanEntry:
    """`layers L heads H: pattern(...)`; None means every layer / every head."""

    layers: tuple[SelRange, ...] | None
    heads: tuple[SelRange, ...] | None
    kv_heads: bool  # True when the head selector counts KV heads
    pattern: Call
    span: Span = _span()


@dataclass(frozen=True)
class PlanDefault:
    pattern: Call
    span: Span = _span()


@dataclass(frozen=True)
class PlanArg:
    name: str
    value: int
    span: Span = _span()


@dataclass(frozen=True)
class PlanDef:
    name: str
    args: tuple[PlanArg, ...]
    entries: tuple[PlanEntry | PlanDefault, ...]
    span: Span = _span()
    name_span: Span = _span()


# ---------------------------------------------------------------- files


@dataclass(frozen=True)
class Import:
    path: str
    span: Span = _span()


@dataclass(frozen=True)
class Comment:
    text: str
    span: Span = _span()


@dataclass(frozen=True)
class Module:
    items: tuple[Import | PatternDef | PlanDef, ...]
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False, hash=False)
    file: str = field(default="<string>", compare=False, repr=False, hash=False)
    source: str = field(default="", compare=False, repr=False, hash=False)
