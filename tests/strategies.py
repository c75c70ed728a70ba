"""Reusable hypothesis strategies for the .attn language.

* `modules()` (and `expressions()`, `names()`, ...): arbitrary *syntactically* valid ASTs, for the
  format/parse round trip and for fuzzing the checker. They need not type-check.
* `static_patterns()`: well-typed *static* pattern sources that pass `attnc.loads`, built from
  realistic pieces (windows, bands, sinks, blocks, congruences, head-dependent shards, calls to the
  library and to local helper patterns, lets, requires, float comparisons, optional biases), so
  that their masks are rarely all-empty or all-full. Later stages (block classification,
  kernels) reuse them as their ground-truth inputs.
* `eval_shapes()`: keyword arguments for `attnc.reference.evaluate` (n, heads, q_len, q_start).

Integer values in generated static patterns stay far below 2**62 for n up to a few thousand,
so the vectorised int64 evaluator and Python's unbounded ints agree. Mask expressions use only
exactly rounded float operations (+, -, *, /, float(), floor, ceil, min, max, abs); exp, log,
sqrt and float powers appear in biases only (compare those with a tolerance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from attnc.dsl import nodes as N
from attnc.dsl.builtins import BUILTINS, KEYWORDS, VARIABLES
from attnc.dsl.format import format_module
from hypothesis import strategies as st

# The largest integer literal (ints are 64-bit).
INT_MAX = 2**63 - 1

# Words a NAME token may not be (the grammar's keywords).
RESERVED = frozenset(KEYWORDS) | {"true", "false"}

COMPARE_OPS = ("<", "<=", ">", ">=", "==", "!=")
BINARY_OPS = ("+", "-", "*", "/", "//", "%", "**", "&", "|")
UNARY_OPS = ("-", "+", "!")

# ================================================================ syntactic ASTs

# Names that matter to the checker (variables, builtins, library patterns, types) and names that
# sit next to keywords for the lexer (prefixes/extensions of keywords, Python words).
_NAME_POOL = (
    "q", "k", "h", "n", "x", "y", "d", "size", "block", "local", "stride", "p0",
    "int", "float", "bool", "str",
    "min", "max", "abs", "log2", "floor", "ceil", "exp", "log", "sqrt", "where", "segment",
    "top_columns", "top_diagonals", "top_blocks", "gate",
    "causal", "dense", "window", "band", "sink", "streaming", "alibi", "a_shape", "dilated",
    "power", "radial", "shards", "prefix_lm", "fixed_documents", "document",
    "inx", "in_", "letter", "masks", "biased", "required", "patterns", "planet", "imports",
    "layers", "heads", "kv_heads", "layer", "head", "kv_head", "kv", "defaults", "trueish",
    "falsey", "True", "False", "None",
    "and", "or", "not", "_", "__", "_0", "e", "E", "e5", "inf", "nan",
)


def names() -> st.SearchStrategy[str]:
    """Identifiers that are not keywords: a pool of interesting ones, or random ones."""
    rand = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True)
    return st.one_of(st.sampled_from(_NAME_POOL), rand).filter(lambda s: s not in RESERVED)


def int_values() -> st.SearchStrategy[int]:
    """Integer literal values, 0..INT_MAX (negatives are Unary('-', IntLit))."""
    return st.one_of(
        st.integers(0, 16),
        st.sampled_from([32, 64, 100, 128, 1000, 1024, 4096, 2**31 - 1, 2**62, INT_MAX]),
        st.integers(0, INT_MAX),
    )


def float_values() -> st.SearchStrategy[float]:
    """Finite non-negative floats (no -0.0: it prints as `-0.0`, a Unary)."""
    anyf = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
    return st.one_of(
        st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 0.1, 1e-05, 1e16, 1.5e300, 5e-324]),
        anyf,
    ).filter(lambda v: math.copysign(1.0, v) > 0)


def strings() -> st.SearchStrategy[str]:
    """Contents of a string literal: anything but `"`, backslash and newline."""
    chars = st.characters(blacklist_characters='"\\\n', blacklist_categories=("Cs",))
    return st.one_of(st.sampled_from(["", "n must be even", "a # not a comment", "é ü ∞"]),
                     st.text(chars, max_size=24))


def _compare(children: st.SearchStrategy[N.Expr]) -> st.SearchStrategy[N.Expr]:
    def build(m: int):
        return st.builds(
            lambda ops, xs: N.Compare(tuple(xs), tuple(ops)),
            st.lists(st.sampled_from(COMPARE_OPS), min_size=m, max_size=m),
            st.lists(children, min_size=m + 1, max_size=m + 1),
        )

    return st.integers(1, 3).flatmap(build)


def _call(children: st.SearchStrategy[N.Expr], name_st=None) -> st.SearchStrategy[N.Call]:
    return st.builds(
        N.Call,
        name_st if name_st is not None else names(),
        st.lists(children, max_size=3).map(tuple),
        st.lists(st.builds(N.Keyword, names(), children), max_size=2).map(tuple),
    )


def expressions(max_leaves: int = 12) -> st.SearchStrategy[N.Expr]:
    """Every expression form of the grammar, nested arbitrarily (the printer adds parens)."""
    leaves = st.one_of(
        int_values().map(N.IntLit),
        float_values().map(N.FloatLit),
        st.booleans().map(N.BoolLit),
        names().map(N.Name),
    )

    def extend(children):
        return st.one_of(
            st.builds(N.Unary, st.sampled_from(UNARY_OPS), children),
            st.builds(N.Binary, st.sampled_from(BINARY_OPS), children, children),
            _compare(children),
            st.builds(N.In, children, children),
            _call(children),
            st.builds(N.Attr, children, st.sampled_from(["bias", "mask"])),
        )

    return st.recursive(leaves, extend, max_leaves=max_leaves)


def _opt(s):
    return st.one_of(st.none(), s)


def params() -> st.SearchStrategy[N.Param]:
    ex = expressions(max_leaves=4)
    return st.builds(
        N.Param,
        names(),
        st.one_of(st.sampled_from(["int", "float", "bool"]), names()),
        _opt(st.builds(N.Range, _opt(ex), _opt(ex))),
        _opt(ex),
    )


def statements() -> st.SearchStrategy[N.Stmt]:
    ex = expressions()
    return st.one_of(
        st.builds(N.Let, names(), ex),
        st.builds(N.Require, ex, _opt(strings())),
        st.builds(N.Mask, ex),
        st.builds(N.Bias, ex),
    )


def pattern_defs() -> st.SearchStrategy[N.PatternDef]:
    return st.builds(
        N.PatternDef,
        names(),
        st.lists(params(), max_size=4).map(tuple),
        st.lists(statements(), max_size=5).map(tuple),
    )


def _selectors() -> st.SearchStrategy[tuple[N.SelRange, ...]]:
    small = st.integers(0, 40)
    one = small.map(lambda v: N.SelRange(v, v, False))
    rng = st.builds(lambda a, b: N.SelRange(a, b, True), small, st.integers(0, 40))
    return st.lists(st.one_of(one, rng), min_size=1, max_size=3).map(tuple)


def _pattern_refs() -> st.SearchStrategy[N.Call]:
    return _call(expressions(max_leaves=4))


def _plan_entries():
    entry = st.builds(
        lambda layers, heads, kv, ref: N.PlanEntry(layers, heads, kv and heads is not None, ref),
        _opt(_selectors()),
        _opt(_selectors()),
        st.booleans(),
        _pattern_refs(),
    )
    return st.one_of(entry, st.builds(N.PlanDefault, _pattern_refs()))


def plan_defs() -> st.SearchStrategy[N.PlanDef]:
    arg_names = st.one_of(st.sampled_from(["layers", "heads", "kv_heads"]), names())
    return st.builds(
        N.PlanDef,
        names(),
        st.lists(st.builds(N.PlanArg, arg_names.filter(lambda s: s not in RESERVED),
                           st.integers(0, INT_MAX)), max_size=4).map(tuple),
        st.lists(_plan_entries(), max_size=5).map(tuple),
    )


def imports() -> st.SearchStrategy[N.Import]:
    return st.builds(N.Import, st.one_of(st.sampled_from(["lib.attn", "../x/y.attn"]),
                                         strings()))


def modules(max_items: int = 4) -> st.SearchStrategy[N.Module]:
    """Arbitrary syntactically valid modules (imports, patterns, plans); need not type-check."""
    item = st.one_of(imports(), pattern_defs(), plan_defs())
    return st.lists(item, max_size=max_items).map(lambda xs: N.Module(tuple(xs)))


# ================================================================ well-typed static patterns


class PatternSource(NamedTuple):
    """Source text defining (at least) the pattern `name`; every parameter of it has a default."""

    text: str
    name: str


@dataclass(frozen=True)
class _PSig:
    name: str
    type: str
    lo: int | float | None
    hi: int | float | None
    required: bool


@dataclass(frozen=True)
class _Sig:
    name: str
    params: tuple[_PSig, ...]
    has_bias: bool

    @property
    def bare_ok(self) -> bool:
        return not any(p.required for p in self.params)


@lru_cache(maxsize=1)
def library_signatures() -> tuple[_Sig, ...]:
    """Signatures of the static (not run-time dependent) library patterns."""
    from attnc.dsl.check import library

    out = []
    for p in library().patterns.values():
        if p.dynamic:
            continue
        ps = tuple(_PSig(x.name, x.type, x.lo, x.hi, x.required) for x in p.params)
        out.append(_Sig(p.name, ps, p.has_bias))
    return tuple(sorted(out, key=lambda s: s.name))


@dataclass
class _Var:
    type: str  # int, float, bool
    lo: int | None = None  # a known lower bound of an int (None: unknown)
    positional: bool = False  # depends on q or k (or calls a pattern)


@dataclass
class _Scope:
    vars: dict[str, _Var]
    patterns: dict[str, _Sig] = field(default_factory=dict)
    positional: bool = True  # q, k and pattern calls allowed
    bias: bool = False  # inexact float functions allowed (exp, log, sqrt, float **, .bias)

    def names(self, typ: str, min_lo: int | None = None) -> list[str]:
        out = []
        for name, v in self.vars.items():
            if v.type != typ or (v.positional and not self.positional):
                continue
            if min_lo is not None and (v.lo is None or v.lo < min_lo):
                continue
            out.append(name)
        return out

    def uniform(self) -> _Scope:
        return _Scope(self.vars, {}, positional=False, bias=False)

    def with_bias(self) -> _Scope:
        return _Scope(self.vars, self.patterns, self.positional, bias=True)

    def exact(self) -> _Scope:
        """The same names without inexact float functions (for conditions and floor/ceil)."""
        return _Scope(self.vars, self.patterns, self.positional, bias=False) if self.bias else self


_PARAM_NAMES = ("size", "width", "block", "stride", "local", "gap", "step", "span", "radius",
                "sink", "window", "dil", "offset", "period", "scale", "slope", "flag", "wide",
                "causal", "keep", "blk", "lag", "hop", "heads", "layers")
_LET_NAMES = ("d", "dist", "qb", "kb", "near", "far", "off", "lane", "t", "u", "v", "w", "r",
              "band_", "col", "diag", "phase", "g")
_HELPER_NAMES = ("local_mix", "blocky", "stripes", "helper", "lanes", "ring", "checker",
                 "diag_mix", "heady")
_SIZES = (1, 2, 3, 4, 5, 7, 8, 16, 32)
_FLOATS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 0.75, 10.0)


def _lit(v: int | float) -> N.Expr:
    if isinstance(v, float):
        return N.FloatLit(v) if v >= 0 else N.Unary("-", N.FloatLit(-v))
    return N.IntLit(v) if v >= 0 else N.Unary("-", N.IntLit(-v))


def _bin(op: str, a: N.Expr, b: N.Expr) -> N.Expr:
    return N.Binary(op, a, b)


def _cmp(*parts) -> N.Compare:
    """_cmp(a, '<', b, '<=', c) -> Compare((a, b, c), ('<', '<='))."""
    return N.Compare(tuple(parts[0::2]), tuple(parts[1::2]))


def _call_b(name: str, *args: N.Expr) -> N.Call:
    return N.Call(name, tuple(args))


Q, K, H, NN = N.Name("q"), N.Name("k"), N.Name("h"), N.Name("n")


class _Gen:
    """Random well-typed expressions; every choice is a hypothesis draw (so it shrinks)."""

    def __init__(self, draw, runtime_errors: bool):
        self.draw = draw
        self.runtime_errors = runtime_errors

    # -- primitive choices (each shrinks towards the first option / False)
    def pick(self, seq):
        return self.draw(st.sampled_from(list(seq)))

    def coin(self, p: float) -> bool:
        return self.draw(st.integers(0, 99)) >= 100 - round(100 * p)

    def weighted(self, options: list[tuple[int, str]]) -> str:
        total = sum(w for w, _ in options)
        r = self.draw(st.integers(0, total - 1))
        for w, name in options:
            if r < w:
                return name
            r -= w
        raise AssertionError

    def size_lit(self, lo: int = 1, hi: int | None = None) -> int:
        cands = [s for s in _SIZES if s >= lo and (hi is None or s <= hi)]
        if cands and self.coin(0.8):
            return self.pick(cands)
        top = lo + 40 if hi is None else hi
        return self.draw(st.integers(lo, max(lo, top)))

    # -- integers
    def int_leaf(self, sc: _Scope) -> N.Expr:
        ns = sc.names("int")
        if ns and self.coin(0.75):
            # q and k first and heavier: masks are mostly about positions.
            heavy = [x for x in ("q", "k") if x in ns]
            return N.Name(self.pick(heavy * 3 + ns))
        return N.IntLit(self.size_lit(0))

    def small_leaf(self, sc: _Scope) -> N.Expr:
        """A leaf, never a compound: the base/operand that keeps products bounded."""
        return self.int_leaf(sc)

    def affine(self, sc: _Scope) -> N.Expr:
        if not sc.positional:
            return self.int_expr(sc, 1)
        form = self.pick(["q-k", "k-q", "q+k", "lin"])
        if form == "q-k":
            return _bin("-", Q, K)
        if form == "k-q":
            return _bin("-", K, Q)
        if form == "q+k":
            return _bin("+", Q, K)
        a, b = self.draw(st.integers(-3, 3)), self.draw(st.integers(-3, 3))
        c = self.draw(st.integers(-8, 8))
        e: N.Expr = _bin("*", _lit(a), Q) if a not in (0, 1) else (Q if a == 1 else _lit(0))
        e = _bin("+", e, _bin("*", _lit(b), K)) if b else e
        return _bin("+", e, _lit(c)) if c else e

    def divisor(self, sc: _Scope) -> N.Expr:
        form = self.weighted([(6, "lit"), (2, "name"), (1, "size"), (1, "any"), (1, "neg")])
        if form == "neg":
            return N.Unary("-", N.IntLit(self.size_lit(1)))
        if form == "name":
            ns = sc.names("int", min_lo=1)
            if ns:
                return N.Name(self.pick(ns))
        if form == "size":
            return self.size(sc, 1)
        if form == "any":
            # May be zero: x // 0 == 0 and x % 0 == x (total division).
            return self.int_expr(sc, 1)
        return N.IntLit(self.size_lit(1))

    def int_expr(self, sc: _Scope, depth: int = 2) -> N.Expr:
        if depth <= 0 or self.coin(0.3):
            return self.int_leaf(sc)
        d = depth - 1
        form = self.weighted([
            (5, "add"), (3, "affine"), (3, "mul"), (4, "div"), (4, "mod"), (2, "minmax"),
            (2, "abs"), (1, "log2"), (2, "pow"), (1, "neg"), (1, "where"), (1, "floor"),
        ])
        if form == "add":
            return _bin(self.pick("+-"), self.int_expr(sc, d), self.int_expr(sc, d))
        if form == "affine":
            return self.affine(sc)
        if form == "mul":
            a, b = self.int_expr(sc, d), self.small_leaf(sc)
            return _bin("*", a, b) if self.coin(0.5) else _bin("*", b, a)
        if form in ("div", "mod"):
            # Numerators of either sign: floor division and modulo differ from truncation
            # only on negative operands.
            num = self.int_expr(sc, d) if self.coin(0.5) else self.diag(sc)
            return _bin("//" if form == "div" else "%", num, self.divisor(sc))
        if form == "minmax":
            args = [self.int_expr(sc, d) for _ in range(self.draw(st.integers(2, 3)))]
            return _call_b(self.pick(["min", "max"]), *args)
        if form == "abs":
            return _call_b("abs", self.int_expr(sc, d))
        if form == "log2":
            return _call_b("log2", self.int_expr(sc, d))
        if form == "pow":
            return self.int_pow(sc, d)
        if form == "neg":
            return N.Unary("-", self.int_expr(sc, d))
        if form == "where":
            return self.where(sc, d, lambda: self.int_expr(sc, d))
        # floor / ceil of an exactly computed float
        return _call_b(self.pick(["floor", "ceil"]), self.float_expr(sc.exact(), d))

    def int_pow(self, sc: _Scope, d: int) -> N.Expr:
        form = self.pick(["2^lit", "2^log2", "2^mod", "mod^lit", "leaf^2", "-1^e", "neg_exp",
                          "neg_exp"])
        if form == "2^lit":
            return _bin("**", N.IntLit(2), N.IntLit(self.draw(st.integers(0, 6))))
        if form == "2^log2":
            return _bin("**", N.IntLit(2), _call_b("log2", self.int_expr(sc, d)))
        if form == "2^mod":
            return _bin("**", N.IntLit(2), _bin("%", self.int_expr(sc, d), N.IntLit(6)))
        if form == "mod^lit":
            base = _bin("%", self.int_expr(sc, d), N.IntLit(8))
            return _bin("**", base, N.IntLit(self.draw(st.integers(0, 4))))
        if form == "leaf^2":
            return _bin("**", self.small_leaf(sc), N.IntLit(self.draw(st.integers(0, 2))))
        if form == "-1^e":
            return _bin("**", N.Unary("-", N.IntLit(1)), self.int_expr(sc, d))
        # A negative exponent: floor(a ** b), which is 0 unless |a| == 1.
        exp = N.Unary("-", N.IntLit(self.draw(st.integers(1, 3))))
        return _bin("**", self.int_expr(sc, d), exp)

    def size(self, sc: _Scope, lo: int | None = 1, hi: int | None = None) -> N.Expr:
        """An int expression that is always >= lo (and <= hi) for every n >= 0, h >= 0."""
        lo_ = 0 if lo is None else lo
        form = self.weighted([(8, "lit"), (2, "name"), (2, "max"), (1, "elastic"), (1, "head")])
        e: N.Expr
        if form == "name" and sc.names("int", min_lo=lo_):
            e = N.Name(self.pick(sc.names("int", min_lo=lo_)))
        elif form == "max":
            e = _call_b("max", _lit(lo_), self.int_expr(sc, 1))
        elif form == "elastic":
            e = _bin("+", _bin("//", NN, N.IntLit(self.size_lit(1))), _lit(lo_))
        elif form == "head":
            e = _bin("+", _lit(lo_), _bin("%", H, N.IntLit(self.size_lit(1))))
        else:
            return N.IntLit(self.size_lit(lo_, hi))
        if hi is not None:
            e = _call_b("min", _lit(hi), e)
        return e

    # -- floats (mask-safe ones are exactly rounded, so scalar and vectorised results agree)
    def float_leaf(self, sc: _Scope) -> N.Expr:
        ns = sc.names("float")
        if ns and self.coin(0.4):
            return N.Name(self.pick(ns))
        if self.coin(0.5):
            return _call_b("float", self.int_expr(sc, 1))
        return N.FloatLit(self.pick(_FLOATS))

    def float_expr(self, sc: _Scope, depth: int = 2) -> N.Expr:
        if depth <= 0 or self.coin(0.3):
            return self.float_leaf(sc)
        d = depth - 1
        options = [(3, "arith"), (3, "div"), (1, "minmax"), (1, "neg"), (1, "where"),
                   (1, "abs"), (2, "mixed")]
        if sc.bias:
            options += [(2, "exp"), (1, "log"), (1, "sqrt"), (1, "fpow"), (2, "attr")]
        form = self.weighted(options)
        if form == "arith":
            return _bin(self.pick("+-*"), self.float_expr(sc, d), self.float_expr(sc, d))
        if form == "mixed":
            return _bin(self.pick("+-*"), self.float_expr(sc, d), self.int_expr(sc, d))
        if form == "div":
            num = self.float_expr(sc, d) if self.coin(0.5) else self.int_expr(sc, d)
            return _bin("/", num, self.size(sc, 1))
        if form == "minmax":
            return _call_b(self.pick(["min", "max"]), self.float_expr(sc, d),
                           self.float_expr(sc, d) if self.coin(0.5) else self.int_expr(sc, d))
        if form == "neg":
            return N.Unary("-", self.float_expr(sc, d))
        if form == "where":
            return self.where(sc, d, lambda: self.float_expr(sc, d))
        if form == "abs":
            return _call_b("abs", self.float_expr(sc, d))
        if form == "exp":
            inner = _bin("/", _call_b("float", _call_b("abs", self.int_expr(sc, d))),
                         self.size(sc, 1))
            return _call_b("exp", N.Unary("-", inner))
        if form == "log":
            return _call_b("log", _bin("+", _call_b("float", _call_b("abs", self.int_expr(sc, d))),
                                       N.FloatLit(1.0)))
        if form == "sqrt":
            return _call_b("sqrt", _call_b("float", _call_b("abs", self.int_expr(sc, d))))
        if form == "fpow":
            base = N.FloatLit(self.pick([2.0, 0.5, 1.5]))
            return _bin("**", base, N.Unary("-", _call_b("float", _call_b("abs", self.int_expr(
                sc, d)))))
        # `.bias` of a pattern (0.0 when it has none)
        ref = self.pattern_ref(sc, prefer_bias=True)
        if ref is None:
            return self.float_leaf(sc)
        return N.Attr(ref, "bias")

    def where(self, sc: _Scope, d: int, branch) -> N.Expr:
        return _call_b("where", self.bool_expr(sc.exact(), min(d, 1)), branch(), branch())

    # -- booleans
    def bool_atom(self, sc: _Scope) -> N.Expr:
        options = [(2, "cmp"), (1, "chain"), (1, "head"), (1, "lit"), (1, "name"), (1, "fcmp")]
        if sc.positional:
            options += [
                (4, "window"), (3, "causal"), (2, "band"), (2, "absband"), (2, "sink"),
                (1, "prefix"), (3, "block_diag"), (1, "block_causal"), (2, "block_local"),
                (2, "dilation"), (2, "congruence"), (2, "column"), (1, "shard"), (1, "power"),
                (5, "call"),
                (1, "mask_attr"),
            ]
        form = self.weighted(options)
        if form == "window":
            d = self.diag(sc)
            return _cmp(N.IntLit(0), "<=", d, "<", self.size(sc)) if self.coin(0.6) else _cmp(
                d, "<", self.size(sc))
        if form == "causal":
            return self.pick([_cmp(K, "<=", Q), _cmp(Q, ">=", K), _cmp(K, "<", Q)])
        if form == "band":
            return _cmp(N.Unary("-", self.size(sc, 0)), "<=", self.diag(sc), "<=",
                        self.size(sc, 0))
        if form == "absband":
            return _cmp(_call_b("abs", self.diag(sc)), self.pick(["<", "<="]), self.size(sc))
        if form == "sink":
            return _cmp(K, "<", self.size(sc, 0))
        if form == "prefix":
            return _cmp(self.pick([K, Q]), self.pick(["<", ">="]), self.size(sc, 0))
        if form == "block_diag":
            b = self.size(sc)
            return _cmp(_bin("//", Q, b), "==", _bin("//", K, b))
        if form == "block_causal":
            b = self.size(sc)
            return _cmp(_bin("//", K, b), "<=", _bin("//", Q, b))
        if form == "block_local":
            b = self.size(sc)
            return _cmp(_bin("-", _bin("//", Q, b), _bin("//", K, b)), "<", self.size(sc))
        if form == "dilation":
            return _cmp(_bin("%", self.diag(sc), self.size(sc)), "==", N.IntLit(0))
        if form == "congruence":
            # Either sign of q - k: floor modulo and division differ from truncation there.
            s = self.size_lit(2)
            r = self.draw(st.integers(-s, s))
            op = self.pick(["%", "//"])
            return _cmp(_bin(op, self.diag(sc), _lit(s) if self.coin(0.8) else _lit(-s)),
                        self.pick(["==", "<", ">=", "!="]), _lit(r))
        if form == "column":
            s = self.size_lit(1)
            r = self.draw(st.integers(0, s)) if self.coin(0.8) else self.draw(st.integers(-2, 9))
            return _cmp(_bin("%", self.pick([K, Q, _bin("+", K, H)]), N.IntLit(s)),
                        self.pick(["==", "!=", "<="]), _lit(r))
        if form == "shard":
            b, s = self.size(sc), self.size(sc)
            key = _bin("+", _bin("//", K, b), _bin("*", H, self.size(sc, 0)))
            return _cmp(_bin("%", key, s), "==", N.IntLit(0))
        if form == "power":
            d = _bin("-", _bin("//", Q, self.size(sc)), _bin("//", K, self.size(sc)))
            return _cmp(d, "==", _bin("**", N.IntLit(2), _call_b("log2", d)))
        if form == "call":
            ref = self.pattern_ref(sc)
            return ref if ref is not None else _cmp(K, "<=", Q)
        if form == "mask_attr":
            ref = self.pattern_ref(sc)
            return N.Attr(ref, "mask") if ref is not None else _cmp(K, "<=", Q)
        if form == "head":
            return _cmp(_bin("%", H, N.IntLit(self.size_lit(1, 4))), self.pick(["==", "!="]),
                        N.IntLit(0)) if self.coin(0.6) else _cmp(H, "<", self.size(sc, 0))
        if form == "lit":
            return N.BoolLit(self.coin(0.5))
        if form == "name":
            ns = sc.names("bool")
            if ns:
                return N.Name(self.pick(ns))
            return N.BoolLit(True)
        if form == "fcmp":
            left = self.float_expr(sc, 1)
            right = self.float_expr(sc, 1) if self.coin(0.5) else self.int_expr(sc, 1)
            return _cmp(left, self.pick(COMPARE_OPS), right)
        if form == "chain":
            a, b, c = (self.int_expr(sc, 1) for _ in range(3))
            return _cmp(a, self.pick(["<", "<="]), b, self.pick(["<", "<=", "!="]), c)
        return _cmp(self.int_expr(sc, 2), self.pick(COMPARE_OPS), self.int_expr(sc, 2))

    def diag(self, sc: _Scope) -> N.Expr:
        if not sc.positional:
            return self.int_expr(sc, 1)
        ns = [x for x in sc.names("int") if sc.vars[x].positional]
        if ns and self.coin(0.3):
            return N.Name(self.pick(ns))
        return self.affine(sc) if self.coin(0.3) else _bin("-", Q, K)

    def bool_expr(self, sc: _Scope, depth: int = 2) -> N.Expr:
        if depth <= 0 or self.coin(0.25):
            return self.bool_atom(sc)
        d = depth - 1
        form = self.weighted([(6, "and"), (6, "or"), (2, "not"), (1, "eq"), (1, "where")])
        if form == "and":
            return _bin("&", self.bool_expr(sc, d), self.bool_expr(sc, d))
        if form == "or":
            return _bin("|", self.bool_expr(sc, d), self.bool_expr(sc, d))
        if form == "not":
            return N.Unary("!", self.bool_expr(sc, d))
        if form == "eq":
            return _cmp(self.bool_expr(sc, 0), self.pick(["==", "!="]), self.bool_expr(sc, 0))
        return self.where(sc, d, lambda: self.bool_expr(sc, 0))

    # -- pattern calls
    def pattern_ref(self, sc: _Scope, prefer_bias: bool = False) -> N.Expr | None:
        if not sc.positional or not sc.patterns:
            return None
        sigs = list(sc.patterns.values())
        lib = {s.name for s in library_signatures()}
        local = [s for s in sigs if s.name not in lib]
        if local and self.coin(0.5):
            sigs = local  # the file's own helpers: more interesting than the library
        if prefer_bias:
            sigs = [s for s in sigs if s.has_bias] * 3 + sigs
        sig = self.pick(sigs)
        if sig.bare_ok and sig.name not in sc.vars and self.coin(0.2):
            return N.Name(sig.name)
        passed = [p for p in sig.params if p.required or self.coin(0.6)]
        # Positional arguments fill a prefix of the parameters; the rest go by keyword.
        prefix = 0
        while prefix < len(sig.params) and sig.params[prefix] in passed:
            prefix += 1
        npos = self.draw(st.integers(0, prefix))
        pos = tuple(self.argument(sc, p) for p in sig.params[:npos])
        rest = [p for p in passed if p not in sig.params[:npos]]
        rest = self.draw(st.permutations(rest)) if len(rest) > 1 else rest
        kws = tuple(N.Keyword(p.name, self.argument(sc, p)) for p in rest)
        return N.Call(sig.name, pos, kws)

    def argument(self, sc: _Scope, p: _PSig) -> N.Expr:
        if p.type == "bool":
            return self.bool_expr(sc, 1) if self.coin(0.4) else N.BoolLit(self.coin(0.5))
        if p.type == "float":
            return self.float_in_range(sc, p.lo, p.hi)
        if self.runtime_errors and self.coin(0.1):
            # Not clamped: may fall out of range at some n, h, q, k; both evaluators must agree.
            # (It reads a variable: a constant out of range would be a check error.)
            var = self.pick([NN, H] + ([Q, K] if sc.positional else []))
            return _bin("-", var, N.IntLit(self.size_lit(0)))
        lo = None if p.lo is None else math.ceil(p.lo)
        hi = None if p.hi is None else math.floor(p.hi)
        return self.size(sc, lo, hi)

    def float_in_range(self, sc: _Scope, lo, hi) -> N.Expr:
        cands = [v for v in _FLOATS if (lo is None or v >= lo) and (hi is None or v <= hi)]
        if cands and self.coin(0.7):
            return N.FloatLit(self.pick(cands))
        e = self.float_expr(sc, 1)
        if lo is not None:
            e = _call_b("max", _lit(float(lo)), e)
        if hi is not None:
            e = _call_b("min", _lit(float(hi)), e)
        return e

    # -- pattern definitions
    def param_defs(self, taken: set[str], need_defaults: bool) -> list[tuple[N.Param, _PSig]]:
        out = []
        uniform = _Scope({"h": _Var("int", 0), "n": _Var("int", 0)}, positional=False)
        for _ in range(self.draw(st.integers(0, 3))):
            name = self.pick([x for x in _PARAM_NAMES if x not in taken] or ["pz"])
            if name in taken:
                break
            taken.add(name)
            typ = self.weighted([(7, "int"), (2, "bool"), (2, "float")])
            lo = hi = None
            rng = None
            if typ == "int":
                if self.coin(0.7):
                    lo = self.pick([0, 1, 1, 2])
                if self.coin(0.25):
                    hi = (lo or 0) + self.pick([4, 8, 16, 64])
            elif typ == "float" and self.coin(0.5):
                lo, hi = self.pick([(0.0, 4.0), (0, None), (0.5, 2.0), (None, 10)])
            if lo is not None or hi is not None:
                rng = N.Range(None if lo is None else _lit(lo), None if hi is None else _lit(hi))
            required = not need_defaults and self.coin(0.3)
            default = None
            if not required:
                if typ == "bool":
                    default = N.BoolLit(self.coin(0.5)) if self.coin(0.7) else _cmp(
                        _bin("%", H, N.IntLit(2)), "==", N.IntLit(0))
                elif typ == "float":
                    default = self.float_in_range(uniform, lo, hi)
                else:
                    default = self.size(uniform, lo, hi) if lo is not None else (
                        self.int_expr(uniform, 1) if hi is None and self.coin(0.3)
                        else self.size(uniform, 0, hi))
            out.append((N.Param(name, typ, rng, default),
                        _PSig(name, typ, lo, hi, required)))
            uniform.vars[name] = _Var(typ, lo if typ == "int" else None)
        return out

    def requirement(self, sc: _Scope) -> N.Require:
        u = sc.uniform()
        form = self.pick(["ge0", "abs", "max", "mod", "lit", "bool", "risky"])
        if form == "risky" and not self.runtime_errors:
            form = "ge0"
        if form == "ge0":
            ns = u.names("int", min_lo=0)
            cond: N.Expr = _cmp(N.Name(self.pick(ns)), ">=", N.IntLit(0))
        elif form == "abs":
            cond = _cmp(_call_b("abs", self.int_expr(u, 1)), ">=", N.IntLit(0))
        elif form == "max":
            a = self.int_expr(u, 1)
            cond = _cmp(_call_b("max", a, self.int_expr(u, 1)), ">=", a)
        elif form == "mod":
            a = _bin("%", self.int_expr(u, 1), N.IntLit(2))
            cond = _bin("|", _cmp(a, "==", N.IntLit(0)), _cmp(a, "==", N.IntLit(1)))
        elif form == "bool":
            bs = u.names("bool")
            b = N.Name(self.pick(bs)) if bs else N.BoolLit(True)
            cond = _bin("|", b, N.Unary("!", b))
        elif form == "risky":
            # n and h only: a failing requirement on constant arguments is a check error.
            cond = _cmp(self.pick([NN, H]), self.pick([">=", "<", "!="]),
                        N.IntLit(self.size_lit(0)))
        else:
            cond = N.BoolLit(True)
        msg = self.pick([None, "must hold", "n is too small"]) if self.coin(0.5) else None
        return N.Require(cond, msg)

    def pattern_def(self, name: str, sigs: dict[str, _Sig], main: bool) -> tuple[N.PatternDef,
                                                                                   _Sig]:
        taken = set(VARIABLES) | set(BUILTINS)
        plist = self.param_defs(taken, need_defaults=main)
        sc = _Scope({v: _Var("int", 0, v in ("q", "k")) for v in VARIABLES}, dict(sigs))
        for prm, ps in plist:
            sc.vars[prm.name] = _Var(ps.type, ps.lo if ps.type == "int" and ps.lo is not None
                                     and isinstance(ps.lo, int) else None)
        body: list[N.Stmt] = []
        nlets = self.draw(st.integers(0, 3))
        req_at = self.draw(st.integers(0, nlets)) if self.coin(0.3) else -1
        for i in range(nlets + 1):
            if i == req_at:
                body.append(self.requirement(sc))
            if i == nlets:
                break
            lname = self.pick([x for x in _LET_NAMES if x not in sc.vars and x not in sigs]
                              or ["zz"])
            if lname in sc.vars:
                continue
            kind = self.weighted([(3, "diag"), (3, "int"), (1, "uint"), (2, "bool"),
                                  (1, "float")])
            if kind == "diag":
                value, var = self.pick([
                    _bin("-", Q, K),
                    _bin("-", _bin("//", Q, self.size(sc)), _bin("//", K, self.size(sc))),
                    _call_b("abs", _bin("-", Q, K)),
                ]), _Var("int", None, True)
            elif kind == "int":
                value, var = self.int_expr(sc, 2), _Var("int", None, True)
            elif kind == "uint":
                value, var = self.size(sc.uniform(), 1), _Var("int", 1, False)
            elif kind == "bool":
                value, var = self.bool_expr(sc, 1), _Var("bool", None, True)
            else:
                value, var = self.float_expr(sc, 1), _Var("float", None, True)
            body.append(N.Let(lname, value))
            sc.vars[lname] = var
        has_mask = not self.coin(0.1)
        has_bias = not has_mask or self.coin(0.3)
        tail: list[N.Stmt] = []
        if has_mask:
            # Use what was defined (helpers, bool lets) so that it is evaluated and matters.
            parts = [self.bool_expr(sc, self.draw(st.integers(0, 2)))]
            lib = {s.name for s in library_signatures()}
            helpers = [s for s in sigs.values() if s.name not in lib]
            if helpers and self.coin(0.7):
                parts.append(self.pattern_ref(_Scope(sc.vars, {h.name: h for h in helpers})))
            bool_lets = [x for x in sc.names("bool") if x not in {p.name for p, _ in plist}]
            if bool_lets and self.coin(0.6):
                parts.append(N.Name(self.pick(bool_lets)))
            parts = self.draw(st.permutations(parts)) if len(parts) > 1 else parts
            m = parts[0]
            for part in parts[1:]:
                m = _bin(self.pick("&|"), m, part)
            if main and self.coin(0.4):
                causal = N.Name("causal") if "causal" not in sc.vars else _cmp(K, "<=", Q)
                m = _bin("&", self.pick([causal, _cmp(K, "<=", Q)]), m)
            tail.append(N.Mask(m))
        if has_bias:
            tail.append(N.Bias(self.bias_expr(sc.with_bias())))
        if len(tail) == 2 and self.coin(0.3):
            tail.reverse()
        body += tail
        node = N.PatternDef(name, tuple(p for p, _ in plist), tuple(body))
        return node, _Sig(name, tuple(s for _, s in plist), has_bias)

    def bias_expr(self, sc: _Scope) -> N.Expr:
        form = self.weighted([(3, "alibi"), (2, "where"), (1, "int"), (1, "attr"),
                              (4, "float")])
        if form == "alibi":
            slope = self.pick([
                N.FloatLit(self.pick(_FLOATS)),
                _bin("**", N.FloatLit(2.0), N.Unary("-", _call_b("float", _bin("+", H,
                                                                               N.IntLit(1))))),
            ] + [N.Name(x) for x in sc.names("float")])
            return N.Unary("-", _bin("*", slope, _call_b("float", _call_b("abs", _bin(
                "-", Q, K)))))
        if form == "where":
            return _call_b("where", self.bool_expr(sc.exact(), 1), N.FloatLit(0.0),
                           N.Unary("-", N.FloatLit(self.pick([1.0, 1e4, 0.5]))))
        if form == "int":
            return self.int_expr(sc, 2)
        if form == "attr":
            ref = self.pattern_ref(sc, prefer_bias=True)
            if ref is not None:
                return N.Attr(ref, "bias")
        return self.float_expr(sc, 2)


@st.composite
def _static_pattern(draw, runtime_errors: bool, max_helpers: int) -> PatternSource:
    g = _Gen(draw, runtime_errors)
    sigs = {s.name: s for s in library_signatures()}
    items: list[N.PatternDef] = []
    helpers = g.draw(st.integers(0, max_helpers))
    for i in range(helpers):
        name = f"{g.pick(_HELPER_NAMES)}{i}"
        node, sig = g.pattern_def(name, sigs, main=False)
        items.append(node)
        sigs[name] = sig
    main_name = g.pick(["main", "mix", "pat", "attn_mask"])
    node, _ = g.pattern_def(main_name, sigs, main=True)
    items.append(node)
    return PatternSource(format_module(N.Module(tuple(items))), main_name)


def static_patterns(*, runtime_errors: bool = False, max_helpers: int = 2
                    ) -> st.SearchStrategy[PatternSource]:
    """Well-typed static patterns: (text, name) where `name` is the pattern to evaluate.

    With runtime_errors=False every argument and default is clamped into its parameter's
    range and every `require` holds, so evaluation succeeds for all n >= 0, heads, q ranges.
    With runtime_errors=True a few arguments and requirements may fail at some sizes (evaluation
    then raises AttncError; use it to check that evaluators agree on failing).
    """
    return _static_pattern(runtime_errors, max_helpers)


@st.composite
def _arithmetic_pattern(draw) -> PatternSource:
    g = _Gen(draw, runtime_errors=False)
    plist = g.param_defs(set(VARIABLES) | set(BUILTINS), need_defaults=True)
    sc = _Scope({v: _Var("int", 0, v in ("q", "k")) for v in VARIABLES},
                {s.name: s for s in library_signatures()})
    for prm, ps in plist:
        sc.vars[prm.name] = _Var(ps.type, ps.lo if ps.type == "int" else None)
    body: list[N.Stmt] = []
    for i in range(g.draw(st.integers(0, 2))):
        name = f"t{i}"
        body.append(N.Let(name, g.int_expr(sc, 3)))
        sc.vars[name] = _Var("int", None, True)
    if g.coin(0.8):
        cond = _cmp(g.int_expr(sc, 3), g.pick(COMPARE_OPS), g.int_expr(sc, 3))
    else:
        cond = _cmp(g.float_expr(sc, 3), g.pick(COMPARE_OPS), g.float_expr(sc, 3))
    body.append(N.Mask(cond))
    if g.coin(0.3):
        body.append(N.Bias(g.float_expr(sc.with_bias(), 3)))
    node = N.PatternDef("arith", tuple(p for p, _ in plist), tuple(body))
    return PatternSource(format_module(N.Module((node,))), "arith")


def arithmetic_patterns() -> st.SearchStrategy[PatternSource]:
    """Static patterns whose mask is one comparison of deep int (or exact float) expressions:
    every operator's edge cases (negative operands, zero divisors, negative powers, log2 of
    values <= 1, promotions) reach the mask directly, unhidden by & and |."""
    return _arithmetic_pattern()


def eval_shapes(max_n: int = 40, max_heads: int = 3) -> st.SearchStrategy[dict]:
    """Keyword arguments for attnc.reference.evaluate: n, heads (a count or head indices),
    q_len <= n and sometimes q_start (queries q_start .. q_start + q_len - 1 < n)."""

    @st.composite
    def build(draw):
        edges = [b for b in (16, 17, 31, 32, 33, 40) if b <= max_n] or [max_n]
        n = draw(st.one_of(st.integers(1, min(12, max_n)), st.integers(1, max_n),
                           st.sampled_from(edges)))
        if draw(st.booleans()):
            heads: int | list[int] = draw(st.integers(1, max_heads))
        else:
            heads = sorted(draw(st.sets(st.integers(0, 7), min_size=1, max_size=max_heads)))
        q_len = draw(st.one_of(st.just(n), st.integers(1, n)))
        out = {"n": n, "heads": heads, "q_len": q_len}
        if draw(st.booleans()):
            out["q_start"] = draw(st.integers(0, n - q_len))
        return out

    return build()


__all__ = [
    "PatternSource", "RESERVED", "arithmetic_patterns", "eval_shapes", "expressions",
    "float_values", "imports",
    "int_values", "library_signatures", "modules", "names", "params", "pattern_defs",
    "plan_defs", "statements", "static_patterns", "strings",
]
