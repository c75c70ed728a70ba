"""Name resolution, type checking and static checks; loads files, imports and the library."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from . import nodes as N
from .builtins import (
    BOOL,
    BUILTINS,
    FLOAT,
    INT,
    NUMERIC,
    PARAM_TYPES,
    SET,
    VARIABLES,
    Builtin,
    promote,
)
from .errors import AttncError, Diagnostic
from .parser import parse, parse_expr

# Dependency tags of an expression: which of q, k, h, n it reads, and 'dyn' when it reads
# run-time data (scores, a learned gate, segment ids).
POSITIONAL = frozenset({"q", "k"})
# A plan's cells are enumerated when it is checked; real models have a few thousand.
MAX_PLAN_CELLS = 1 << 17
# Type of a name whose declaration was already reported; uses of it report nothing more.
ERROR = "error"


@dataclass
class ParamInfo:
    name: str
    type: str
    lo: int | float | None
    hi: int | float | None
    default: N.Expr | None
    node: N.Param = field(repr=False)

    @property
    def required(self) -> bool:
        return self.default is None

    def range_text(self) -> str:
        lo = "" if self.lo is None else _fmt_const(self.lo)
        hi = "" if self.hi is None else _fmt_const(self.hi)
        return f"{lo}..{hi}"

    def in_range(self, value) -> bool:
        return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)


@dataclass
class PatternInfo:
    name: str
    node: N.PatternDef = field(repr=False)
    module: ModuleInfo = field(repr=False)
    params: tuple[ParamInfo, ...] = ()
    dynamic: bool = False
    has_bias: bool = False
    selectors: frozenset[str] = frozenset()  # dynamic builtins used, transitively
    uniform_params: frozenset[str] = frozenset()  # params that must not depend on q or k
    callees: tuple[str, ...] = ()

    @property
    def qualname(self) -> str:
        return f"{self.module.file}:{self.name}"

    def param(self, name: str) -> ParamInfo | None:
        return next((p for p in self.params if p.name == name), None)


@dataclass
class PlanAssignment:
    """One plan entry after checking: the (layer, query head) cells it covers and its call."""

    cells: tuple[tuple[int, int], ...]
    call: N.Call
    pattern: PatternInfo
    node: N.PlanEntry | N.PlanDefault = field(repr=False)


@dataclass
class PlanInfo:
    name: str
    node: N.PlanDef = field(repr=False)
    module: ModuleInfo = field(repr=False)
    layers: int
    heads: int
    kv_heads: int
    assignments: list[PlanAssignment] = field(default_factory=list)

    def cell(self, layer: int, head: int) -> PlanAssignment:
        # A checked plan covers every cell, so a miss is an index outside the plan's shape.
        if not 0 <= layer < self.layers:
            raise AttncError(f"plan '{self.name}' has layers 0..{self.layers - 1}, not {layer}")
        if not 0 <= head < self.heads:
            raise AttncError(f"plan '{self.name}' has heads 0..{self.heads - 1}, not {head}")
        for a in self.assignments:
            if (layer, head) in a.cells:
                return a
        raise AttncError(f"plan '{self.name}' has no pattern for layer {layer} head {head}")

    def layer_heads(self, layer: int) -> list[PlanAssignment]:
        return [self.cell(layer, h) for h in range(self.heads)]


@dataclass
class ModuleInfo:
    file: str
    ast: N.Module
    scope: dict[str, PatternInfo] = field(default_factory=dict)  # every pattern visible here
    patterns: dict[str, PatternInfo] = field(default_factory=dict)  # defined here
    plans: dict[str, PlanInfo] = field(default_factory=dict)
    imports: list[ModuleInfo] = field(default_factory=list)


@dataclass
class Program:
    """A checked file with its imports and the library in scope."""

    main: ModuleInfo
    modules: list[ModuleInfo]

    @property
    def patterns(self) -> dict[str, PatternInfo]:
        return self.main.scope

    @property
    def plans(self) -> dict[str, PlanInfo]:
        return self.main.plans

    @property
    def local_patterns(self) -> dict[str, PatternInfo]:
        return self.main.patterns

    def pattern(self, name: str) -> PatternInfo:
        if name not in self.main.scope:
            raise AttncError(f"no pattern named '{name}'{_suggest(name, self.main.scope)}")
        return self.main.scope[name]

    def plan(self, name: str) -> PlanInfo:
        if name not in self.main.plans:
            raise AttncError(f"no plan named '{name}'{_suggest(name, self.main.plans)}")
        return self.main.plans[name]


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _fmt_const(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


# ---------------------------------------------------------------- constant evaluation


class NotConstant(Exception):
    pass


def int_floordiv(a: int, b: int) -> int:
    # Total on purpose (as in Lean): x // 0 == 0 and x % 0 == x, so evaluation never traps.
    return 0 if b == 0 else a // b


def int_mod(a: int, b: int) -> int:
    return a if b == 0 else a % b


def int_log2(x: int) -> int:
    return 0 if x <= 1 else x.bit_length() - 1


def int_pow(a: int, b: int) -> int:
    if b < 0:
        # floor(a ** b) for integer a and negative b: only |a| == 1 gives a non-zero value.
        if a == 1:
            return 1
        if a == -1:
            return -1 if b % 2 else 1
        if a == 0:
            return 0
        return -1 if (a < 0 and b % 2) else 0
    if abs(a) > 1 and b * (abs(a).bit_length() - 1) > 63:
        raise NotConstant("integer overflow")
    return a**b


def const_eval(e: N.Expr, env: dict[str, object]):
    """Evaluate an expression of literals and known names; raise NotConstant otherwise."""
    if isinstance(e, (N.IntLit, N.FloatLit, N.BoolLit)):
        return e.value
    if isinstance(e, N.Name):
        if e.id in env:
            return env[e.id]
        raise NotConstant(e.id)
    if isinstance(e, N.Unary):
        v = const_eval(e.operand, env)
        if e.op == "!":
            return not v
        return -v if e.op == "-" else +v
    if isinstance(e, N.Binary):
        a = const_eval(e.left, env)
        if e.op == "&" and a is False:
            return False
        if e.op == "|" and a is True:
            return True
        b = const_eval(e.right, env)
        return apply_binary(e.op, a, b)
    if isinstance(e, N.Compare):
        vals = [const_eval(o, env) for o in e.operands]
        return all(apply_compare(op, vals[i], vals[i + 1]) for i, op in enumerate(e.ops))
    if isinstance(e, N.Call) and e.func in BUILTINS and not BUILTINS[e.func].dynamic:
        args = [const_eval(a, env) for a in e.args]
        if e.kwargs:
            raise NotConstant(e.func)
        return apply_builtin(e.func, args)
    raise NotConstant(type(e).__name__)


def try_const(e: N.Expr, env: dict[str, object]):
    """const_eval that also turns arithmetic failures (overflow, complex powers, huge values)
    into NotConstant, so a check never crashes on a strange constant."""
    try:
        v = const_eval(e, env)
    except NotConstant:
        raise
    except (ArithmeticError, TypeError, ValueError, RecursionError, AttributeError,
            IndexError) as exc:
        # Ill-typed operands (reported by the type checker) or values outside int64.
        raise NotConstant(str(exc)) from exc
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        if not -(2**63) <= v < 2**63:
            raise NotConstant("integer overflow")
        return v
    if isinstance(v, float):
        return v
    raise NotConstant(type(v).__name__)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _int64(v):
    """Constant folding stays within the 64-bit ints the kernels compute with."""
    if isinstance(v, int) and not isinstance(v, bool) and not INT64_MIN <= v <= INT64_MAX:
        raise NotConstant("integer overflow")
    return v


def apply_binary(op: str, a, b):
    _int64(a)
    _int64(b)
    return _int64(_apply_binary(op, a, b))


def _apply_binary(op: str, a, b):
    if op == "&":
        return bool(a and b)
    if op == "|":
        return bool(a or b)
    both_int = isinstance(a, int) and isinstance(b, int)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b if b != 0 else math.copysign(math.inf, a) if a else math.nan
    if op == "//":
        return int_floordiv(a, b)
    if op == "%":
        return int_mod(a, b)
    if op == "**":
        if both_int:
            return int_pow(a, b)
        try:
            return float(a) ** float(b)
        except (OverflowError, ZeroDivisionError) as exc:
            raise NotConstant(op) from exc
    raise NotConstant(op)


def apply_compare(op: str, a, b) -> bool:
    return {
        "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b
    }[op]


def apply_builtin(name: str, args: list):
    if name == "min":
        return min(args)
    if name == "max":
        return max(args)
    if name == "abs":
        return abs(args[0])
    if name == "log2":
        return int_log2(args[0])
    if name == "floor":
        return math.floor(args[0])
    if name == "ceil":
        return math.ceil(args[0])
    if name == "float":
        return float(args[0])
    if name == "exp":
        return math.exp(args[0])
    if name == "log":
        if args[0] <= 0:
            raise NotConstant("log")
        return math.log(args[0])
    if name == "sqrt":
        if args[0] < 0:
            raise NotConstant("sqrt")
        return math.sqrt(args[0])
    if name == "where":
        return args[1] if args[0] else args[2]
    raise NotConstant(name)


def call_arguments(p: PatternInfo, call: N.Call | None) -> dict[str, N.Expr]:
    """The argument expression of each parameter a (checked) call passes, by name."""
    given: dict[str, N.Expr] = {}
    if call is not None:
        for prm, a in zip(p.params, call.args, strict=False):
            given[prm.name] = a
        for kw in call.kwargs:
            given[kw.name] = kw.value
    return given


def call_with_args(p: PatternInfo, args: Mapping[str, object] | None) -> N.Call:
    """A call of p with keyword arguments given as Python values, AST expressions or
    expression strings ("n // 8", as attnc.load(...).compile and --arg take them) (the API's
    and the CLI's way to pass arguments)."""
    kws = []
    for key, v in (args or {}).items():
        if p.param(key) is None:
            names = [prm.name for prm in p.params]
            raise AttncError(f"pattern '{p.name}' has no parameter '{key}' (it has "
                             f"{', '.join(names) or 'none'})")
        if isinstance(v, str):
            v = parse_expr(v, f"argument {key}")
        if isinstance(v, N.Expr):
            _check_argument_names(key, v, p.module.scope)
            expr = v
        elif isinstance(v, bool):
            expr = N.BoolLit(v)
        elif isinstance(v, int):
            expr = N.IntLit(v) if v >= 0 else N.Unary("-", N.IntLit(-v))
        elif isinstance(v, float):
            expr = N.FloatLit(v) if v >= 0 else N.Unary("-", N.FloatLit(-v))
        else:
            raise AttncError(f"argument '{key}' must be an int, float, bool or expression")
        prm = p.param(key)
        if prm.type == "int" and isinstance(v, float):
            raise AttncError(f"argument '{key}' of '{p.name}' must be an int, not {v!r}")
        kws.append(N.Keyword(key, expr))
    return N.Call(p.name, (), tuple(kws))


def _check_argument_names(key: str, e: N.Expr, scope: Mapping) -> None:
    """An API or CLI argument is evaluated with only n and h in scope (as a plan's are)."""
    for x in _walk(e):
        if isinstance(x, N.Name) and x.id not in ("n", "h"):
            known = x.id in VARIABLES or x.id in scope
            what = f"cannot use '{x.id}'" if known else f"has unknown name '{x.id}'"
            raise AttncError(Diagnostic(
                f"argument '{key}' {what}: arguments may depend on n and h only", x.span))
        if isinstance(x, N.Call) and (x.func not in BUILTINS or BUILTINS[x.func].dynamic):
            raise AttncError(Diagnostic(
                f"argument '{key}' cannot call '{x.func}': arguments may depend on n and h "
                "only", x.name_span))


# ---------------------------------------------------------------- loading


LIBRARY_FILE_PREFIX = "<library>/"


def library_dir() -> Path:
    return Path(str(resources.files("attnc.patterns")))


@lru_cache(maxsize=1)
def library() -> ModuleInfo:
    """The shipped patterns, checked together as one module (they may call each other)."""
    items: list = []
    comments: list = []
    files = sorted(p for p in library_dir().glob("*.attn"))
    for path in files:
        mod = parse(path.read_text(), LIBRARY_FILE_PREFIX + path.name)
        items.extend(i for i in mod.items if not isinstance(i, N.Import))
        comments.extend(mod.comments)
    merged = N.Module(tuple(items), tuple(comments), "<library>", "")
    checker = _Checker()
    info = checker.check_module(merged, library_scope={})
    checker.raise_if_errors()
    return info


def load(path: str | os.PathLike, *, with_library: bool = True) -> Program:
    """Parse and check a file (and what it imports); raise AttncError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise AttncError(f"cannot read '{path}': {e.strerror}") from None
    except UnicodeDecodeError:
        raise AttncError(f"'{path}' is not UTF-8 text") from None
    return loads(text, str(path), base_dir=path.parent, with_library=with_library,
                 _path=path.resolve())


def loads(
    text: str,
    file: str = "<string>",
    *,
    base_dir: str | os.PathLike | None = None,
    with_library: bool = True,
    _path: Path | None = None,
) -> Program:
    """Parse and check source text; imports resolve relative to base_dir (default: cwd)."""
    mod = parse(text, file)
    lib = library().scope if with_library else {}
    checker = _Checker(base_dir=Path(base_dir) if base_dir is not None else Path.cwd())
    if _path is not None:
        checker._loading.append(_path)  # so a cycle back to this file is reported as one
    main = checker.check_module(mod, library_scope=lib)
    checker.raise_if_errors()
    return Program(main, checker.modules)


# ---------------------------------------------------------------- the checker


@dataclass
class _Typed:
    type: str
    deps: frozenset[str]
    pattern: PatternInfo | None = None  # set when the expression is a pattern call or name


class _Checker:
    _imports_failed = False

    def __init__(self, base_dir: Path | None = None):
        self.base_dir = base_dir or Path.cwd()
        # What the pattern being checked needs; reset per body (also used by defaults/plans).
        self._cur_uniform: set[str] = set()
        self._cur_selectors: set[str] = set()
        self._instantiated: set = set()
        self.errors: list[Diagnostic] = []
        self.modules: list[ModuleInfo] = []
        self._loading: list[Path] = []  # import stack, for cycle detection
        self._loaded: dict[Path, ModuleInfo] = {}

    # -- diagnostics
    def err(self, msg: str, span: N.Span | None, notes: tuple[str, ...] = ()) -> None:
        self.errors.append(Diagnostic(msg, span, None, notes))

    def raise_if_errors(self) -> None:
        if self.errors:
            # Stable order: by file, then position; one diagnostic per distinct message+place.
            seen, uniq = set(), []
            for d in sorted(
                self.errors,
                key=lambda d: (d.span.file, d.span.line, d.span.col) if d.span else ("", 0, 0),
            ):
                key = (d.message, d.span)
                if key not in seen:
                    seen.add(key)
                    uniq.append(d)
            raise AttncError(uniq)

    # -- modules
    def check_module(self, mod: N.Module, library_scope: dict[str, PatternInfo],
                     base_dir: Path | None = None) -> ModuleInfo:
        info = ModuleInfo(mod.file, mod)
        base = base_dir or self.base_dir
        imported: dict[str, PatternInfo] = {}
        failed = False
        for item in mod.items:
            if isinstance(item, N.Import):
                sub = self._import(item, base, library_scope)
                if sub is None:
                    failed = True
                    continue
                info.imports.append(sub)
                for name, p in sub.patterns.items():
                    if name in imported and imported[name] is not p:
                        other = imported[name].node.name_span
                        self.err(
                            f"pattern '{name}' is imported twice, from '{other.file}' and "
                            f"'{p.node.name_span.file}'",
                            item.span,
                        )
                    imported[name] = p
        scope = dict(library_scope)
        scope.update(imported)
        for item in mod.items:
            if isinstance(item, N.PatternDef):
                if item.name in info.patterns:
                    first = info.patterns[item.name].node.name_span
                    self.err(
                        f"pattern '{item.name}' is already defined at {first}", item.name_span
                    )
                    continue
                if item.name in BUILTINS or item.name in VARIABLES:
                    kind = "builtin function" if item.name in BUILTINS else "builtin variable"
                    self.err(f"'{item.name}' is a {kind}; choose another name", item.name_span)
                    continue
                p = PatternInfo(item.name, item, info)
                info.patterns[item.name] = p
                scope[item.name] = p
        info.scope = scope
        # After a failed import, unknown names most likely come from it: report the import only.
        outer_failed, self._imports_failed = self._imports_failed, failed
        self._check_patterns(info)
        for item in mod.items:
            if isinstance(item, N.PlanDef):
                if item.name in info.plans:
                    first = info.plans[item.name].node.name_span
                    self.err(f"plan '{item.name}' is already defined at {first}",
                             item.name_span)
                    continue
                plan = self._check_plan(item, info)
                if plan is not None:
                    info.plans[item.name] = plan
        self._imports_failed = outer_failed
        self.modules.append(info)
        return info

    def _import(self, imp: N.Import, base: Path, library_scope) -> ModuleInfo | None:
        try:
            path = (base / imp.path).resolve()
            exists = path.is_file()
        except (OSError, ValueError) as e:
            self.err(f"cannot import '{imp.path}': {getattr(e, 'strerror', None) or e}",
                     imp.span)
            return None
        if not imp.path.endswith(".attn"):
            self.err(f"cannot import '{imp.path}': imported files must end in .attn", imp.span)
            return None
        if path in self._loading:
            chain = " -> ".join(p.name for p in self._loading[self._loading.index(path):])
            self.err(f"import cycle: {chain} -> {path.name}", imp.span)
            return None
        if path in self._loaded:
            return self._loaded[path]
        if not exists:
            rel = os.path.relpath(path)
            shown_path = str(path) if rel.startswith("..") else rel
            self.err(f"cannot import '{imp.path}': no such file (looked for {shown_path})",
                     imp.span)
            return None
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            self.err(f"cannot import '{imp.path}': {e}", imp.span)
            return None
        # Report imported files by the path the user wrote, relative to the importer.
        shown = os.path.relpath(path) if not os.path.isabs(imp.path) else str(path)
        before = len(self.errors)
        try:
            mod = parse(text, shown)
        except AttncError as e:
            self.errors.extend(e.diagnostics)
            self._note_import(before, imp)
            return None
        self._loading.append(path)
        try:
            sub = self.check_module(mod, library_scope, base_dir=path.parent)
        finally:
            self._loading.pop()
        self._note_import(before, imp)
        self._loaded[path] = sub
        return None if len(self.errors) > before else sub

    def _note_import(self, before: int, imp: N.Import) -> None:
        """Say where a file with errors was imported from."""
        note = f"in a file imported at {imp.span}"
        for i in range(before, len(self.errors)):
            d = self.errors[i]
            if note not in d.notes:
                self.errors[i] = dataclasses.replace(d, notes=d.notes + (note,))

    # -- patterns
    def _check_patterns(self, info: ModuleInfo) -> None:
        # Callees first, so each call site knows its callee's signature and uniform params.
        order = self._call_order(info)
        for p in info.patterns.values():
            self._check_signature(p)
        for p in order:
            self._check_body(p)

    def _direct_refs(self, p: PatternInfo) -> list[tuple[str, N.Span]]:
        """Names of patterns this pattern's body refers to (calls and bare names)."""
        refs: list[tuple[str, N.Span]] = []
        local = {prm.name for prm in p.node.params} | set(VARIABLES)
        for st in p.node.body:
            exprs = [st.value] if isinstance(st, N.Let) else [
                st.cond if isinstance(st, N.Require) else st.expr
            ]
            for e in exprs:
                for sub in _walk(e):
                    if isinstance(sub, N.Call) and sub.func not in BUILTINS:
                        refs.append((sub.func, sub.name_span))
                    elif isinstance(sub, N.Name) and sub.id not in local:
                        refs.append((sub.id, sub.span))
            if isinstance(st, N.Let):
                local.add(st.name)
        return refs

    def _call_order(self, info: ModuleInfo) -> list[PatternInfo]:
        order: list[PatternInfo] = []
        state: dict[str, int] = {}  # 1 visiting, 2 done
        reported: set[frozenset[str]] = set()

        def visit(p: PatternInfo, stack: list[tuple[PatternInfo, N.Span | None]]):
            state[p.name] = 1
            for name, span in self._direct_refs(p):
                callee = info.scope.get(name)
                if callee is None or callee.module is not info:
                    continue
                if state.get(name) == 1:
                    names = [s[0].name for s in stack] + [p.name]
                    cyc = names[names.index(name):] + [name]
                    key = frozenset(cyc)
                    if key not in reported:
                        reported.add(key)
                        self.err(
                            f"recursive pattern: {' -> '.join(cyc)} (a pattern cannot call "
                            "itself, directly or through others)",
                            span,
                        )
                    continue
                if state.get(name) is None:
                    visit(callee, stack + [(p, span)])
            state[p.name] = 2
            order.append(p)

        for p in info.patterns.values():
            if p.name not in state:
                visit(p, [])
        return order

    def _check_signature(self, p: PatternInfo) -> None:
        seen: set[str] = set()
        params: list[ParamInfo] = []
        for prm in p.node.params:
            if prm.name in seen:
                self.err(f"parameter '{prm.name}' is declared twice", prm.span)
                continue
            seen.add(prm.name)
            if prm.name in VARIABLES:
                self.err(
                    f"parameter '{prm.name}' would hide the builtin variable '{prm.name}'",
                    prm.span,
                )
            if prm.type not in PARAM_TYPES:
                self.err(
                    f"unknown type '{prm.type}'; parameters are int, float or bool"
                    f"{_suggest(prm.type, PARAM_TYPES)}",
                    prm.type_span,
                )
                params.append(ParamInfo(prm.name, ERROR, None, None, None, prm))
                continue
            lo = hi = None
            if prm.range is not None:
                if prm.type == BOOL:
                    self.err("a bool parameter cannot have a range", prm.range.span)
                else:
                    lo = self._const_bound(prm.range.lo, prm.type)
                    hi = self._const_bound(prm.range.hi, prm.type)
                    if lo is not None and hi is not None and lo > hi:
                        self.err(f"empty range {_fmt_const(lo)}..{_fmt_const(hi)}",
                                 prm.range.span)
                        lo = hi = None  # reported; do not also reject the default
            params.append(ParamInfo(prm.name, prm.type, lo, hi, prm.default, prm))
        p.params = tuple(params)
        # Defaults: typed like arguments; they may use n and h (elastic) and earlier params.
        env_types = dict(VARIABLES)
        for prm in params:
            if prm.default is not None:
                t = self._type(prm.default, p, env_types, {}, context="default")
                if t is not None:
                    self._check_assignable(t, prm.type, prm.default,
                                           f"default of parameter '{prm.name}'")
                    if t.deps & POSITIONAL:
                        self.err(
                            f"the default of '{prm.name}' may depend on n and h, not on "
                            f"{_dep_names(t.deps & POSITIONAL)}",
                            prm.default.span,
                        )
                    try:
                        v = try_const(prm.default, {})
                    except NotConstant:
                        v = None
                    if v is not None and not prm.in_range(v):
                        self.err(
                            f"default {_fmt_const(v)} of '{prm.name}' is out of range "
                            f"{prm.range_text()}",
                            prm.default.span,
                        )
            env_types[prm.name] = prm.type

    def _const_bound(self, e: N.Expr | None, typ: str):
        if e is None:
            return None
        try:
            v = try_const(e, {})
        except NotConstant:
            self.err("a range bound must be a constant (literals and arithmetic)", e.span)
            return None
        if isinstance(v, bool) or (typ == INT and not isinstance(v, int)):
            self.err(f"a range bound of an {typ} parameter must be an {typ}", e.span)
            return None
        if isinstance(v, float) and not math.isfinite(v):
            self.err("a range bound must be a finite number", e.span)
            return None
        return v

    def _check_body(self, p: PatternInfo) -> None:
        env: dict[str, str] = dict(VARIABLES)
        lets: dict[str, _Typed] = {}
        for prm in p.params:
            env[prm.name] = prm.type
        masks = biases = 0
        let_lines: dict[str, int] = {}
        uniform: set[str] = set()
        selectors: set[str] = set()
        self._cur_uniform = uniform
        self._cur_selectors = selectors
        dynamic = False
        for st in p.node.body:
            if isinstance(st, N.Let):
                if st.name in env or st.name in lets:
                    if st.name in VARIABLES:
                        msg = f"'{st.name}' is a builtin variable; choose another name"
                    elif p.param(st.name):
                        msg = f"'{st.name}' is already a parameter; choose another name"
                    else:
                        msg = (f"'{st.name}' is already defined at line "
                               f"{let_lines[st.name]}; choose another name")
                    self.err(msg, st.name_span if st.name_span.line else st.span)
                    continue
                let_lines[st.name] = st.span.line
                t = self._type(st.value, p, env, lets, context="let")
                if t is not None:
                    lets[st.name] = t
                    dynamic |= "dyn" in t.deps
                continue
            if isinstance(st, N.Require):
                t = self._type(st.cond, p, env, lets, context="require")
                if t is not None:
                    if t.type != BOOL:
                        self.err(f"require needs a bool condition, not {t.type}", st.cond.span)
                    if t.deps & (POSITIONAL | {"dyn"}):
                        bad = _dep_names(t.deps & POSITIONAL) or "run-time data"
                        self.err(
                            f"a requirement may depend on parameters, n and h only, not on {bad}",
                            st.cond.span,
                        )
                continue
            if isinstance(st, N.Mask):
                masks += 1
                if masks > 1:
                    self.err("a pattern has at most one mask; combine them with & or |",
                             st.span)
                t = self._type(st.expr, p, env, lets, context="mask")
                if t is not None:
                    if t.type != BOOL:
                        self.err(f"the mask must be bool, not {t.type}"
                                 + ("; compare it, e.g. `... < size`" if t.type in NUMERIC
                                    else ""), st.expr.span)
                    dynamic |= "dyn" in t.deps
                continue
            if isinstance(st, N.Bias):
                biases += 1
                if biases > 1:
                    self.err("a pattern has at most one bias; add them with +", st.span)
                t = self._type(st.expr, p, env, lets, context="bias")
                if t is not None:
                    if t.type not in NUMERIC:
                        self.err(f"the bias must be a number, not {t.type}", st.expr.span)
                    dynamic |= "dyn" in t.deps
        if masks == 0 and biases == 0:
            self.err(f"pattern '{p.name}' has neither a mask nor a bias", p.node.name_span)
        p.dynamic = dynamic
        p.has_bias = biases > 0
        p.uniform_params = frozenset(uniform)
        p.selectors = frozenset(selectors)

    # -- typing
    def _type(self, e: N.Expr, p: PatternInfo | None, env: dict[str, str],
              lets: dict[str, _Typed], context: str) -> _Typed | None:
        """Type of e (None after reporting an error); records the pattern's needs."""
        T = self._type
        if isinstance(e, N.IntLit):
            return _Typed(INT, frozenset())
        if isinstance(e, N.FloatLit):
            return _Typed(FLOAT, frozenset())
        if isinstance(e, N.BoolLit):
            return _Typed(BOOL, frozenset())
        if isinstance(e, N.Name):
            if e.id in lets:
                return lets[e.id]
            if e.id in env:
                if env[e.id] == ERROR:
                    return None
                if e.id in VARIABLES:
                    return _Typed(env[e.id], frozenset({e.id}))
                return _Typed(env[e.id], frozenset({"param:" + e.id}))
            scope = p.module.scope if p is not None else self._plan_scope
            if e.id in scope:
                callee = scope[e.id]
                missing = [prm.name for prm in callee.params if prm.required]
                if missing:
                    self.err(
                        f"pattern '{e.id}' needs {_plural('argument', missing)}: call it as "
                        f"{e.id}({', '.join(m + ' = ...' for m in missing)})",
                        e.span,
                    )
                    return None
                self._cur_selectors |= callee.selectors
                return _Typed(BOOL, self._pattern_deps(callee), callee)
            if e.id in BUILTINS:
                self.err(f"'{e.id}' is a function; call it with arguments", e.span)
                return None
            if e.id in VARIABLES:
                self.err(f"'{e.id}' cannot be used here: plan arguments may depend on n and h "
                         "only", e.span)
                return None
            names = list(lets) + list(env) + list(scope)
            if not self._imports_failed:
                self.err(f"unknown name '{e.id}'{_suggest(e.id, names)}", e.span)
            return None
        if isinstance(e, N.Unary):
            t = T(e.operand, p, env, lets, context)
            if t is None:
                return None
            if e.op == "!":
                if t.type != BOOL:
                    self.err(f"'!' needs a bool, not {t.type}", e.span)
                    return None
                return _Typed(BOOL, t.deps)
            if t.type not in NUMERIC:
                self.err(f"unary '{e.op}' needs a number, not {t.type}", e.span)
                return None
            return _Typed(t.type, t.deps)
        if isinstance(e, N.Binary):
            a = T(e.left, p, env, lets, context)
            b = T(e.right, p, env, lets, context)
            if a is None or b is None:
                return None
            deps = a.deps | b.deps
            if e.op in ("&", "|"):
                for side, t in ((e.left, a), (e.right, b)):
                    if t.type != BOOL:
                        hint = ""
                        if t.type in NUMERIC:
                            hint = "; '&' and '|' combine conditions (there are no bitwise ops)"
                        self.err(f"'{e.op}' needs bool operands, not {t.type}{hint}", side.span)
                        return None
                return _Typed(BOOL, deps)
            for side, t in ((e.left, a), (e.right, b)):
                if t.type not in NUMERIC:
                    self.err(f"'{e.op}' needs numbers, not {t.type}", side.span)
                    return None
            if e.op in ("//", "%"):
                for side, t in ((e.left, a), (e.right, b)):
                    if t.type != INT:
                        alt = "floor(a / b)" if e.op == "//" else "a - b * floor(a / b)"
                        self.err(f"'{e.op}' needs integers, not {t.type}; use {alt}", side.span)
                        return None
                if isinstance(e.right, N.IntLit) and e.right.value == 0:
                    what = "integer division" if e.op == "//" else "modulo"
                    self.err(f"{what} by zero", e.right.span)
                    return None
                return _Typed(INT, deps)
            if e.op == "/":
                # Float division at run time follows IEEE (x / 0 is +-inf); a literal zero
                # divisor is a mistake (a +inf bias would make the softmax NaN).
                if isinstance(e.right, N.IntLit | N.FloatLit) and e.right.value == 0:
                    self.err("division by zero", e.right.span)
                    return None
                return _Typed(FLOAT, deps)
            return _Typed(promote(a.type, b.type), deps)
        if isinstance(e, N.Compare):
            ts = [T(o, p, env, lets, context) for o in e.operands]
            if any(t is None for t in ts):
                return None
            deps = frozenset().union(*(t.deps for t in ts))
            for i, op in enumerate(e.ops):
                a, b = ts[i], ts[i + 1]
                ok = (a.type in NUMERIC and b.type in NUMERIC) or (
                    op in ("==", "!=") and a.type == b.type == BOOL
                )
                if not ok:
                    lo, hi = e.operands[i].span, e.operands[i + 1].span
                    span = N.Span(lo.file, lo.line, lo.col, hi.end_line, hi.end_col, lo.start,
                                  hi.end) if lo.line else e.span
                    self.err(f"cannot compare {a.type} {op} {b.type}", span)
                    return None
            return _Typed(BOOL, deps)
        if isinstance(e, N.In):
            a = T(e.element, p, env, lets, context)
            b = T(e.container, p, env, lets, context)
            if a is None or b is None:
                return None
            if a.type != INT:
                self.err(f"the left side of 'in' must be an int, not {a.type}", e.element.span)
                return None
            if b.type != SET:
                self.err(
                    f"the right side of 'in' must be a selected set (top_columns, "
                    f"top_diagonals), not {b.type}",
                    e.container.span,
                )
                return None
            return _Typed(BOOL, a.deps | b.deps)
        if isinstance(e, N.Attr):
            if e.attr not in ("bias", "mask"):
                self.err(f"unknown attribute '.{e.attr}'; a pattern has .mask and .bias",
                         e.attr_span)
                return None
            t = T(e.value, p, env, lets, context)
            if t is None:
                return None
            if t.pattern is None:
                self.err(f"'.{e.attr}' applies to a pattern call", e.span)
                return None
            return _Typed(FLOAT if e.attr == "bias" else BOOL, t.deps)
        if isinstance(e, N.Call):
            return self._type_call(e, p, env, lets, context)
        self.err(f"unsupported expression {type(e).__name__}", getattr(e, "span", None))
        return None

    def _pattern_deps(self, callee: PatternInfo) -> frozenset[str]:
        deps = {"q", "k", "h", "n"}
        if callee.dynamic:
            deps.add("dyn")
        return frozenset(deps)

    def _bind_args(self, call: N.Call, params: list[tuple[str, bool]], what: str,
                   variadic: bool = False):
        """Match positional and keyword arguments to parameters; None after an error."""
        bound: dict[str, N.Expr] = {}
        names = [n for n, _ in params]
        if variadic:
            if call.kwargs:
                self.err(f"{what} takes no keyword arguments", call.kwargs[0].span)
                return None
            if len(call.args) < 2:
                self.err(f"{what} takes at least 2 arguments, got {len(call.args)}", call.span)
                return None
            return {f"#{i}": a for i, a in enumerate(call.args)}
        if len(call.args) > len(names):
            self.err(
                f"{what} takes {_count(len(names))}, got {len(call.args)}",
                call.args[len(names)].span,
            )
            return None
        for name, a in zip(names, call.args, strict=False):
            bound[name] = a
        for kw in call.kwargs:
            if kw.name not in names:
                self.err(f"{what} has no parameter '{kw.name}'{_suggest(kw.name, names)}",
                         kw.span)
                return None
            if kw.name in bound:
                self.err(f"argument '{kw.name}' is given twice", kw.span)
                return None
            bound[kw.name] = kw.value
        missing = [n for n, required in params if required and n not in bound]
        if missing:
            hint = ", ".join(f"{m} = ..." for m in missing)
            self.err(f"{what} is missing {_plural('argument', missing)}; call it as "
                     f"{call.func}({hint})" if not call.args and not call.kwargs else
                     f"{what} is missing {_plural('argument', missing)}", call.span)
            return None
        return bound

    def _type_call(self, e: N.Call, p, env, lets, context) -> _Typed | None:
        scope = p.module.scope if p is not None else self._plan_scope
        if e.func in BUILTINS:
            return self._type_builtin(BUILTINS[e.func], e, p, env, lets, context)
        if e.func not in scope:
            if self._imports_failed:
                return None
            self.err(
                f"unknown pattern or function '{e.func}'"
                f"{_suggest(e.func, list(scope) + list(BUILTINS))}",
                e.name_span,
            )
            return None
        callee = scope[e.func]
        bound = self._bind_args(
            e, [(prm.name, prm.required) for prm in callee.params], f"pattern '{e.func}'"
        )
        if bound is None:
            return None
        deps: set[str] = set(self._pattern_deps(callee))
        self._cur_selectors |= callee.selectors
        in_range = True
        for name, a in bound.items():
            t = self._type(a, p, env, lets, context)
            if t is None:
                return None
            prm = callee.param(name)
            if prm is None:
                continue
            self._check_assignable(t, prm.type, a, f"argument '{name}' of '{e.func}'")
            in_range &= self._check_arg_range(prm, a, env if p is None else {}, f"'{e.func}'")
            if name in callee.uniform_params:
                self._require_uniform(t, a, f"argument '{name}' of '{e.func}'")
            deps |= t.deps
        consts = {}
        for name, a in bound.items():
            try:
                consts[name] = try_const(a, {})
            except NotConstant:
                pass
        if in_range:  # else the callee's own findings would repeat the range error
            self._instantiate(callee, consts, set(bound), e, [])
        return _Typed(BOOL, frozenset(deps), callee)

    def _instantiate(self, p: PatternInfo, consts: dict, given: set[str], site: N.Call,
                     stack: list) -> None:
        """Check a call's constant arguments against the callee's requirements and, through
        the callee's own calls, against the ranges and requirements further down."""
        if p in stack or len(stack) > 32:
            return
        try:
            memo = (id(p), tuple(sorted(consts.items())), tuple(sorted(given)), id(site))
        except TypeError:
            memo = None
        if memo is not None:
            if memo in self._instantiated:
                return
            self._instantiated.add(memo)
        env: dict[str, object] = {}
        for prm in p.params:
            if prm.name in consts:
                env[prm.name] = consts[prm.name]
            elif prm.default is not None and prm.name not in given:
                try:
                    env[prm.name] = try_const(prm.default, env)
                except NotConstant:
                    pass
        chain = " -> ".join([s.name for s in stack] + [p.name])

        def values() -> str:
            shown = [f"{k} = {_fmt_const(v)}" for k, v in env.items() if p.param(k)]
            return f" ({', '.join(shown)})" if shown else ""

        for st in p.node.body:
            if isinstance(st, N.Let):
                try:
                    env[st.name] = try_const(st.value, env)
                except NotConstant:
                    env.pop(st.name, None)
                expr = st.value
            elif isinstance(st, N.Require):
                try:
                    ok = try_const(st.cond, env)
                except NotConstant:
                    ok = True
                if ok is False:
                    what = st.message or "requirement fails"
                    self.err(
                        f"{what}: '{chain}' is called with{values()}",
                        site.span,
                        (f"the requirement is at {st.span}", ),
                    )
                continue
            else:
                expr = st.expr
            for sub in _walk(expr):
                if not isinstance(sub, N.Call) or sub.func in BUILTINS:
                    continue
                callee = p.module.scope.get(sub.func)
                if callee is None:
                    continue
                sub_consts: dict[str, object] = {}
                named = list(zip([x.name for x in callee.params], sub.args, strict=False))
                named += [(kw.name, kw.value) for kw in sub.kwargs]
                for name, a in named:
                    try:
                        v = try_const(a, env)
                    except NotConstant:
                        continue
                    prm = callee.param(name)
                    if (prm is not None and isinstance(v, (int, float))
                            and not isinstance(v, bool) and not prm.in_range(v)):
                        self.err(
                            f"'{chain}' is called with{values()}, which makes parameter "
                            f"'{name}' of '{callee.name}' {_fmt_const(v)}, out of range "
                            f"{prm.range_text()}",
                            site.span,
                            (f"the call is at {sub.span}",),
                        )
                    sub_consts[name] = v
                self._instantiate(callee, sub_consts, {name for name, _ in named}, site,
                                  stack + [p])

    def _type_builtin(self, b: Builtin, e: N.Call, p, env, lets, context) -> _Typed | None:
        bound = self._bind_args(
            e, [(bp.name, bp.default is None) for bp in b.params], f"{b.name}()", b.variadic
        )
        if bound is None:
            return None
        types: list[str] = []
        deps: set[str] = set()
        for name, a in bound.items():
            t = self._type(a, p, env, lets, context)
            if t is None:
                return None
            deps |= t.deps
            bp = b.params[0] if b.variadic else next(x for x in b.params if x.name == name)
            want = bp.type
            if want == "num":
                if t.type not in NUMERIC:
                    self.err(f"{b.name}() needs numbers, not {t.type}", a.span)
                    return None
            elif want == "any":
                if t.type == SET:
                    self.err(f"{b.name}() cannot take a selected set", a.span)
                    return None
                types.append(t.type)
                continue
            else:
                self._check_assignable(t, want, a, f"argument '{name}' of {b.name}()")
                if bp.lo is not None or bp.hi is not None:
                    try:
                        v = try_const(a, {})
                    except NotConstant:
                        v = None
                    if isinstance(v, (int, float)) and not (
                        (bp.lo is None or v >= bp.lo) and (bp.hi is None or v <= bp.hi)
                    ):
                        self.err(f"argument '{name}' of {b.name}() is {_fmt_const(v)}, out of "
                                 f"range {bp.lo}..", a.span)
                        return None
            if b.uniform_args:
                self._require_uniform(t, a, f"argument '{name}' of {b.name}()")
            types.append(t.type)
        if b.dynamic:
            deps.add("dyn")
            self._cur_selectors.add(b.name)
        if b.name == "where":
            ta, tb = types[1], types[2]
            if (ta == BOOL) != (tb == BOOL):
                self.err(f"where() branches must have the same kind, not {ta} and {tb}",
                         e.span)
                return None
            return _Typed(BOOL if ta == BOOL else promote(ta, tb), frozenset(deps))
        if b.result == "promote":
            res = FLOAT if FLOAT in types else INT
            return _Typed(res, frozenset(deps))
        if b.name in ("top_columns", "top_diagonals", "top_blocks", "gate", "segment"):
            deps |= {"q", "k"} if b.name in ("top_blocks", "gate") else set()
        return _Typed(b.result, frozenset(deps))

    def _require_uniform(self, t: _Typed, a: N.Expr, what: str) -> None:
        bad = t.deps & POSITIONAL
        if bad:
            self.err(f"{what} must not depend on {_dep_names(bad)} (only on parameters, n "
                     "and h)", a.span)
        if "dyn" in t.deps:
            self.err(f"{what} must not depend on run-time data", a.span)
        for d in t.deps:
            if d.startswith("param:"):
                self._cur_uniform.add(d[len("param:"):])

    def _check_assignable(self, t: _Typed, want: str, e: N.Expr, what: str) -> None:
        if t.type == want or (want == FLOAT and t.type == INT):
            return
        hint = ""
        if want == INT and t.type == FLOAT:
            hint = "; use // for integer division, or floor()/ceil()"
        self.err(f"{what} must be {want}, not {t.type}{hint}", e.span)

    def _check_arg_range(self, prm: ParamInfo, a: N.Expr, env, callee: str) -> bool:
        """False (and one error) when a constant argument is outside the parameter's range."""
        if prm.lo is None and prm.hi is None:
            return True
        try:
            v = try_const(a, {})
        except NotConstant:
            return True
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return True
        if not prm.in_range(v):
            self.err(f"parameter '{prm.name}' of {callee} is {_fmt_const(v)}, out of range "
                     f"{prm.range_text()}", a.span)
            return False
        return True

    # -- plans
    _plan_scope: dict[str, PatternInfo] = {}

    def _check_plan(self, node: N.PlanDef, info: ModuleInfo) -> PlanInfo | None:
        args: dict[str, int] = {}
        ok = True
        for a in node.args:
            if a.name not in ("layers", "heads", "kv_heads"):
                self.err(f"unknown plan argument '{a.name}'"
                         f"{_suggest(a.name, ('layers', 'heads', 'kv_heads'))} (a plan takes "
                         "layers, heads and kv_heads)", a.span)
                ok = False
            elif a.name in args:
                self.err(f"plan argument '{a.name}' is given twice", a.span)
                ok = False
            elif a.value < 1:
                self.err(f"'{a.name}' must be at least 1", a.span)
                ok = False
            else:
                args[a.name] = a.value
        for req in ("layers", "heads"):
            if req not in args and ok:
                example = ", ".join(f"{k} = {args.get(k, d)}" for k, d in
                                    (("layers", 30), ("heads", 9)))
                self.err(
                    f"plan '{node.name}' must say how many {req} the model has, e.g. "
                    f"plan {node.name}({example})",
                    node.name_span,
                )
                ok = False
        if not ok:
            return None
        layers, heads = args["layers"], args["heads"]
        kv = args.get("kv_heads", heads)
        if layers * heads > MAX_PLAN_CELLS:
            self.err(f"plan '{node.name}' has {layers} x {heads} (layer, head) cells; at most "
                     f"{MAX_PLAN_CELLS} are supported", node.name_span)
            return None
        if heads % kv:
            span = next(a.span for a in node.args if a.name == "kv_heads")
            self.err(f"heads ({heads}) must be a multiple of kv_heads ({kv})", span)
            return None
        plan = PlanInfo(node.name, node, info, layers, heads, kv)
        owner: dict[tuple[int, int], N.Span] = {}
        default: N.PlanDefault | None = None
        n_errors = len(self.errors)
        self._plan_scope = info.scope
        self._cur_uniform, self._cur_selectors = set(), set()
        for entry in node.entries:
            if isinstance(entry, N.PlanDefault):
                if default is not None:
                    self.err(f"plan '{node.name}' has two defaults", entry.span)
                    continue
                default = entry
                continue
            if entry.layers is None and entry.heads is None:
                self.err("an entry needs `layers ...` or `heads ...`; use `default:` for the "
                         "rest", entry.span)
                continue
            lsel = self._selection(entry.layers, layers, "layer")
            hsel = self._selection(entry.heads, kv if entry.kv_heads else heads,
                                   "KV head" if entry.kv_heads else "head")
            if lsel is None or hsel is None:
                continue
            if entry.kv_heads:
                g = heads // kv
                hsel = [h for j in hsel for h in range(j * g, (j + 1) * g)]
            cells = [(ly, h) for ly in lsel for h in hsel]
            clash = next((c for c in cells if c in owner), None)
            if clash is not None:
                self.err(
                    f"this entry overlaps the entry at line {owner[clash].line} (both cover "
                    f"layer {clash[0]} head {clash[1]})",
                    entry.span,
                )
                continue
            pat = self._plan_call(entry.pattern)
            for c in cells:
                owner[c] = entry.span
            if pat is not None:
                plan.assignments.append(PlanAssignment(tuple(cells), entry.pattern, pat, entry))
        rest = [(ly, h) for ly in range(layers) for h in range(heads) if (ly, h) not in owner]
        if default is not None:
            pat = self._plan_call(default.pattern)
            if pat is not None and rest:
                plan.assignments.append(PlanAssignment(tuple(rest), default.pattern, pat,
                                                       default))
        elif rest and len(self.errors) == n_errors:
            ly, h = rest[0]
            self.err(
                f"plan '{node.name}' has no pattern for layer {ly} head {h} "
                f"({len(rest)} of its {layers * heads} (layer, head) cells are uncovered); add "
                "`default: ...`",
                node.name_span,
            )
        return plan

    def _selection(self, sel, count: int, what: str) -> list[int] | None:
        if sel is None:
            return list(range(count))
        out: list[int] = []
        seen: set[int] = set()
        for r in sel:
            if r.lo > r.hi:
                self.err(f"empty range {r.lo}..{r.hi}", r.span)
                return None
            if r.hi >= count:
                self.err(f"{what} {r.hi} is out of range: the plan has {count} {what}s "
                         f"(0..{count - 1})", r.span)
                return None
            for i in range(r.lo, r.hi + 1):
                if i in seen:
                    self.err(f"{what} {i} is selected twice in this entry", r.span)
                    return None
                seen.add(i)
                out.append(i)
        return out

    def _plan_call(self, call: N.Call) -> PatternInfo | None:
        env = {"n": INT, "h": INT}
        if call.func in BUILTINS:
            self.err(f"'{call.func}' is a builtin function, not a pattern", call.name_span)
            return None
        if call.func not in self._plan_scope:
            if not self._imports_failed:
                self.err(f"unknown pattern '{call.func}'{_suggest(call.func, self._plan_scope)}",
                         call.name_span)
            return None
        # Type the call as an expression with only n and h in scope.
        t = self._type_call(call, None, env, {}, "plan")
        if t is None:
            return None
        callee = self._plan_scope[call.func]
        for a in list(call.args) + [kw.value for kw in call.kwargs]:
            ta = self._type(a, None, env, {}, "plan")
            if ta is not None and ta.deps & POSITIONAL:
                self.err("plan arguments may depend on n and h only", a.span)
        return callee


def _walk(e: N.Expr):
    """Every sub-expression of e (pre-order, iterative)."""
    stack = [e]
    while stack:
        x = stack.pop()
        yield x
        if isinstance(x, N.Unary):
            stack.append(x.operand)
        elif isinstance(x, N.Binary):
            stack += [x.right, x.left]
        elif isinstance(x, N.Compare):
            stack += reversed(x.operands)
        elif isinstance(x, N.In):
            stack += [x.container, x.element]
        elif isinstance(x, N.Call):
            stack += [kw.value for kw in reversed(x.kwargs)] + list(reversed(x.args))
        elif isinstance(x, N.Attr):
            stack.append(x.value)


def walk(e: N.Expr):
    return _walk(e)


def _dep_names(deps) -> str:
    return " or ".join(sorted(deps))


def _plural(word: str, names: list[str]) -> str:
    quoted = ", ".join(f"'{n}'" for n in names)
    return f"{word}{'s' if len(names) > 1 else ''} {quoted}"


def _count(n: int) -> str:
    return f"{n} argument{'s' if n != 1 else ''}"
