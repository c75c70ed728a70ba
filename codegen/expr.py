"""Print static Pattern IR as Triton expressions (the predicate and bias hooks of the kernel)."""

from __future__ import annotations

from collections.abc import Callable

from attnc.compiler.ir import BOOL, FLOAT, Const, Node, Op, Sel, Var, to_text, type_of
from attnc.dsl.errors import AttncError


class Unsupported(AttncError):
    """IR the kernel printer cannot express (reported at compile time, never at run time); a
    user-facing error, printed by the CLI as one line."""

    def __init__(self, what: str):
        super().__init__(f"the kernel cannot express {what}")


# Helpers the generated source defines once (integer semantics of the language: floor division
# and Python-style modulo, total at zero; floor log2 exact in int64).
_DIVMOD = '''
@triton.jit
def _floordiv(a, b):
    safe = tl.where(b == 0, 1, b)
    q = a // safe
    q = tl.where(((a % safe) != 0) & ((a < 0) != (safe < 0)), q - 1, q)
    return tl.where(b == 0, 0, q)


@triton.jit
def _mod(a, b):
    safe = tl.where(b == 0, 1, b)
    r = a % safe
    r = tl.where((r != 0) & ((r < 0) != (safe < 0)), r + safe, r)
    return tl.where(b == 0, a, r)


'''

_UPDATE = '''@triton.jit
def attnc_update(acc, l_i, m_i, s, v, scale, SAFE: tl.constexpr, IEEE: tl.constexpr):
    # One online-softmax step in base 2 over a tile of raw scores s (masked entries -inf),
    # scaled by `scale` inside the max and the exponent (one fused multiply-add per score, as
    # the scale is positive). SAFE: rows may have seen nothing yet (m = -inf), so exp2 gets a
    # finite shift.
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    if SAFE:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    p = tl.exp2(s * scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


'''

_LOG2I = '''@triton.jit
def _log2i(x):
    x = tl.maximum(x, 1)
    r = tl.floor(tl.log2(x.to(tl.float64))).to(tl.int64)
    r = tl.minimum(tl.maximum(r, 0), 62)
    one = tl.full(r.shape, 1, tl.int64)
    r = tl.where((r < 62) & ((one << tl.minimum(r + 1, 62)) <= x), r + 1, r)
    r = tl.where((one << r) > x, r - 1, r)
    return r
'''
# The integer helpers alone (codegen.hopper prints them for Gluon, which has its own
# softmax); the Triton skeletons get the online-softmax step too.
INT_HELPERS = _DIVMOD + _LOG2I
PRELUDE = _DIVMOD + _UPDATE + _LOG2I


def print_expr(e: Node, names: dict[str, str],
               sel: Callable[[Sel, str | None], str] | None = None) -> str:
    """Triton source of e; `names` maps q, k, h, n to kernel variables (int64). `sel` prints a
    dynamic selector given the source of its tested element (codegen.dynamic)."""
    memo: dict[Node, str] = {}

    def go(x: Node) -> str:
        if x in memo:
            return memo[x]
        r = _go(x)
        memo[x] = r
        return r

    def _go(x: Node) -> str:
        if isinstance(x, Const):
            v = x.value
            if isinstance(v, bool):
                return "True" if v else "False"
            if isinstance(v, float):
                if v != v or v in (float("inf"), float("-inf")):
                    return f"float('{v}')"
                return repr(v)
            return str(v)
        if isinstance(x, Var):
            return names[x.name]
        if isinstance(x, Sel):
            if sel is not None:
                return sel(x, go(x.elem) if x.elem is not None else None)
            raise Unsupported(f"dynamic selector {x.kind} (index builders come with issue 6)")
        assert isinstance(x, Op)
        a = [go(y) for y in x.args]
        o = x.op
        binops = {"add": "+", "sub": "-", "mul": "*", "lt": "<", "le": "<=", "eq": "==",
                  "ne": "!="}
        if o in binops:
            return f"({a[0]} {binops[o]} {a[1]})"
        if o == "and":
            return "(" + " & ".join(a) + ")"
        if o == "or":
            return "(" + " | ".join(a) + ")"
        if o == "not":
            return f"({a[0]} == False)"  # noqa: E712 - generated Triton source
        if o == "neg":
            return f"(-{a[0]})"
        if o == "div":
            return f"(({a[0]}) * 1.0 / ({a[1]}))"
        if o == "fdiv":
            if type_of(x.args[0]) == FLOAT or type_of(x.args[1]) == FLOAT:
                return f"tl.floor({a[0]} / {a[1]})"
            return f"_floordiv({a[0]}, {a[1]})"
        if o == "mod":
            return f"_mod({a[0]}, {a[1]})"
        if o == "pow":
            base, ex = x.args
            if type_of(x) == FLOAT:
                # torch.pow's (the reference's) values: a negative base with an integral
                # exponent has the exponent's parity sign, else NaN; 0 ** 0 == 1.
                b, e = f"(({a[0]}) * 1.0)", f"(({a[1]}) * 1.0)"
                mag = f"tl.exp2({e} * tl.log2(tl.abs({b})))"
                odd = f"(tl.floor({e} * 0.5) * 2.0 != {e})"
                neg = f"tl.where(tl.floor({e}) == {e}, tl.where({odd}, -{mag}, {mag}), " \
                      "float('nan'))"
                return f"tl.where({b} < 0, {neg}, tl.where({e} == 0, 1.0, {mag}))"
            if isinstance(base, Const) and base.value == 2:
                return f"tl.where({a[1]} < 0, 0, 1 << tl.maximum({a[1]}, 0))"
            if isinstance(ex, Const) and isinstance(ex.value, int) and 0 <= ex.value <= 8:
                return "(" + " * ".join([f"({a[0]})"] * ex.value or ["1"]) + ")"
            raise Unsupported(f"integer {to_text(x)}: integer ** needs base 2 or a constant "
                              "exponent 0..8 in a kernel (the reference evaluates any)")
        if o in ("min", "max"):
            out = a[0]
            for y in a[1:]:
                out = f"tl.{'minimum' if o == 'min' else 'maximum'}({out}, {y})"
            return out
        if o == "abs":
            return f"tl.abs({a[0]})"
        if o == "log2":
            return f"_log2i({a[0]})"
        if o == "floor":
            return f"tl.floor({a[0]}).to(tl.int64)"
        if o == "ceil":
            return f"tl.ceil({a[0]}).to(tl.int64)"
        if o == "float":
            return f"(({a[0]}) * 1.0)"
        if o in ("exp", "log", "sqrt"):
            return f"tl.{o}(({a[0]}) * 1.0)"
        if o == "where":
            return f"tl.where({a[0]}, {a[1]}, {a[2]})"
        raise Unsupported(f"the operation {o!r}")

    out = go(e)
    if type_of(e) == BOOL and isinstance(e, Const):
        return out
    return out
