"""Simplification as rule tables: each rule rewrites one node; the law it uses is its comment."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from attnc.dsl.check import (
    NotConstant,
    apply_binary,
    apply_builtin,
    int_floordiv,
    int_log2,
    int_mod,
    int_pow,
)

from .ir import FALSE, TRUE, Const, Node, Op, Sel, to_text

Rewrite = Callable[[Op], Node | None]


@dataclass(frozen=True)
class Rule:
    name: str
    law: str
    apply: Rewrite


def _is(x: Node, v) -> bool:
    return isinstance(x, Const) and type(x.value) is type(v) and x.value == v


def _num(x: Node) -> bool:
    return isinstance(x, Const) and not isinstance(x.value, bool)


# ---------------------------------------------------------------- constant folding

_SCALAR = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "fdiv": int_floordiv, "mod": int_mod,
}
_CMPF = {"lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "eq": lambda a, b: a == b,
         "ne": lambda a, b: a != b}


def fold(e: Op) -> Node | None:
    """All-constant operands: compute with the language's scalar semantics (dsl/check.py)."""
    if not all(isinstance(a, Const) for a in e.args):
        return None
    vals = [a.value for a in e.args]
    try:
        if e.op in ("add", "sub", "mul") and all(isinstance(v, int) for v in vals):
            r = _SCALAR[e.op](*vals)
        elif e.op in ("fdiv", "mod"):
            r = _SCALAR[e.op](*vals)
        elif e.op in ("add", "sub", "mul", "div", "pow"):
            sym = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}[e.op]
            r = int_pow(*vals) if e.op == "pow" and all(
                isinstance(v, int) for v in vals) else apply_binary(sym, *vals)
        elif e.op in _CMPF:
            r = _CMPF[e.op](*vals)
        elif e.op == "and":
            r = all(vals)
        elif e.op == "or":
            r = any(vals)
        elif e.op == "not":
            r = not vals[0]
        elif e.op == "neg":
            r = -vals[0]
        elif e.op == "log2":
            r = int_log2(vals[0])
        else:
            r = apply_builtin(e.op, vals)
    except (NotConstant, ArithmeticError, ValueError, TypeError, AttributeError, IndexError):
        return None
    # The folded constant has the node's IR type (min(-1, 0.0) is the float -1.0).
    from .ir import FLOAT, INT, type_of

    ty = type_of(e)
    if ty == FLOAT and not isinstance(r, bool):
        r = float(r)
    elif ty == INT and isinstance(r, float):
        return None
    if isinstance(r, float) and not math.isfinite(r):
        return None
    if isinstance(r, int) and not isinstance(r, bool) and not -(2**63) <= r < 2**63:
        return None  # would overflow int64 at run time; leave it to the evaluator
    return Const(r)


# ---------------------------------------------------------------- algebra


def add_zero(e: Op) -> Node | None:
    # x + 0 = x, 0 + x = x (ints only: -0.0 + 0 is 0.0, not -0.0)
    if e.op == "add" and not _has_float(e):
        a, b = e.args
        if _is(b, 0):
            return a
        if _is(a, 0):
            return b
    return None


def sub_zero(e: Op) -> Node | None:
    # x - 0 = x
    if e.op == "sub" and _is(e.args[1], 0) and not _has_float(e):
        return e.args[0]
    return None


def sub_self(e: Op) -> Node | None:
    # x - x = 0 (int)
    if e.op == "sub" and e.args[0] == e.args[1] and not _has_float(e.args[0]):
        return Const(0)
    return None


def mul_one(e: Op) -> Node | None:
    # x * 1 = x, 1 * x = x
    if e.op == "mul":
        a, b = e.args
        if _is(b, 1):
            return a
        if _is(a, 1):
            return b
    return None


def mul_zero(e: Op) -> Node | None:
    # x * 0 = 0 for ints (not for floats: inf * 0 is nan)
    if e.op == "mul" and any(_is(a, 0) for a in e.args) and not any(_has_float(a)
                                                                    for a in e.args):
        return Const(0)
    return None


def div_one(e: Op) -> Node | None:
    # x // 1 = x; x % 1 = 0
    if e.op == "fdiv" and _is(e.args[1], 1):
        return e.args[0]
    if e.op == "mod" and _is(e.args[1], 1):
        return Const(0)
    return None


def neg_neg(e: Op) -> Node | None:
    # -(-x) = x
    if e.op == "neg" and isinstance(e.args[0], Op) and e.args[0].op == "neg":
        return e.args[0].args[0]
    return None


def sub_neg(e: Op) -> Node | None:
    # a - (-b) = a + b;  a + (-b) = a - b
    if (e.op in ("sub", "add") and isinstance(e.args[1], Op) and e.args[1].op == "neg"
            and not _has_float(e)):
        return Op("add" if e.op == "sub" else "sub", (e.args[0], e.args[1].args[0]))
    return None


def neg_sub(e: Op) -> Node | None:
    # -(a - b) = b - a;  0 - x = -x
    if _has_float(e):
        return None  # -(a - b) and b - a differ in the sign of a zero result
    if e.op == "neg" and isinstance(e.args[0], Op) and e.args[0].op == "sub":
        a, b = e.args[0].args
        return Op("sub", (b, a))
    if e.op == "sub" and _is(e.args[0], 0):
        return Op("neg", (e.args[1],))
    return None


def _terms(e: Node, sign: int, out: list) -> None:
    if isinstance(e, Op) and e.op in ("add", "sub"):
        _terms(e.args[0], sign, out)
        _terms(e.args[1], sign if e.op == "add" else -sign, out)
    elif isinstance(e, Op) and e.op == "neg":
        _terms(e.args[0], -sign, out)
    else:
        out.append((sign, e))


def const_assoc(e: Op) -> Node | None:
    # (x + c1) + c2 = x + (c1 + c2), (x - c1) + c2 = x - (c1 - c2), ... : one constant per sum
    if e.op not in ("add", "sub") or _has_float(e):
        return None
    terms: list = []
    _terms(e, 1, terms)
    consts = [(s, t) for s, t in terms if _num(t)]
    others = [t for _, t in terms if not _num(t)]
    cancel = len(set(map(to_text, others))) < len(others)
    if len(consts) < 2 and not (consts and consts[0] != terms[-1]) and not cancel:
        return None
    total = sum(s * t.value for s, t in consts)
    rest = [(s, t) for s, t in terms if not _num(t)]
    # x - x = 0 inside a sum: cancel equal terms of opposite signs.
    kept: list = []
    for s_, t in rest:
        match = next((i for i, (s2, t2) in enumerate(kept) if t2 == t and s2 == -s_), None)
        if match is None:
            kept.append((s_, t))
        else:
            kept.pop(match)
    if len(kept) < len(rest):
        consts = consts or [(1, Const(0))]
    rest = kept
    if not rest:
        return Const(total)
    s0, t0 = rest[0]
    acc: Node = t0 if s0 == 1 else Op("neg", (t0,))
    for s, t in rest[1:]:
        acc = Op("add" if s == 1 else "sub", (acc, t))
    if total > 0:
        acc = Op("add", (acc, Const(total)))
    elif total < 0:
        acc = Op("sub", (acc, Const(-total)))
    return acc if acc != e else None


def not_not(e: Op) -> Node | None:
    # !!x = x
    if e.op == "not" and isinstance(e.args[0], Op) and e.args[0].op == "not":
        return e.args[0].args[0]
    return None


_NEGATE = {"lt": ("le", True), "le": ("lt", True), "eq": ("ne", False), "ne": ("eq", False)}


def not_cmp(e: Op) -> Node | None:
    # !(a < b) = b <= a; !(a <= b) = b < a; !(a == b) = a != b (ints: no NaN to worry about)
    if e.op == "not" and isinstance(e.args[0], Op) and e.args[0].op in _NEGATE:
        inner = e.args[0]
        if any(_has_float(a) for a in inner.args):
            return None
        name, swap = _NEGATE[inner.op]
        a, b = inner.args
        return Op(name, (b, a) if swap else (a, b))
    return None


def flatten(e: Op) -> Node | None:
    # (a & (b & c)) = (a & b & c); likewise |   (associativity)
    if e.op in ("and", "or") and any(isinstance(a, Op) and a.op == e.op for a in e.args):
        out: list[Node] = []
        for a in e.args:
            out.extend(a.args if isinstance(a, Op) and a.op == e.op else (a,))
        return Op(e.op, tuple(out))
    return None


def absorb_const(e: Op) -> Node | None:
    # x & true = x; x & false = false; x | false = x; x | true = true
    if e.op not in ("and", "or"):
        return None
    unit, zero = (TRUE, FALSE) if e.op == "and" else (FALSE, TRUE)
    if any(a == zero for a in e.args):
        return zero
    kept = tuple(a for a in e.args if a != unit)
    if len(kept) == len(e.args):
        return None
    if not kept:
        return unit
    return kept[0] if len(kept) == 1 else Op(e.op, kept)


def dedup(e: Op) -> Node | None:
    # x & x = x; x | x = x   (idempotence)
    if e.op in ("and", "or"):
        seen: list[Node] = []
        for a in e.args:
            if a not in seen:
                seen.append(a)
        if len(seen) < len(e.args):
            return seen[0] if len(seen) == 1 else Op(e.op, tuple(seen))
    return None


def sort_commutative(e: Op) -> Node | None:
    # a & b = b & a (commutativity): a canonical operand order makes equal masks equal keys
    if e.op in ("and", "or", "min", "max") and len(e.args) > 1:
        order = sorted(e.args, key=to_text)
        if list(order) != list(e.args):
            return Op(e.op, tuple(order))
    return None


def single(e: Op) -> Node | None:
    # and(x) = x; or(x) = x
    if e.op in ("and", "or") and len(e.args) == 1:
        return e.args[0]
    return None


def cmp_same(e: Op) -> Node | None:
    # x <= x, x == x are true; x < x, x != x are false (ints)
    if e.op in ("lt", "le", "eq", "ne") and e.args[0] == e.args[1] and not _has_float(e.args[0]):
        return TRUE if e.op in ("le", "eq") else FALSE
    return None


def _has_float(x: Node) -> bool:
    from .ir import FLOAT, type_of

    return type_of(x) == FLOAT


RULES: tuple[Rule, ...] = (
    Rule("fold", "f(c1, ..., cn) = the constant f computes", fold),
    Rule("add_zero", "x + 0 = 0 + x = x", add_zero),
    Rule("sub_zero", "x - 0 = x", sub_zero),
    Rule("sub_self", "x - x = 0", sub_self),
    Rule("mul_one", "x * 1 = 1 * x = x", mul_one),
    Rule("mul_zero", "x * 0 = 0 (ints)", mul_zero),
    Rule("div_one", "x // 1 = x, x % 1 = 0", div_one),
    Rule("neg_neg", "-(-x) = x", neg_neg),
    Rule("sub_neg", "a - (-b) = a + b, a + (-b) = a - b", sub_neg),
    Rule("neg_sub", "-(a - b) = b - a, 0 - x = -x", neg_sub),
    Rule("const_assoc", "(x + c1) + c2 = x + (c1 + c2): one constant per sum", const_assoc),
    Rule("not_not", "!!x = x", not_not),
    Rule("not_cmp", "!(a < b) = b <= a, !(a <= b) = b < a, !(a == b) = a != b", not_cmp),
    Rule("flatten", "a & (b & c) = a & b & c (associativity)", flatten),
    Rule("absorb_const", "x & true = x, x & false = false, x | false = x, x | true = true",
         absorb_const),
    Rule("dedup", "x & x = x, x | x = x (idempotence)", dedup),
    Rule("single", "and(x) = or(x) = x", single),
    Rule("cmp_same", "x <= x, x == x; not x < x, not x != x", cmp_same),
    Rule("sort_commutative", "a & b = b & a (commutativity; canonical order)",
         sort_commutative),
)


def rewrite(e: Node, rules: tuple[Rule, ...] = RULES, stats: dict[str, int] | None = None
            ) -> Node:
    """Apply rules bottom-up until no rule fires (every rule shrinks or orders the term)."""
    memo: dict[Node, Node] = {}

    def go(x: Node) -> Node:
        if x in memo:
            return memo[x]
        if isinstance(x, Op):
            y: Node = Op(x.op, tuple(go(a) for a in x.args))
        elif isinstance(x, Sel):
            y = Sel(x.kind, tuple((n, go(v)) for n, v in x.params),
                    go(x.elem) if x.elem is not None else None)
        else:
            y = x
        for _ in range(64):
            if not isinstance(y, Op):
                break
            for r in rules:
                z = r.apply(y)
                if z is not None and z != y:
                    if stats is not None:
                        stats[r.name] = stats.get(r.name, 0) + 1
                    # z's operands are already simplified: rules only rearrange them.
                    y = z
                    break
            else:
                break
        memo[x] = y
        return y

    return go(e)


def rules_table() -> str:
    """The rule table as text (for `attnc compile --dump-ir`)."""
    return "\n".join(f"{r.name:18s} {r.law}" for r in RULES)


__all__ = ["RULES", "Rule", "rewrite", "rules_table"]
