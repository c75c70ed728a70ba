"""Lowering: a checked pattern (or plan entry) and its arguments to Pattern IR, by inlining."""

from __future__ import annotations

from attnc.dsl import nodes as N
from attnc.dsl.builtins import BUILTINS
from attnc.dsl.check import PatternInfo, PlanInfo, Program, call_arguments, call_with_args
from attnc.dsl.errors import AttncError, Diagnostic

from .ir import FALSE, TRUE, Const, Node, Op, PatternIR, Sel, Var, op

_BINOP = {"+": "add", "-": "sub", "*": "mul", "/": "div", "//": "fdiv", "%": "mod", "**": "pow"}
_CMP = {"<": ("lt", False), "<=": ("le", False), ">": ("lt", True), ">=": ("le", True),
        "==": ("eq", False), "!=": ("ne", False)}
_FUNCS = {"min", "max", "abs", "log2", "floor", "ceil", "float", "exp", "log", "sqrt", "where"}


class _Lowerer:
    def __init__(self, scope: dict[str, PatternInfo]):
        self.scope = scope

    def pattern(self, p: PatternInfo, call: N.Call | None, caller_env: dict[str, Node],
                caller_scope: dict[str, PatternInfo]) -> tuple[Node, Node | None]:
        env: dict[str, Node] = {v: Var(v) for v in ("q", "k", "h", "n")}
        given = call_arguments(p, call)
        for prm in p.params:
            if prm.name in given:
                v = self.expr(given[prm.name], caller_env, caller_scope)
            elif prm.default is not None:
                v = self.expr(prm.default, env, p.module.scope)
            else:
                raise AttncError(f"pattern '{p.name}' needs argument '{prm.name}'")
            if prm.type == "float" and _is_int_const(v):
                v = Const(float(v.value))
            env[prm.name] = v
        mask: Node = TRUE
        bias: Node | None = None
        for st in p.node.body:
            if isinstance(st, N.Let):
                env[st.name] = self.expr(st.value, env, p.module.scope)
            elif isinstance(st, N.Mask):
                mask = self.expr(st.expr, env, p.module.scope)
            elif isinstance(st, N.Bias):
                bias = self.expr(st.expr, env, p.module.scope)
            # Requirements are checked by the checker (constants) and the reference (elastic);
            # they do not change the mask.
        return mask, bias

    def expr(self, e: N.Expr, env: dict[str, Node], scope: dict[str, PatternInfo]) -> Node:
        E = self.expr
        if isinstance(e, N.IntLit | N.FloatLit | N.BoolLit):
            return Const(e.value)
        if isinstance(e, N.Name):
            if e.id in env:
                return env[e.id]
            return self.pattern(scope[e.id], None, env, scope)[0]
        if isinstance(e, N.Unary):
            a = E(e.operand, env, scope)
            if e.op == "!":
                return op("not", a)
            return op("neg", a) if e.op == "-" else a
        if isinstance(e, N.Binary):
            a, b = E(e.left, env, scope), E(e.right, env, scope)
            if e.op == "&":
                return op("and", a, b)
            if e.op == "|":
                return op("or", a, b)
            return op(_BINOP[e.op], a, b)
        if isinstance(e, N.Compare):
            vals = [E(o, env, scope) for o in e.operands]
            parts = []
            for i, o in enumerate(e.ops):
                name, swap = _CMP[o]
                a, b = vals[i], vals[i + 1]
                parts.append(op(name, b, a) if swap else op(name, a, b))
            return parts[0] if len(parts) == 1 else Op("and", tuple(parts))
        if isinstance(e, N.In):
            elem = E(e.element, env, scope)
            sel = E(e.container, env, scope)
            assert isinstance(sel, Sel) and sel.elem is None
            return Sel(sel.kind, sel.params, elem)
        if isinstance(e, N.Attr):
            target = e.value
            if isinstance(target, N.Name):
                m, b = self.pattern(scope[target.id], None, env, scope)
            else:
                m, b = self.pattern(scope[target.func], target, env, scope)
            if e.attr == "mask":
                return m
            return b if b is not None else Const(0.0)
        if isinstance(e, N.Call):
            if e.func in BUILTINS:
                return self.builtin(e, env, scope)
            return self.pattern(scope[e.func], e, env, scope)[0]
        raise AssertionError(type(e).__name__)

    def builtin(self, e: N.Call, env, scope) -> Node:
        b = BUILTINS[e.func]
        if e.func in _FUNCS:
            return Op(e.func, tuple(self.expr(a, env, scope) for a in e.args))
        args: dict[str, Node] = {}
        for bp, a in zip(b.params, e.args, strict=False):
            args[bp.name] = self.expr(a, env, scope)
        for kw in e.kwargs:
            args[kw.name] = self.expr(kw.value, env, scope)
        for bp in b.params:
            if bp.name not in args and bp.default is not None:
                args[bp.name] = Const(bp.default)
        if e.func == "segment":
            return Sel("segment", (), args["x"])
        kind = {"top_columns": "in_columns", "top_diagonals": "in_diagonals"}.get(e.func, e.func)
        params = tuple((bp.name, args[bp.name]) for bp in b.params if bp.name in args)
        return Sel(kind, params, None)


def _is_int_const(v: Node) -> bool:
    return isinstance(v, Const) and isinstance(v.value, int) and not isinstance(v.value, bool)


def lower_pattern(p: PatternInfo, args: dict | None = None, call: N.Call | None = None,
                  scope: dict[str, PatternInfo] | None = None) -> PatternIR:
    """Inline a pattern with its arguments (Python values or AST expressions of n and h)."""
    scope = scope if scope is not None else p.module.scope
    call = call if call is not None else call_with_args(p, args)
    low = _Lowerer(scope)
    env = {"n": Var("n"), "h": Var("h")}
    try:
        mask, bias = low.pattern(p, call, env, scope)
    except RecursionError:
        raise AttncError(Diagnostic(f"pattern '{p.name}' is too large to lower",
                                    p.node.name_span)) from None
    label = p.name if call is None or (not call.args and not call.kwargs) else p.name
    return PatternIR(label, mask, bias)


def lower(program: Program, name: str, args: dict | None = None) -> PatternIR:
    return lower_pattern(program.pattern(name), args)


def lower_plan(plan: PlanInfo) -> dict[tuple[int, int], PatternIR]:
    """Every (layer, head) cell of a plan as IR (cells sharing an entry share one IR)."""
    out: dict[tuple[int, int], PatternIR] = {}
    for a in plan.assignments:
        ir = lower_pattern(a.pattern, call=a.call, scope=plan.module.scope)
        for cell in a.cells:
            out[cell] = ir
    return out


__all__ = ["FALSE", "TRUE", "lower", "lower_pattern", "lower_plan"]
