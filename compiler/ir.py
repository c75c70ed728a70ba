"""Pattern IR: frozen expression nodes, a canonical printer and a structural key (sha256)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

# Bump when the meaning of the printed IR changes, so old keys never match new IR.
IR_VERSION = "1"

INT, FLOAT, BOOL = "int", "float", "bool"

# Operators by result type. Comparisons are only lt / le / eq / ne (gt / ge are swapped).
ARITH = {"add", "sub", "mul", "div", "fdiv", "mod", "pow", "neg", "min", "max", "abs"}
CMP = {"lt", "le", "eq", "ne"}
LOGIC = {"and", "or", "not"}
FUNCS = {"log2", "floor", "ceil", "float", "exp", "log", "sqrt", "where"}
# Dynamic nodes: read run-time data through an index builder (see Sel).
SELECTORS = {"in_columns", "in_diagonals", "top_blocks", "gate", "segment"}
COMMUTATIVE = {"add", "mul", "min", "max", "and", "or", "eq", "ne"}


@dataclass(frozen=True)
class Node:
    """Base of IR expressions."""


@dataclass(frozen=True)
class Const(Node):
    value: int | float | bool = field(compare=False)
    # Equality and hashing go by type and exact spelling: True == 1 == 1.0 and 0.0 == -0.0 in
    # Python, but they are different constants in the IR (1.0 / -0.0 is -inf).
    ident: str = field(init=False, repr=False)

    def __post_init__(self):
        v = self.value
        ty = BOOL if isinstance(v, bool) else INT if isinstance(v, int) else FLOAT
        object.__setattr__(self, "ident", f"{ty}:{v!r}")

    @property
    def ty(self) -> str:
        return self.ident.split(":", 1)[0]


@dataclass(frozen=True)
class Var(Node):
    name: str  # 'q', 'k', 'h', 'n' (and 'q0', 'q1' in block-mask range expressions)


@dataclass(frozen=True)
class Op(Node):
    op: str
    args: tuple[Node, ...]


@dataclass(frozen=True)
class Sel(Node):
    """A dynamic selector: `kind` names its run-time index builder, `params` its budget
    (count, last_q, block, ...) as uniform expressions of n and h, `elem` the tested value.

    in_columns(elem; count, last_q, keep_first)  elem in the top key columns
    in_diagonals(elem; count, last_q, keep_near)  elem in the top diagonals (q - k offsets)
    top_blocks(; count, block, causal)            (q, k) in a top-scoring block
    gate(; block, topk, threshold, causal)        (q, k) in a block the learned gate keeps
    segment(elem;)                                 the run-time segment id of position elem
    """

    kind: str
    params: tuple[tuple[str, Node], ...]
    elem: Node | None = None

    def param(self, name: str) -> Node:
        return dict(self.params)[name]


TRUE, FALSE = Const(True), Const(False)


def const(v) -> Const:
    return Const(v)


def op(name: str, *args: Node) -> Op:
    return Op(name, tuple(args))


# ---------------------------------------------------------------- types


def type_of(e: Node) -> str:
    if isinstance(e, Const):
        if isinstance(e.value, bool):
            return BOOL
        return INT if isinstance(e.value, int) else FLOAT
    if isinstance(e, Var):
        return INT
    if isinstance(e, Sel):
        return INT if e.kind == "segment" else BOOL
    assert isinstance(e, Op)
    if e.op in CMP or e.op in LOGIC:
        return BOOL
    if e.op in ("div", "float", "exp", "log", "sqrt"):
        return FLOAT
    if e.op in ("fdiv", "mod", "log2", "floor", "ceil"):
        return INT
    if e.op == "where":
        t = {type_of(a) for a in e.args[1:]}
        return BOOL if t == {BOOL} else FLOAT if FLOAT in t else INT
    return FLOAT if any(type_of(a) == FLOAT for a in e.args) else INT


# ---------------------------------------------------------------- printing and keys


def _atom(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def to_text(e: Node) -> str:
    """Canonical one-line s-expression; the only input of structural keys."""
    out: list[str] = []
    stack: list[object] = [e]
    # Iterative so deep IR (long unions) cannot hit the recursion limit.
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, Const):
            out.append(_atom(x.value))
        elif isinstance(x, Var):
            out.append(x.name)
        elif isinstance(x, Op):
            stack.append(")")
            for a in reversed(x.args):
                stack.append(a)
                stack.append(" ")
            out.append("(" + x.op)
        elif isinstance(x, Sel):
            stack.append(")")
            for name, v in reversed(x.params):
                stack.append(v)
                stack.append(f" :{name} ")
            if x.elem is not None:
                stack.append(x.elem)
                stack.append(" ")
            out.append("(sel:" + x.kind)
        else:
            raise TypeError(type(x).__name__)
    return "".join(out)


def to_pretty(e: Node, width: int = 96, indent: str = "") -> str:
    """Multi-line s-expression for dumps: one argument per line where a line would be long."""
    flat = to_text(e)
    if len(indent) + len(flat) <= width or not isinstance(e, (Op, Sel)):
        return indent + flat
    inner = indent + "  "
    if isinstance(e, Op):
        parts = [to_pretty(a, width, inner) for a in e.args]
        return f"{indent}({e.op}\n" + "\n".join(parts) + ")"
    parts = []
    if e.elem is not None:
        parts.append(to_pretty(e.elem, width, inner))
    parts += [f"{inner}:{n} {to_text(v)}" for n, v in e.params]
    return f"{indent}(sel:{e.kind}\n" + "\n".join(parts) + ")"


def structural_key(*parts: str) -> str:
    """sha256 over canonical texts (never Python's hash(), pickle or sympy's printer)."""
    h = hashlib.sha256()
    h.update(f"attnc-ir-{IR_VERSION}\0".encode())
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------- traversal


def children(e: Node) -> tuple[Node, ...]:
    if isinstance(e, Op):
        return e.args
    if isinstance(e, Sel):
        kids = tuple(v for _, v in e.params)
        return ((e.elem,) if e.elem is not None else ()) + kids
    return ()


def walk(e: Node):
    stack = [e]
    while stack:
        x = stack.pop()
        yield x
        stack.extend(children(x))


def free_vars(e: Node) -> frozenset[str]:
    return frozenset(x.name for x in walk(e) if isinstance(x, Var))


def has_selector(e: Node) -> bool:
    return any(isinstance(x, Sel) for x in walk(e))


def substitute(e: Node, env: dict[str, Node]) -> Node:
    """Replace variables by expressions (memoised on node identity-equality)."""
    memo: dict[Node, Node] = {}

    def go(x: Node) -> Node:
        if x in memo:
            return memo[x]
        if isinstance(x, Var):
            r = env.get(x.name, x)
        elif isinstance(x, Op):
            r = Op(x.op, tuple(go(a) for a in x.args))
        elif isinstance(x, Sel):
            r = Sel(x.kind, tuple((n, go(v)) for n, v in x.params),
                    go(x.elem) if x.elem is not None else None)
        else:
            r = x
        memo[x] = r
        return r

    return go(e)


@dataclass(frozen=True)
class PatternIR:
    """A lowered pattern: mask and bias as IR over q, k, h, n (parameters substituted)."""

    name: str
    mask: Node
    bias: Node | None = None

    @property
    def dynamic(self) -> bool:
        return has_selector(self.mask) or (self.bias is not None and has_selector(self.bias))

    def text(self) -> str:
        bias = to_text(self.bias) if self.bias is not None else "none"
        return f"(pattern {self.name}\n  (mask {to_text(self.mask)})\n  (bias {bias}))"

    def pretty(self) -> str:
        lines = [f"pattern {self.name}", "  mask", to_pretty(self.mask, indent="    ")]
        if self.bias is not None:
            lines += ["  bias", to_pretty(self.bias, indent="    ")]
        return "\n".join(lines)

    @property
    def key(self) -> str:
        # The name is a label, not structure: equal masks compile to the same kernels.
        bias = to_text(self.bias) if self.bias is not None else "none"
        return structural_key(to_text(self.mask), bias)
