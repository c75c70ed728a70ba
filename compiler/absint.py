"""Abstract interpretation of IR over blocks: intervals with congruences, three-valued logic.

Every variable ranges over a box (q in [q0, q1], k in [k0, k1], h and n fixed), given as numpy
arrays so one call classifies many blocks. Numbers are intervals [lo, hi] (float64, +-inf when
unbounded) refined by a congruence: every value is = r (mod g) (g = 0: the value is exactly r).
Booleans are (may_be_true, may_be_false). Each operation over-approximates, so a block is only
called FULL when every pair is kept and EMPTY when none is (soundness); it is exact whenever each
atom's expression is monotone in q and k separately, which covers the shipped patterns.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .ir import Const, Node, Op, Sel, Var

INF = np.inf
EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass
class AN:
    """An abstract number: lo <= x <= hi and x = r (mod g); g == 0 means x == r exactly."""

    lo: np.ndarray
    hi: np.ndarray
    g: np.ndarray  # int64
    r: np.ndarray  # int64


@dataclass
class AB:
    """An abstract bool: which values some pair of the block can give."""

    t: np.ndarray
    f: np.ndarray


def _arr(x, dtype) -> np.ndarray:
    return np.asarray(x, dtype=dtype)


def const_num(v: float | int) -> AN:
    if isinstance(v, float) and not float(v).is_integer():
        return AN(_arr(v, np.float64), _arr(v, np.float64), _arr(1, np.int64), _arr(0, np.int64))
    iv = int(v)
    return AN(_arr(v, np.float64), _arr(v, np.float64), _arr(0, np.int64), _arr(iv, np.int64))


def interval(lo, hi) -> AN:
    lo = _arr(lo, np.float64)
    hi = _arr(hi, np.float64)
    single = lo == hi
    g = np.where(single, 0, 1).astype(np.int64)
    r = np.where(single, lo, 0).astype(np.int64)
    return AN(lo, hi, g, r)


def _norm(g: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g = np.abs(g).astype(np.int64)
    safe = np.where(g == 0, 1, g)
    r = np.where(g == 0, r, np.mod(r, safe)).astype(np.int64)
    return g, r


def _finite_int(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x) & (np.abs(x) < 2.0**53)


def _make(lo, hi, g, r) -> AN:
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    g, r = _norm(np.asarray(g, dtype=np.int64), np.asarray(r, dtype=np.int64))
    # A one-point interval is an exact value (keeps congruences exact through sums).
    point = (lo == hi) & _finite_int(lo) & (lo == np.floor(lo))
    g = np.where(point, 0, g)
    r = np.where(point, lo, r).astype(np.int64)
    # An exact value must agree with its interval; otherwise forget the congruence.
    exact = (g == 0)
    ok = ~exact | ((lo == hi) & _finite_int(lo))
    g = np.where(ok, g, 1)
    r = np.where(ok, r, 0)
    return AN(lo, hi, g, r)


def _corners(f, a: AN, b: AN):
    with np.errstate(all="ignore"):
        c = [f(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    c = [np.nan_to_num(x, nan=0.0, posinf=INF, neginf=-INF) for x in c]
    return np.minimum.reduce(c), np.maximum.reduce(c)


def _is_const(a: AN) -> np.ndarray:
    return a.g == 0


# ---------------------------------------------------------------- arithmetic


def add(a: AN, b: AN) -> AN:
    g = np.gcd(a.g, b.g)
    return _make(a.lo + b.lo, a.hi + b.hi, g, a.r + b.r)


def sub(a: AN, b: AN) -> AN:
    g = np.gcd(a.g, b.g)
    return _make(a.lo - b.hi, a.hi - b.lo, g, a.r - b.r)


def neg(a: AN) -> AN:
    return _make(-a.hi, -a.lo, a.g, -a.r)


def mul(a: AN, b: AN) -> AN:
    lo, hi = _corners(np.multiply, a, b)
    g = np.gcd(np.gcd(a.g * b.g, a.g * b.r), b.g * a.r)
    return _make(lo, hi, g, a.r * b.r)


def fdiv(a: AN, b: AN) -> AN:
    """Floor division with x // 0 == 0."""
    pos = b.lo > 0
    negd = b.hi < 0
    with np.errstate(all="ignore"):
        lo, hi = _corners(np.divide, a, b)
    lo, hi = np.floor(lo), np.floor(hi)
    nonzero = pos | negd
    lo = np.where(nonzero, lo, -INF)
    hi = np.where(nonzero, hi, INF)
    zero_div = _is_const(b) & (b.r == 0)  # x // 0 == 0
    lo = np.where(zero_div, 0.0, lo)
    hi = np.where(zero_div, 0.0, hi)
    # Exact divisor c > 0 with g % c == 0: (r + g i) // c = r // c + (g / c) i.
    c = np.where(_is_const(b) & (b.r > 0), b.r, 1)
    div_ok = _is_const(b) & (b.r > 0) & (a.g > 0) & (np.mod(a.g, c) == 0)
    both_const = _is_const(a) & _is_const(b)
    safe_b = np.where(b.r == 0, 1, b.r)
    cval = np.where(b.r == 0, 0, np.floor_divide(a.r, safe_b))
    g = np.where(both_const | zero_div, 0, np.where(div_ok, a.g // c, 1))
    r = np.where(both_const, cval, np.where(div_ok, np.floor_divide(a.r, c), 0))
    r = np.where(zero_div, 0, r)
    lo = np.where(both_const, cval, lo)
    hi = np.where(both_const, cval, hi)
    return _make(lo, hi, g, r)


def mod(a: AN, b: AN) -> AN:
    """x % m with the sign of m, and x % 0 == x."""
    m_const = _is_const(b) & (b.r > 0)
    m = np.where(m_const, b.r, 1).astype(np.int64)
    g_in = np.gcd(a.g, m)  # values of x % m are = r (mod gcd(g, m))
    mf = m.astype(np.float64)
    with np.errstate(all="ignore"):
        same_period = np.isfinite(a.lo) & np.isfinite(a.hi) & (
            np.floor(a.lo / mf) == np.floor(a.hi / mf))
        lo_p = np.where(same_period, a.lo - np.floor(a.lo / mf) * mf, 0.0)
        hi_p = np.where(same_period, a.hi - np.floor(a.lo / mf) * mf, mf - 1)
    # Congruence pins the residue: x = r (mod g) with m | g gives x % m = r % m.
    pinned = m_const & (a.g > 0) & (np.mod(a.g, m) == 0)
    exact_a = _is_const(a) & m_const
    pin_val = np.mod(a.r, m)
    lo_c = np.where(pinned | exact_a, pin_val, lo_p)
    hi_c = np.where(pinned | exact_a, pin_val, hi_p)
    g_c = np.where(pinned | exact_a, 0, g_in)
    r_c = np.where(pinned | exact_a, pin_val, a.r)
    # Unknown or non-positive divisors: sound hulls.
    pos = b.lo > 0
    negd = b.hi < 0
    lo_g = np.where(pos, np.where(a.lo >= 0, 0.0, 0.0), np.where(negd, b.lo + 1, -INF))
    hi_g = np.where(pos, np.where(a.lo >= 0, np.minimum(b.hi - 1, a.hi), b.hi - 1),
                    np.where(negd, 0.0, INF))
    has_zero = ~pos & ~negd
    lo_g = np.where(has_zero, np.minimum(np.minimum(a.lo, b.lo + 1), 0), lo_g)
    hi_g = np.where(has_zero, np.maximum(np.maximum(a.hi, b.hi - 1), 0), hi_g)
    lo = np.where(m_const, lo_c, lo_g)
    hi = np.where(m_const, hi_c, hi_g)
    g = np.where(m_const, g_c, 1)
    r = np.where(m_const, r_c, 0)
    return _make(lo, hi, g, r)


def _pow_scalar(x: float, y: float) -> float:
    try:
        return float(x) ** float(y)
    except OverflowError:
        return INF


def power(a: AN, b: AN, ints: bool) -> AN:
    """a ** b: monotone cases exactly, everything else by a sound hull."""
    with np.errstate(all="ignore"):
        mono = (a.lo >= 1) & (b.lo >= 0)  # increasing in both
        lo = np.power(np.maximum(a.lo, 1), np.maximum(b.lo, 0))
        hi = np.power(a.hi, b.hi)
        zero_base = (a.lo >= 0) & (b.lo >= 0)  # base in [0, inf), exp >= 0
        hi0 = np.maximum(np.power(np.maximum(a.hi, 0), b.hi), 1.0)
    lo = np.where(mono, lo, np.where(zero_base, 0.0, -INF))
    hi = np.where(mono, hi, np.where(zero_base, hi0, INF))
    if ints:
        # Negative integer exponents give floor(a ** b), always in [-1, 1].
        negexp = b.hi < 0
        lo = np.where(negexp, -1.0, lo)
        hi = np.where(negexp, 1.0, hi)
    hi = np.nan_to_num(hi, nan=INF, posinf=INF)
    both = _is_const(a) & _is_const(b)
    g = np.where(both, 0, 1)
    r = np.zeros_like(g)
    if np.any(both):
        vals = np.vectorize(lambda x, y: _int_pow(int(x), int(y)) if ints else 0,
                            otypes=[np.float64])(a.r, b.r)
        lo = np.where(both & ints, vals, lo)
        hi = np.where(both & ints, vals, hi)
        r = np.where(both & ints & _finite_int(vals), vals, 0).astype(np.int64)
        g = np.where(both & ints & _finite_int(vals), 0, 1)
    return _make(lo, hi, g, r)


def _int_pow(a: int, b: int) -> float:
    from attnc.dsl.check import int_pow

    if b > 62 and abs(a) > 1:
        return INF
    return float(int_pow(a, b))


def monotone(f, a: AN, integer: bool) -> AN:
    with np.errstate(all="ignore"):
        lo, hi = f(a.lo), f(a.hi)
    lo = np.nan_to_num(lo, nan=-INF, posinf=INF, neginf=-INF)
    hi = np.nan_to_num(hi, nan=INF, posinf=INF, neginf=-INF)
    if integer:
        single = (lo == hi) & _finite_int(lo)
        return _make(lo, hi, np.where(single, 0, 1), np.where(single, lo, 0))
    return _make(lo, hi, np.ones_like(a.g), np.zeros_like(a.r))


def ilog2(x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        y = np.floor(np.log2(np.maximum(x, 1)))
    return np.where(np.isfinite(x), y, np.where(x > 0, INF, 0.0))


def hull(a: AN, b: AN) -> AN:
    same = (a.g == 0) & (b.g == 0) & (a.r == b.r)
    g = np.where(same, 0, np.gcd(np.gcd(a.g, b.g), a.r - b.r))
    return _make(np.minimum(a.lo, b.lo), np.maximum(a.hi, b.hi), g, a.r)


def absval(a: AN) -> AN:
    lo = np.where(a.lo >= 0, a.lo, np.where(a.hi <= 0, -a.hi, 0.0))
    hi = np.maximum(np.abs(a.lo), np.abs(a.hi))
    g = np.where(a.g == 0, 0, a.g)
    r = np.where(a.g == 0, np.abs(a.r), np.where(a.lo >= 0, a.r, np.where(a.hi <= 0, -a.r,
                                                                            a.r)))
    # A sign change breaks the congruence unless r = 0 or 2r = 0 (mod g).
    mixed = (a.lo < 0) & (a.hi > 0) & (a.g != 0)
    keeps = np.mod(2 * a.r, np.where(a.g == 0, 1, a.g)) == 0
    g = np.where(mixed & ~keeps, 1, g)
    return _make(lo, hi, g, r)


# ---------------------------------------------------------------- comparisons


def compare(opname: str, a: AN, b: AN) -> AB:
    d = sub(a, b)
    zero_possible = (d.lo <= 0) & (d.hi >= 0) & np.where(
        d.g == 0, d.r == 0, np.mod(d.r, np.where(d.g == 0, 1, d.g)) == 0)
    only_zero = (d.lo == 0) & (d.hi == 0)
    if opname == "lt":
        return AB(d.lo < 0, d.hi >= 0)
    if opname == "le":
        return AB(d.lo <= 0, d.hi > 0)
    if opname == "eq":
        return AB(zero_possible, ~only_zero)
    if opname == "ne":
        return AB(~only_zero, zero_possible)
    raise AssertionError(opname)


# ---------------------------------------------------------------- evaluation


class Evaluator:
    """Evaluate IR over boxes of (q, k) with fixed h and n; vectorised over the boxes."""

    def __init__(self, q0, q1, k0, k1, h: int, n: int):
        self.env = {"q": interval(q0, q1), "k": interval(k0, k1), "h": const_num(h),
                    "n": const_num(n)}
        self.memo: dict[Node, AN | AB] = {}

    def eval(self, e: Node):
        if e in self.memo:
            return self.memo[e]
        v = self._eval(e)
        self.memo[e] = v
        return v

    def _eval(self, e: Node):
        if isinstance(e, Const):
            if isinstance(e.value, bool):
                return AB(_arr(e.value, bool), _arr(not e.value, bool))
            return const_num(e.value)
        if isinstance(e, Var):
            return self.env[e.name]
        if isinstance(e, Sel):
            if e.kind == "segment":
                return interval(-INF, INF)
            # Run-time selection: the static part of the pattern still decides the block.
            return AB(_arr(True, bool), _arr(True, bool))
        assert isinstance(e, Op)
        o = e.op
        if o in ("and", "or"):
            vals = [self.eval(a) for a in e.args]
            ts = [v.t for v in vals]
            fs = [v.f for v in vals]
            # Pairwise, so operands of different shapes (a scalar guard next to a per-block
            # atom) broadcast.
            land = functools.partial(functools.reduce, np.logical_and)
            lor = functools.partial(functools.reduce, np.logical_or)
            if o == "and":
                return AB(land(ts), lor(fs))
            return AB(lor(ts), land(fs))
        if o == "not":
            v = self.eval(e.args[0])
            return AB(v.f, v.t)
        if o in ("lt", "le", "eq", "ne"):
            a, b = self.eval(e.args[0]), self.eval(e.args[1])
            if isinstance(a, AB):
                # bool == bool
                both_t = a.t & b.t
                both_f = a.f & b.f
                differ = (a.t & b.f) | (a.f & b.t)
                same = both_t | both_f
                return AB(same, differ) if o == "eq" else AB(differ, same)
            return compare(o, a, b)
        if o == "where":
            c = self.eval(e.args[0])
            a, b = self.eval(e.args[1]), self.eval(e.args[2])
            if isinstance(a, AB):
                t = (c.t & a.t) | (c.f & b.t)
                f = (c.t & a.f) | (c.f & b.f)
                return AB(t, f)
            h = hull(a, b)
            only_a = c.t & ~c.f
            only_b = c.f & ~c.t
            lo = np.where(only_a, a.lo, np.where(only_b, b.lo, h.lo))
            hi = np.where(only_a, a.hi, np.where(only_b, b.hi, h.hi))
            g = np.where(only_a, a.g, np.where(only_b, b.g, h.g))
            r = np.where(only_a, a.r, np.where(only_b, b.r, h.r))
            return _make(lo, hi, g, r)
        args = [self.eval(a) for a in e.args]
        if o == "add":
            return add(*args)
        if o == "sub":
            return sub(*args)
        if o == "mul":
            return mul(*args)
        if o == "neg":
            return neg(args[0])
        if o == "fdiv":
            return fdiv(*args)
        if o == "mod":
            return mod(*args)
        if o == "div":
            lo, hi = _corners(np.divide, args[0], args[1])
            zero = (args[1].lo <= 0) & (args[1].hi >= 0)
            return _make(np.where(zero, -INF, lo), np.where(zero, INF, hi), 1, 0)
        if o == "pow":
            from .ir import INT, type_of

            ints = all(type_of(a) == INT for a in e.args)
            return power(args[0], args[1], ints)
        if o in ("min", "max"):
            f = np.minimum if o == "min" else np.maximum
            out = args[0]
            for b in args[1:]:
                both = (out.g == 0) & (b.g == 0)
                lo, hi = f(out.lo, b.lo), f(out.hi, b.hi)
                out = _make(lo, hi, np.where(both, 0, 1), np.where(both, f(out.r, b.r), 0))
            return out
        if o == "abs":
            return absval(args[0])
        if o == "log2":
            return monotone(ilog2, args[0], True)
        if o == "floor":
            return monotone(np.floor, args[0], True)
        if o == "ceil":
            return monotone(np.ceil, args[0], True)
        if o == "float":
            return args[0]
        if o == "exp":
            return monotone(np.exp, args[0], False)
        if o == "sqrt":
            return monotone(lambda x: np.sqrt(np.maximum(x, 0)), args[0], False)
        if o == "log":
            return monotone(lambda x: np.log(np.maximum(x, 0)), args[0], False)
        raise AssertionError(o)


def classify(mask: Node, q0, q1, k0, k1, h: int, n: int) -> np.ndarray:
    """EMPTY / PARTIAL / FULL for each box (q0..q1 x k0..k1, inclusive, within the valid
    pairs); boxes that the caller knows hold padding must be demoted from FULL by the caller."""
    v = Evaluator(q0, q1, k0, k1, h, n).eval(mask)
    assert isinstance(v, AB)
    t = np.broadcast_to(v.t, np.broadcast_shapes(np.shape(q0), np.shape(k0)))
    f = np.broadcast_to(v.f, t.shape)
    return np.where(t & f, PARTIAL, np.where(t, FULL, EMPTY)).astype(np.int8)
