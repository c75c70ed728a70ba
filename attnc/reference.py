"""Exact reference semantics: evaluate any pattern or plan into a dense mask (and bias) with torch.

This is the ground truth every later stage (block classification, kernels, autotuning) is tested
against, so it follows the language definition literally and favours clarity over speed; it is
vectorised over heads, queries and keys, and costs O(heads x queries x keys) memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from attnc.dsl import nodes as N
from attnc.dsl.builtins import BUILTINS
from attnc.dsl.check import (
    PatternInfo,
    PlanInfo,
    Program,
    call_arguments,
    call_with_args,
    load,
    loads,
)
from attnc.dsl.errors import AttncError, Diagnostic
from attnc.dsl.format import format_expr

I64, F64 = torch.int64, torch.float64

GateInput = torch.Tensor | Mapping[int, torch.Tensor] | Callable[[int], torch.Tensor]


@dataclass
class Inputs:
    """Run-time data that dynamic patterns read.

    scores:   [H, Lq, n] attention logits (already scaled) of the evaluated queries; used by
              top_columns, top_diagonals and top_blocks.
    gates:    the learned gate's block scores, [H, ceil(n / block), ceil(n / block)] indexed by
              absolute query block and key block; a tensor, a dict keyed by block size, or a
              function of the block size.
    segments: [n] segment (document) id of every position, for segment().
    """

    scores: torch.Tensor | None = None
    gates: GateInput | None = None
    segments: torch.Tensor | None = None


@dataclass
class Evaluated:
    mask: torch.Tensor  # [H, Lq, n] bool
    bias: torch.Tensor | None  # [H, Lq, n] float64, or None when the pattern has no bias
    q_positions: torch.Tensor  # [Lq] absolute query positions
    heads: torch.Tensor  # [H] head indices

    @property
    def density(self) -> float:
        return float(self.mask.double().mean()) if self.mask.numel() else 0.0


class _Set:
    """A run-time selected set of integers 0..m-1 per head: a [H_or_1, m] membership table."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def contains(self, x: torch.Tensor) -> torch.Tensor:
        m = self.table.shape[-1]
        valid = (x >= 0) & (x < m)
        idx = x.clamp(0, max(m - 1, 0))
        shape = torch.broadcast_shapes(idx.shape, (self.table.shape[0], 1, 1))
        idx = idx.expand(shape)
        rows = torch.arange(shape[0]).view(-1, 1, 1).expand(shape)
        rows = rows if self.table.shape[0] > 1 else torch.zeros_like(rows)
        return self.table[rows, idx] & valid


def _t(v) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, bool):
        return torch.tensor(v)
    if isinstance(v, int):
        return torch.tensor(v, dtype=I64)
    if isinstance(v, float):
        return torch.tensor(v, dtype=F64)
    raise TypeError(f"cannot use {v!r} as a value")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == F64 else x.to(F64)


def _num_pair(a: torch.Tensor, b: torch.Tensor):
    if a.dtype == F64 or b.dtype == F64:
        return _as_float(a), _as_float(b)
    return a, b


def floordiv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    zero = b == 0
    safe = torch.where(zero, torch.ones_like(b), b)
    return torch.where(zero, torch.zeros_like(a), torch.div(a, safe, rounding_mode="floor"))


def mod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    zero = b == 0
    safe = torch.where(zero, torch.ones_like(b), b)
    return torch.where(zero, a.expand(torch.broadcast_shapes(a.shape, b.shape)),
                       torch.remainder(a, safe))


def int_pow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    neg = b < 0
    pos = torch.pow(a, b.clamp(min=0))
    odd = (b.remainder(2)) == 1
    special = torch.where(
        a == 1, torch.ones_like(pos),
        torch.where((a < 0) & odd & (a != 0), -torch.ones_like(pos), torch.zeros_like(pos)),
    )
    special = torch.where((a == -1) & ~odd, torch.ones_like(pos), special)
    return torch.where(neg, special, pos)


def int_log2(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(min=1)
    r = torch.floor(torch.log2(x.to(F64))).to(I64).clamp(0, 62)
    # float log2 can be off by one near powers of two; correct it with exact shifts, which
    # stay within int64 (r <= 62).
    one = torch.ones_like(r)
    up = (r < 62) & (torch.bitwise_left_shift(one, (r + 1).clamp(max=62)) <= x)
    r = torch.where(up, r + 1, r)
    r = torch.where(torch.bitwise_left_shift(one, r) > x, r - 1, r)
    return r


_CMP = {
    "<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge, "==": torch.eq, "!=": torch.ne,
}


class _Evaluator:
    def __init__(self, n: int, q: torch.Tensor, heads: torch.Tensor, inputs: Inputs):
        self.n = n
        self.qpos = q
        self.q = q.view(1, -1, 1).to(I64)
        self.k = torch.arange(n, dtype=I64).view(1, 1, -1)
        self.h = heads.view(-1, 1, 1).to(I64)
        self.inputs = inputs
        self.shape = (heads.numel(), q.numel(), n)
        self._score_cache: dict = {}

    # -- patterns
    def pattern(self, p: PatternInfo, call: N.Call | None, caller_env: dict | None,
                caller: PatternInfo | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        env: dict[str, object] = {"q": self.q, "k": self.k, "h": self.h, "n": _t(self.n)}
        given = call_arguments(p, call)
        for prm in p.params:
            if prm.name in given:
                v = self.expr(given[prm.name], caller_env, caller)
                span = given[prm.name].span
            elif prm.default is not None:
                v = self.expr(prm.default, env, p)
                span = prm.default.span
            else:
                raise AttncError(f"pattern '{p.name}' needs argument '{prm.name}'")
            v = _t(v)
            if prm.type == "float":
                v = _as_float(v)
            self._check_range(p, prm, v, span)
            env[prm.name] = v
        mask: torch.Tensor | None = None
        bias: torch.Tensor | None = None
        for st in p.node.body:
            if isinstance(st, N.Let):
                env[st.name] = self.expr(st.value, env, p)
            elif isinstance(st, N.Require):
                ok = _t(self.expr(st.cond, env, p))
                if not bool(ok.all()):
                    msg = st.message or f"requirement `{format_expr(st.cond)}` fails"
                    raise AttncError(Diagnostic(
                        f"{msg} (in '{p.name}' at n = {self.n}{self._params_text(p, env)})",
                        st.cond.span))
            elif isinstance(st, N.Mask):
                mask = _t(self.expr(st.expr, env, p))
            elif isinstance(st, N.Bias):
                bias = _as_float(_t(self.expr(st.expr, env, p)))
        if mask is None:
            mask = torch.tensor(True)
        return mask, bias

    def _params_text(self, p: PatternInfo, env: dict) -> str:
        parts = []
        for prm in p.params:
            v = env.get(prm.name)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                parts.append(f"{prm.name} = {v.item()}")
        return (", " + ", ".join(parts)) if parts else ""

    def _check_range(self, p: PatternInfo, prm, v: torch.Tensor, span: N.Span) -> None:
        if prm.lo is None and prm.hi is None:
            return
        bad = torch.zeros((), dtype=torch.bool)
        if prm.lo is not None:
            bad = bad | (v < prm.lo)
        if prm.hi is not None:
            bad = bad | (v > prm.hi)
        if bool(bad.any()):
            worst = v[bad.expand(v.shape)] if v.dim() else v
            value = worst.flatten()[0].item()
            raise AttncError(Diagnostic(
                f"parameter '{prm.name}' of '{p.name}' is {value} at n = {self.n}, out of "
                f"range {prm.range_text()}",
                span,
            ))

    # -- expressions
    def expr(self, e: N.Expr, env: dict, p: PatternInfo | None):
        E = self.expr
        if isinstance(e, (N.IntLit, N.FloatLit, N.BoolLit)):
            return _t(e.value)
        if isinstance(e, N.Name):
            if e.id in env:
                return env[e.id]
            scope = p.module.scope if p is not None else self._plan_scope
            return self.pattern(scope[e.id], None, env, p)[0]
        if isinstance(e, N.Unary):
            v = _t(E(e.operand, env, p))
            if e.op == "!":
                return ~v
            return -v if e.op == "-" else v
        if isinstance(e, N.Binary):
            a = _t(E(e.left, env, p))
            b = _t(E(e.right, env, p))
            op = e.op
            if op == "&":
                return a & b
            if op == "|":
                return a | b
            if op == "/":
                return _as_float(a) / _as_float(b)
            a, b = _num_pair(a, b)
            if op == "+":
                return a + b
            if op == "-":
                return a - b
            if op == "*":
                return a * b
            if op == "//":
                return floordiv(a, b)
            if op == "%":
                return mod(a, b)
            if op == "**":
                if a.dtype == I64:
                    return int_pow(a, b)
                return torch.pow(a, b)
            raise AssertionError(op)
        if isinstance(e, N.Compare):
            vals = [_t(E(o, env, p)) for o in e.operands]
            out = None
            for i, op in enumerate(e.ops):
                a, b = vals[i], vals[i + 1]
                if a.dtype != torch.bool:
                    a, b = _num_pair(a, b)
                r = _CMP[op](a, b)
                out = r if out is None else out & r
            return out
        if isinstance(e, N.In):
            s = E(e.container, env, p)
            return s.contains(_t(E(e.element, env, p)))
        if isinstance(e, N.Attr):
            call = e.value
            scope = p.module.scope if p is not None else self._plan_scope
            if isinstance(call, N.Name):
                target, c = scope[call.id], None
            else:
                target, c = scope[call.func], call
            mask, bias = self.pattern(target, c, env, p)
            if e.attr == "mask":
                return mask
            return bias if bias is not None else torch.tensor(0.0, dtype=F64)
        if isinstance(e, N.Call):
            if e.func in BUILTINS:
                return self.builtin(e, env, p)
            scope = p.module.scope if p is not None else self._plan_scope
            return self.pattern(scope[e.func], e, env, p)[0]
        raise AssertionError(type(e).__name__)

    _plan_scope: dict = {}

    def _bind(self, e: N.Call, env, p) -> dict[str, torch.Tensor]:
        b = BUILTINS[e.func]
        out: dict[str, torch.Tensor] = {}
        for bp, a in zip(b.params, e.args, strict=False):
            out[bp.name] = _t(self.expr(a, env, p))
        for kw in e.kwargs:
            out[kw.name] = _t(self.expr(kw.value, env, p))
        for bp in b.params:
            if bp.name not in out and bp.default is not None:
                out[bp.name] = _t(bp.default)
        for bp in b.params:
            if bp.lo is not None and bp.name in out and bool((out[bp.name] < bp.lo).any()):
                raise AttncError(Diagnostic(
                    f"argument '{bp.name}' of {e.func}() is "
                    f"{out[bp.name].min().item()} at n = {self.n}; it must be >= {bp.lo}",
                    e.span))
        return out

    def builtin(self, e: N.Call, env, p):
        f = e.func
        if f in ("min", "max"):
            vals = [_t(self.expr(a, env, p)) for a in e.args]
            if any(v.dtype == F64 for v in vals):
                vals = [_as_float(v) for v in vals]
            out = vals[0]
            for v in vals[1:]:
                out = torch.minimum(out, v) if f == "min" else torch.maximum(out, v)
            return out
        a = self._bind(e, env, p)
        if f == "abs":
            return torch.abs(a["a"] if "a" in a else a["x"])
        if f == "log2":
            return int_log2(a["x"].to(I64))
        if f == "floor":
            return torch.floor(_as_float(a["x"])).to(I64)
        if f == "ceil":
            return torch.ceil(_as_float(a["x"])).to(I64)
        if f == "float":
            return _as_float(a["x"])
        if f == "exp":
            return torch.exp(_as_float(a["x"]))
        if f == "log":
            return torch.log(_as_float(a["x"]))
        if f == "sqrt":
            return torch.sqrt(_as_float(a["x"]))
        if f == "where":
            x, y = a["a"], a["b"]
            if x.dtype != torch.bool:
                x, y = _num_pair(x, y)
            return torch.where(a["cond"], x, y)
        if f == "segment":
            return self._segment(a["x"], e)
        if f == "top_columns":
            return self._top_columns(a["count"], a["last_q"], a["keep_first"], e)
        if f == "top_diagonals":
            return self._top_diagonals(a["count"], a["last_q"], a["keep_near"], e)
        if f == "top_blocks":
            return self._top_blocks(a["count"], a["block"], a["causal"], e)
        if f == "gate":
            return self._gate(a["block"], a["topk"], a["threshold"], a["causal"], e)
        raise AssertionError(f)

    # -- dynamic selectors
    def _need_scores(self, e: N.Call) -> torch.Tensor:
        s = self.inputs.scores
        if s is None:
            raise AttncError(Diagnostic(
                f"{e.func}() selects from the attention scores: pass scores= "
                "([heads, queries, keys] logits) to evaluate this dynamic pattern", e.span))
        H, Lq, n = self.shape
        if s.dim() != 3 or s.shape[1:] != (Lq, n) or s.shape[0] not in (1, H):
            raise AttncError(Diagnostic(
                f"scores must have shape [{H}, {Lq}, {n}], not {list(s.shape)}", e.span))
        return s.to(F64)

    def _per_head(self, v: torch.Tensor) -> torch.Tensor:
        """A selector argument as one value per head: [H]."""
        return v.reshape(-1).expand(self.shape[0]) if v.numel() == 1 else v.reshape(-1)

    def _last_rows_probs(self, last_q: torch.Tensor, e: N.Call):
        """Causal softmax of the last `last_q` query rows, per head: probs [H, R, n], rows mask."""
        s = self._need_scores(e)
        H, Lq, n = self.shape
        s = s.expand(H, Lq, n)
        causal = self.k <= self.q  # [1, Lq, n]
        logits = s.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # rows with no causal key (q < 0 cannot occur)
        lq = self._per_head(last_q).clamp(max=Lq)  # [H]
        row = torch.arange(Lq).view(1, Lq)
        take = row >= (Lq - lq.view(H, 1))  # [H, Lq]
        return probs * take.unsqueeze(-1)

    @staticmethod
    def _rank_keep(score: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Keep, per row, the `count` largest entries; ties go to the lower index."""
        m = score.shape[-1]
        # Stable sort of -score keeps ascending index order among equal scores.
        order = torch.sort(-score, dim=-1, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(m).expand_as(order).contiguous())
        return rank < count.view(*count.shape, *([1] * (score.dim() - count.dim())))

    def _top_columns(self, count, last_q, keep_first, e):
        probs = self._last_rows_probs(last_q, e)  # [H, Lq, n]
        col = probs.sum(dim=1)  # [H, n]
        first = torch.arange(self.n).view(1, -1) < self._per_head(keep_first).view(-1, 1)
        col = torch.where(first, torch.tensor(float("inf"), dtype=F64), col)
        return _Set(self._rank_keep(col, self._per_head(count)))

    def _top_diagonals(self, count, last_q, keep_near, e):
        probs = self._last_rows_probs(last_q, e)  # [H, Lq, n]
        H, Lq, n = self.shape
        d = (self.q - self.k).expand(1, Lq, n)  # offsets
        valid = d >= 0
        diag = torch.zeros(H, n, dtype=F64)
        idx = d.clamp(min=0).reshape(1, -1).expand(H, -1)
        diag.scatter_add_(1, idx, (probs * valid).reshape(H, -1))
        near = torch.arange(n).view(1, -1) < self._per_head(keep_near).view(-1, 1)
        diag = torch.where(near, torch.tensor(float("inf"), dtype=F64), diag)
        return _Set(self._rank_keep(diag, self._per_head(count)))

    def _block_grid(self, block: int):
        H, Lq, n = self.shape
        nb = -(-n // block)
        qb = self.qpos.to(I64) // block  # [Lq]
        kb = torch.arange(n) // block  # [n]
        return nb, qb, kb

    def _uniform_int(self, v: torch.Tensor, what: str, e: N.Call) -> int:
        if v.numel() != 1 and not bool((v == v.reshape(-1)[0]).all()):
            raise AttncError(Diagnostic(f"{what} of {e.func}() must be the same for every head "
                                        "in the reference", e.span))
        return int(v.reshape(-1)[0])

    def _eligible(self, nb: int, qb: torch.Tensor, block: int, causal: bool):
        """[QB, KB] key blocks a query block may select: under causality, those holding a key
        at or before the block's last query."""
        qblocks = torch.arange(nb)
        last_q = torch.full((nb,), -1, dtype=I64)
        last_q.scatter_reduce_(0, qb, self.qpos.to(I64), reduce="amax")
        kstart = torch.arange(nb) * block
        el = kstart.view(1, -1) <= last_q.view(-1, 1) if causal else torch.ones(nb, nb,
                                                                               dtype=torch.bool)
        return el & (last_q.view(-1, 1) >= 0), qblocks

    def _top_blocks(self, count, block, causal, e):
        s = self._need_scores(e)
        H, Lq, n = self.shape
        b = self._uniform_int(block, "block", e)
        nb, qb, kb = self._block_grid(b)
        s = s.expand(H, Lq, n)
        # Mean of the logits over each (query block, key block) = mean-pooled Q . mean-pooled K.
        sums = torch.zeros(H, nb, nb, dtype=F64)
        pair = (qb.view(-1, 1) * nb + kb.view(1, -1)).reshape(1, -1).expand(H, -1)
        sums.view(H, -1).scatter_add_(1, pair, s.reshape(H, -1))
        cnt = torch.zeros(nb * nb, dtype=F64)
        cnt.scatter_add_(0, pair[0], torch.ones(Lq * n, dtype=F64))
        mean = sums / cnt.view(nb, nb).clamp(min=1)
        el, _ = self._eligible(nb, qb, b, bool(causal.reshape(-1)[0]))
        mean = torch.where(el, mean, torch.tensor(float("-inf"), dtype=F64))
        keep = self._rank_keep(mean, self._per_head(count).view(H, 1)) & el
        return keep[:, qb.view(-1, 1), kb.view(1, -1)]

    def _gate(self, block, topk, threshold, causal, e):
        b = self._uniform_int(block, "block", e)
        g = self.inputs.gates
        if callable(g) and not isinstance(g, torch.Tensor):
            g = g(b)
        elif isinstance(g, Mapping):
            g = g.get(b)
        H, Lq, n = self.shape
        nb, qb, kb = self._block_grid(b)
        if g is None:
            raise AttncError(Diagnostic(
                f"gate() needs the gate's block scores: pass gates= ([heads, {nb}, {nb}] for "
                f"block {b})", e.span))
        if g.dim() != 3 or g.shape[1:] != (nb, nb) or g.shape[0] not in (1, H):
            raise AttncError(Diagnostic(
                f"gate scores for block {b} must have shape [{H}, {nb}, {nb}], not "
                f"{list(g.shape)}", e.span))
        g = g.to(F64).expand(H, nb, nb)
        el, _ = self._eligible(nb, qb, b, bool(causal.reshape(-1)[0]))
        score = torch.where(el, g, torch.tensor(float("-inf"), dtype=F64))
        keep = el & (g >= _as_float(threshold).reshape(-1, 1, 1))
        k_top = self._per_head(topk)
        ranked = self._rank_keep(score, k_top.view(H, 1))
        keep = keep & (ranked | (k_top.view(H, 1, 1) == 0))
        return keep[:, qb.view(-1, 1), kb.view(1, -1)]

    def _segment(self, x: torch.Tensor, e: N.Call) -> torch.Tensor:
        seg = self.inputs.segments
        if seg is None:
            raise AttncError(Diagnostic(
                "segment() reads segment ids: pass segments= (one id per position)", e.span))
        seg = seg.reshape(-1).to(I64)
        if seg.numel() != self.n:
            raise AttncError(Diagnostic(
                f"segments must have {self.n} entries, not {seg.numel()}", e.span))
        valid = (x >= 0) & (x < self.n)
        return torch.where(valid, seg[x.clamp(0, self.n - 1)], torch.full_like(x, -1))


def _positions(n: int, q_len: int | None, q_start: int | None) -> torch.Tensor:
    if n < 0:
        raise AttncError(f"n must be >= 0, not {n}")
    q_len = n if q_len is None else q_len
    q_start = n - q_len if q_start is None else q_start
    if q_len < 0 or q_start < 0:
        raise AttncError(f"bad query range: start {q_start}, length {q_len} (n = {n})")
    return torch.arange(q_start, q_start + q_len, dtype=I64)


def _resolve(target, name: str | None) -> PatternInfo:
    if isinstance(target, PatternInfo):
        return target
    if isinstance(target, Program):
        if name is None:
            raise AttncError("name the pattern to evaluate")
        return target.pattern(name)
    if isinstance(target, str):
        # A pattern name from the library, or source text defining patterns.
        if name is None:
            return loads("").pattern(target)
        return loads(target).pattern(name)
    raise TypeError(f"cannot evaluate {type(target).__name__}")


def evaluate(
    target: Program | PatternInfo | str,
    name: str | None = None,
    *,
    n: int,
    heads: int | list[int] | torch.Tensor = 1,
    q_len: int | None = None,
    q_start: int | None = None,
    args: Mapping[str, object] | None = None,
    scores: torch.Tensor | None = None,
    gates: GateInput | None = None,
    segments: torch.Tensor | None = None,
) -> Evaluated:
    """Evaluate a pattern into a dense [heads, q_len, n] mask and its bias.

    `heads` is a count (heads 0..heads-1) or the list of head indices. Queries are the last
    `q_len` positions of the n keys (a prefill after a cache) unless `q_start` says otherwise.
    `args` override parameters (Python values, or AST expressions that may use n and h).
    """
    p = _resolve(target, name)
    head_idx = torch.arange(heads) if isinstance(heads, int) else torch.as_tensor(heads)
    qpos = _positions(n, q_len, q_start)
    ev = _Evaluator(n, qpos, head_idx, Inputs(scores, gates, segments))
    call = call_with_args(p, args)
    ev._plan_scope = p.module.scope
    mask, bias = ev.pattern(p, call, {"n": _t(n), "h": ev.h}, None)
    shape = ev.shape
    mask = mask.expand(shape).clone()
    if bias is not None:
        bias = bias.expand(shape).clone()
    return Evaluated(mask, bias, qpos, head_idx)


def mask(target, name: str | None = None, **kw) -> torch.Tensor:
    """The [heads, q_len, n] boolean mask of a pattern (see evaluate)."""
    return evaluate(target, name, **kw).mask


def _gate_rows(gates: GateInput | None, rows: torch.Tensor, H: int) -> GateInput | None:
    """The gate scores of some of a layer's heads (given per evaluated head, or shared)."""
    if gates is None:
        return None

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t[rows] if t.dim() == 3 and t.shape[0] == H and H > 1 else t

    if isinstance(gates, torch.Tensor):
        return pick(gates)
    if isinstance(gates, Mapping):
        return {b: pick(t) for b, t in gates.items()}
    return lambda block: pick(gates(block))


def evaluate_plan(
    program: Program | PlanInfo,
    plan: str | None = None,
    *,
    layer: int,
    n: int,
    q_len: int | None = None,
    q_start: int | None = None,
    scores: torch.Tensor | None = None,
    gates: GateInput | None = None,
    segments: torch.Tensor | None = None,
    heads: list[int] | None = None,
) -> Evaluated:
    """Evaluate one layer of a plan: each query head (all, or those listed in `heads`) with the
    pattern the plan assigns it. `scores` has one row per evaluated head."""
    info = program if isinstance(program, PlanInfo) else program.plan(plan)
    if not 0 <= layer < info.layers:
        raise AttncError(f"plan '{info.name}' has layers 0..{info.layers - 1}, not {layer}")
    qpos = _positions(n, q_len, q_start)
    wanted = list(range(info.heads)) if heads is None else list(heads)
    for h in wanted:
        if not 0 <= h < info.heads:
            raise AttncError(f"plan '{info.name}' has heads 0..{info.heads - 1}, not {h}")
    row = {h: i for i, h in enumerate(wanted)}
    H = len(wanted)
    out_mask = torch.zeros(H, qpos.numel(), n, dtype=torch.bool)
    out_bias: torch.Tensor | None = None
    for a in info.assignments:
        hs = sorted(h for (ly, h) in a.cells if ly == layer and h in row)
        if not hs:
            continue
        rows = torch.tensor([row[h] for h in hs])
        sc = scores[rows] if scores is not None and scores.shape[0] == H else scores
        ev = _Evaluator(n, qpos, torch.tensor(hs), Inputs(sc, _gate_rows(gates, rows, H),
                                                           segments))
        ev._plan_scope = info.module.scope
        m, b = ev.pattern(a.pattern, a.call, {"n": _t(n), "h": ev.h}, None)
        out_mask[rows] = m.expand(ev.shape)
        if b is not None:
            if out_bias is None:
                out_bias = torch.zeros(H, qpos.numel(), n, dtype=F64)
            out_bias[rows] = b.expand(ev.shape)
    return Evaluated(out_mask, out_bias, qpos, torch.tensor(wanted))


__all__ = ["Evaluated", "Inputs", "evaluate", "evaluate_plan", "load", "loads", "mask"]
