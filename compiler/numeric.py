"""Exact evaluation of static IR on numpy arrays (int64 / float64 / bool), with the language's
total integer semantics (x // 0 == 0, x % 0 == x, floor log2). Used for closed-form block ranges
and for expanding partial blocks element by element."""

from __future__ import annotations

import numpy as np

from .ir import Const, Node, Op, Sel, Var


def _i(x) -> np.ndarray:
    return np.asarray(x)


def floordiv(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        with np.errstate(all="ignore"):
            return np.floor(a / b)
    zero = b == 0
    safe = np.where(zero, 1, b)
    return np.where(zero, 0, np.floor_divide(a, safe))


def mod(a, b):
    a, b = np.asarray(a), np.asarray(b)
    zero = b == 0
    safe = np.where(zero, 1, b)
    return np.where(zero, a, np.mod(a, safe))


def int_pow(a, b):
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
    neg = b < 0
    with np.errstate(all="ignore"):
        pos = np.power(a, np.where(neg, 0, b))
    odd = np.mod(b, 2) == 1
    special = np.where(a == 1, 1, np.where((a == -1), np.where(odd, -1, 1),
                                           np.where((a < 0) & odd, -1, 0)))
    return np.where(neg, special, pos)


def int_log2(x):
    x = np.maximum(np.asarray(x, dtype=np.int64), 1)
    # float log2 can be off by one near powers of two; correct it with exact shifts, which
    # stay within int64 (r <= 62).
    r = np.clip(np.floor(np.log2(x.astype(np.float64))).astype(np.int64), 0, 62)
    one = np.ones_like(r)
    r = np.where((r < 62) & (np.left_shift(one, np.minimum(r + 1, 62)) <= x), r + 1, r)
    r = np.where(np.left_shift(one, r) > x, r - 1, r)
    return r


class NumericError(Exception):
    pass


def evaluate(e: Node, env: dict[str, object], selectors=None):
    """Evaluate IR with variables bound to numpy arrays (broadcasting) or scalars.
    `selectors(sel, elem)`: the run-time data of dynamic selectors, a bool array for a Sel
    node and its evaluated element (None for elementless selectors); without it a selector
    raises NumericError."""
    memo: dict[Node, object] = {}

    def go(x: Node):
        if x in memo:
            return memo[x]
        r = _eval(x)
        memo[x] = r
        return r

    def _eval(x: Node):
        if isinstance(x, Const):
            v = x.value
            if isinstance(v, bool):
                return np.asarray(v)
            return np.asarray(v, dtype=np.int64 if isinstance(v, int) else np.float64)
        if isinstance(x, Var):
            return np.asarray(env[x.name])
        if isinstance(x, Sel):
            if selectors is None:
                raise NumericError(f"dynamic selector {x.kind} needs run-time data")
            return np.asarray(selectors(x, None if x.elem is None else go(x.elem)))
        assert isinstance(x, Op)
        o = x.op
        if o == "and":
            out = go(x.args[0])
            for a in x.args[1:]:
                out = out & go(a)
            return out
        if o == "or":
            out = go(x.args[0])
            for a in x.args[1:]:
                out = out | go(a)
            return out
        if o == "not":
            return ~go(x.args[0])
        if o == "where":
            return np.where(go(x.args[0]), go(x.args[1]), go(x.args[2]))
        a = [go(y) for y in x.args]
        with np.errstate(all="ignore"):
            if o == "add":
                return a[0] + a[1]
            if o == "sub":
                return a[0] - a[1]
            if o == "mul":
                return a[0] * a[1]
            if o == "div":
                return np.asarray(a[0], dtype=np.float64) / np.asarray(a[1], dtype=np.float64)
            if o == "fdiv":
                return floordiv(a[0], a[1])
            if o == "mod":
                return mod(a[0], a[1])
            if o == "pow":
                if a[0].dtype.kind in "iu" and a[1].dtype.kind in "iu":
                    return int_pow(a[0], a[1])
                return np.power(np.asarray(a[0], dtype=np.float64), a[1])
            if o == "neg":
                return -a[0]
            if o == "lt":
                return a[0] < a[1]
            if o == "le":
                return a[0] <= a[1]
            if o == "eq":
                return a[0] == a[1]
            if o == "ne":
                return a[0] != a[1]
            if o == "min":
                out = a[0]
                for y in a[1:]:
                    out = np.minimum(out, y)
                return out
            if o == "max":
                out = a[0]
                for y in a[1:]:
                    out = np.maximum(out, y)
                return out
            if o == "abs":
                return np.abs(a[0])
            if o == "log2":
                return int_log2(a[0])
            if o == "floor":
                return np.floor(a[0]).astype(np.int64)
            if o == "ceil":
                return np.ceil(a[0]).astype(np.int64)
            if o == "float":
                return np.asarray(a[0], dtype=np.float64)
            if o == "exp":
                return np.exp(np.asarray(a[0], dtype=np.float64))
            if o == "log":
                return np.log(np.asarray(a[0], dtype=np.float64))
            if o == "sqrt":
                return np.sqrt(np.asarray(a[0], dtype=np.float64))
        raise AssertionError(o)

    return go(e)
