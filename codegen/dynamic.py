"""Dynamic selectors: side-tensor slots, their Triton printer, device index builders, attention."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.language as tl
from attnc.compiler import absint
from attnc.compiler.blockmask import BlockMaskIR
from attnc.compiler.ir import Node, Op, PatternIR, Sel, Var, free_vars, has_selector, to_text
from attnc.compiler.numeric import evaluate as num_eval
from attnc.compiler.rules import rewrite

from . import builders as B
from .expr import print_expr
from .gate import BlockGate, eligible

# Side-tensor layout: side[h, slot, i] (int32), one slot per distinct selector (kind and
# parameters; the tested element does not matter), numbered in order of first appearance in
# the simplified mask, then the bias:
#   in_columns    1 where key column i is selected                     (i < n)
#   in_diagonals  1 where diagonal offset i = q - k is selected        (i < n)
#   top_blocks    1 at i = qb * nb + kb for kept (absolute query block, key block) pairs of the
#                 selector's own block size, nb = ceil(n / block)
#   gate          the same layout as top_blocks, for the blocks the learned gate keeps
#   segment       the segment id of position i                         (i < n)
# Out-of-range elements read as not selected (segment: -1), as in attnc.reference.

_PARAM_NAMES = {"n": "n_var", "h": "h"}
SUPPORTED = ("in_columns", "in_diagonals", "top_blocks", "gate", "segment")
# The gate's block scores, as attnc.reference takes them ([H | 1, nb, nb] by absolute block, a
# mapping block size -> tensor, a function of the block size), or a codegen.gate.BlockGate that
# computes them from each batch element's q and k.
GateInput = torch.Tensor | Mapping[int, torch.Tensor] | Callable[[int], torch.Tensor] | BlockGate


@dataclass(frozen=True)
class Slot:
    kind: str
    params: tuple[tuple[str, Node], ...]
    index: int

    def param(self, name: str) -> Node:
        return dict(self.params)[name]


def _exprs(pattern: PatternIR) -> list[Node]:
    out = [rewrite(pattern.mask)]
    if pattern.bias is not None:
        out.append(rewrite(pattern.bias))
    return out


def _memo(pattern: PatternIR, name: str, fn: Callable):
    """fn(pattern), kept on the (frozen, never mutated) pattern object: the builders ask for
    its slots and form on every call, host time that the device would wait for."""
    memo = pattern.__dict__.setdefault("_dynamic_memo", {})
    if name not in memo:
        memo[name] = fn(pattern)
    return memo[name]


def slots(pattern: PatternIR) -> list[Slot]:
    """The pattern's distinct selectors, in slot order."""
    return list(_memo(pattern, "slots", _slots))


def _slots(pattern: PatternIR) -> list[Slot]:
    found: dict[tuple, Slot] = {}
    for e in _exprs(pattern):
        order: list[Sel] = []
        stack = [e]
        seen: set[Node] = set()
        while stack:  # pre-order, left to right
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            if isinstance(x, Sel):
                order.append(x)
            if isinstance(x, Op):
                stack.extend(reversed(x.args))
            elif isinstance(x, Sel):
                kids = [v for _, v in x.params] + ([x.elem] if x.elem is not None else [])
                stack.extend(reversed(kids))
        for s in order:
            if s.kind not in SUPPORTED:  # pragma: no cover - every IR selector is supported
                raise NotImplementedError(
                    f"pattern '{pattern.name}': the {s.kind}() selector has no index builder")
            key = (s.kind, s.params)
            if key not in found:
                found[key] = Slot(s.kind, s.params, len(found))
    return list(found.values())


def selector_printer(pattern: PatternIR):
    """The `sel` hook of codegen.expr.print_expr: each selector as a Triton expression that reads
    its slot of the side tensor (names in scope: q_pos, k_pos, h, n_var, SIDE, s_side_h,
    s_side_s)."""
    table = {(s.kind, s.params): s for s in slots(pattern)}

    def sel(x: Sel, elem: str | None) -> str:
        s = table[(x.kind, x.params)]
        base = f"SIDE + h * s_side_h + {s.index} * s_side_s"
        if x.kind in ("top_blocks", "gate"):
            b = f"tl.maximum({print_expr(x.param('block'), _PARAM_NAMES)}, 1)"
            nb = f"(n_var + {b} - 1) // {b}"
            i = f"(q_pos // {b}) * ({nb}) + k_pos // {b}"
            return f"(tl.load({base} + {i}) != 0)"
        assert elem is not None
        ok = f"((({elem}) >= 0) & (({elem}) < n_var))"
        idx = f"tl.where({ok}, {elem}, 0)"
        if x.kind == "segment":
            return f"tl.load({base} + {idx}, mask={ok}, other=-1)"
        return f"(tl.load({base} + {idx}, mask={ok}, other=0) != 0)"

    return sel


# ---------------------------------------------------------------- index sets


@dataclass
class IndexSets:
    """What the builders chose for one batch element: per slot its data (bool flags [H, n] for
    columns and diagonals, [H, nb, nb] for top_blocks and gate, int ids [n] for segment), the
    side tensor
    the kernel reads, and the block lists (FlexAttention's layout, no batch dimension: trimmed
    in `block_mask`, full width in `flex`)."""

    slots: list[Slot]
    data: list[torch.Tensor]
    side: torch.Tensor
    block_mask: dict[str, torch.Tensor]
    flex: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def of(self, kind: str) -> torch.Tensor:
        for s, d in zip(self.slots, self.data, strict=True):
            if s.kind == kind:
                return d
        raise KeyError(kind)


def _evaluate_per_head(e: Node, n: int, H: int) -> list:
    return [np.asarray(num_eval(e, {"n": np.int64(n), "h": np.int64(h)})).reshape(-1)[0]
            for h in range(H)]


@functools.lru_cache(maxsize=1024)
def _per_head_values(e: Node, n: int, H: int) -> tuple[int, ...]:
    # IR nodes are frozen (hashable): a parameter is evaluated once per (n, heads), not on
    # every call (host time the device would wait for).
    return tuple(int(v) for v in _evaluate_per_head(e, n, H))


@functools.lru_cache(maxsize=1024)
def _per_head_floats(e: Node, n: int, H: int) -> tuple[float, ...]:
    return tuple(float(v) for v in _evaluate_per_head(e, n, H))


@functools.lru_cache(maxsize=1024)
def _threshold32(e: Node, n: int, H: int) -> tuple[float, ...]:
    """Per head, the smallest float32 not below the float64 threshold e: for float32 scores,
    score >= it exactly when score >= the threshold in float64 (NaN stays NaN)."""
    vals = np.array(_per_head_floats(e, n, H), dtype=np.float64)
    with np.errstate(over="ignore"):
        t32 = vals.astype(np.float32)
    below = t32.astype(np.float64) < vals
    t32[below] = np.nextafter(t32[below], np.float32(np.inf))
    return tuple(float(t) for t in t32)


def _per_head(e: Node, n: int, H: int) -> torch.Tensor:
    """A selector parameter (an expression of n and h) as one int64 per head, evaluated on the
    host and kept there: the builders read maxima from it without waiting for the device."""
    return torch.tensor(_per_head_values(e, n, H), dtype=torch.int64)


def _gate_scores(gates: GateInput | None, q: torch.Tensor, k: torch.Tensor, q_start: int,
                 blk: int, nb: int) -> torch.Tensor:
    """The gate's block scores [H, nb, nb] for one batch element."""
    H = q.shape[0]
    if gates is None:
        raise ValueError(f"gate() needs the gate's block scores: pass gates= ([heads, {nb}, "
                         f"{nb}] for block {blk}, or a codegen.gate.BlockGate)")
    if isinstance(gates, BlockGate):
        g = gates(q, k, q_start=q_start)
    elif isinstance(gates, torch.Tensor):
        g = gates
    elif isinstance(gates, Mapping):
        g = gates.get(blk)
    else:
        g = gates(blk)
    if g is None or g.dim() != 3 or g.shape[1:] != (nb, nb) or g.shape[0] not in (1, H):
        got = None if g is None else list(g.shape)
        raise ValueError(f"gate scores for block {blk} must have shape [{H}, {nb}, {nb}], "
                         f"not {got}")
    return g.to(device=q.device).expand(H, nb, nb)


def _gate_keep(s: Slot, g: torch.Tensor, bm: BlockMaskIR, blk: int, Lq: int) -> torch.Tensor:
    """attnc.reference's gate(): eligible blocks scoring >= threshold and, when topk > 0,
    among the topk best eligible of their row (ties to the lower key block)."""
    H, nb, _ = g.shape
    dev = g.device
    causal = bool(_uniform(s.param("causal"), bm.n_var, H, "gate's causal"))
    el = eligible(nb, blk, bm.q_start, Lq, causal, dev)
    topk = _per_head(s.param("topk"), bm.n_var, H)
    keep = el & _at_least(g, s.param("threshold"), bm.n_var, H)
    if int(topk.max()) == 0:  # threshold only: no ranking (host-known, no wait)
        return keep
    score = torch.where(el, g.float(), torch.full((), float("-inf"), device=dev))
    ranked = B.keep_top(B.rank_keys(score), topk) | B.to_device(topk == 0, dev).view(H, 1, 1)
    return keep & ranked


def _at_least(g: torch.Tensor, e: Node, n: int, H: int) -> torch.Tensor:
    """g [H, nb, nb] >= the per-head threshold, as the reference compares: in float64. For
    float32 scores the same test is g >= the smallest float32 not below the threshold, which
    spares a float64 copy of the scores (half a gigabyte per head group at 128k)."""
    if g.dtype != torch.float32:
        vals = torch.tensor(_per_head_floats(e, n, H), dtype=torch.float64)
        return g.double() >= B.to_device(vals, g.device).view(H, 1, 1)
    t32 = torch.tensor(_threshold32(e, n, H), dtype=torch.float32)
    return g >= B.to_device(t32, g.device).view(H, 1, 1)


def _uniform(e: Node, n: int, H: int, what: str) -> int:
    v = _per_head(e, n, H)
    if bool((v != v[0]).any()):
        raise NotImplementedError(f"{what} must be the same for every head")
    return int(v[0])


def _select(q: torch.Tensor, k: torch.Tensor, bm: BlockMaskIR, sl: list[Slot], sm_scale: float,
            segments: torch.Tensor | None, extra: dict,
            gates: GateInput | None = None) -> list[torch.Tensor]:
    H, Lq, _ = q.shape
    n = k.shape[1]
    dev = q.device
    scores: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    out = []
    for s in sl:
        if s.kind in ("in_columns", "in_diagonals"):
            last_q = _per_head(s.param("last_q"), bm.n_var, H)
            key = tuple(last_q.tolist())
            if key not in scores:
                scores[key] = B.last_rows_scores(q, k, last_q, bm.q_start, sm_scale)
            col, diag = scores[key]
            score = col if s.kind == "in_columns" else diag
            keep_name = "keep_first" if s.kind == "in_columns" else "keep_near"
            score, keys = B.forced_keys(score, _per_head(s.param(keep_name), bm.n_var, H))
            extra[f"score{s.index}"] = score
            out.append(B.keep_top(keys, _per_head(s.param("count"), bm.n_var, H)))
        elif s.kind == "top_blocks":
            blk = max(_uniform(s.param("block"), bm.n_var, H, "top_blocks' block"), 1)
            causal = bool(_uniform(s.param("causal"), bm.n_var, H, "top_blocks' causal"))
            keys, qb0 = B.block_keys(q, k, bm.q_start, blk, causal, sm_scale)
            nb = keys.shape[-1]
            count = _per_head(s.param("count"), bm.n_var, H)
            kept = B.keep_top(keys, count)
            if causal:
                last = torch.clamp((torch.arange(qb0, nb, device=dev) + 1) * blk - 1,
                                   max=bm.q_start + Lq - 1)
                kept &= torch.arange(nb, device=dev).view(1, -1) * blk <= last.view(-1, 1)
            full = torch.zeros(H, nb, nb, dtype=torch.bool, device=dev)
            full[:, qb0:] = kept
            out.append(full)
        elif s.kind == "gate":
            blk = max(_uniform(s.param("block"), bm.n_var, H, "gate's block"), 1)
            nb = -(-n // blk)
            g = _gate_scores(gates, q, k, bm.q_start, blk, nb)
            extra[f"score{s.index}"] = g
            out.append(_gate_keep(s, g, bm, blk, Lq))
        elif s.kind == "segment":
            if segments is None:
                raise ValueError("segment() reads segment ids: pass segments= (one per key)")
            seg = segments.reshape(-1).to(device=dev, dtype=torch.int32)
            if seg.numel() != n:
                raise ValueError(f"segments must have {n} entries, not {seg.numel()}")
            out.append(seg)
        else:  # pragma: no cover - slots() refuses the rest
            raise AssertionError(s.kind)
    return out


def _side(sl: list[Slot], data: list[torch.Tensor], H: int, n: int, device) -> torch.Tensor:
    if not sl:
        return torch.zeros(1, 1, 1, dtype=torch.int32, device=device)
    per_head = any(s.kind != "segment" for s in sl)
    L = max(d[0].numel() if s.kind != "segment" else d.numel() for s, d in zip(sl, data,
                                                                                strict=True))
    side = torch.zeros(H if per_head else 1, len(sl), L, dtype=torch.int32, device=device)
    for s, d in zip(sl, data, strict=True):
        if s.kind == "segment":
            side[:, s.index, : d.numel()] = d.view(1, -1)
        else:
            flat = d.reshape(H, -1)
            side[:, s.index, : flat.shape[1]] = flat.to(torch.int32)
    return side


# ---------------------------------------------------------------- block classification


_STATIC_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


class _Blocks:
    """Three-valued evaluation of the mask over kernel blocks: (may be true, may be false) per
    (head, query block, key block). Static subexpressions by abstract interpretation (cached:
    the static part is decided once per shape), selectors from their run-time data."""

    def __init__(self, bm: BlockMaskIR, H: int, n: int, sl: list[Slot], data, device):
        self.bm, self.H, self.n, self.device = bm, H, n, device
        BM, BN = bm.schedule.block_m, bm.schedule.block_n
        self.QB, self.KB = -(-bm.q_len // BM), -(-n // BN)
        qb, kb = np.arange(self.QB), np.arange(self.KB)
        self.q0 = bm.q_start + qb * BM
        self.q1 = np.minimum(self.q0 + BM - 1, bm.q_start + bm.q_len - 1)
        self.k0 = kb * BN
        self.k1 = np.minimum(self.k0 + BN - 1, n - 1)
        self.tq0, self.tq1, self.tk0, self.tk1 = (B.to_device(torch.from_numpy(x), device)
                                                  for x in (self.q0, self.q1, self.k0, self.k1))
        self.table = {(s.kind, s.params): d for s, d in zip(sl, data, strict=True)}

    def both(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.ones((), dtype=torch.bool, device=self.device)
        return t, t

    def static(self, e: Node) -> tuple[torch.Tensor, torch.Tensor]:
        bm = self.bm
        key = (to_text(e), bm.q_start, bm.q_len, self.n, bm.n_var, bm.schedule, self.H,
               str(self.device))
        if key not in _STATIC_CACHE:
            heads = range(self.H) if "h" in free_vars(e) else [0]
            ts, fs = [], []
            for h in heads:
                v = absint.Evaluator(self.q0[:, None], self.q1[:, None], self.k0[None, :],
                                     self.k1[None, :], h, bm.n_var).eval(e)
                shape = (self.QB, self.KB)
                ts.append(np.broadcast_to(v.t, shape))
                fs.append(np.broadcast_to(v.f, shape))
            _STATIC_CACHE[key] = (B.to_device(torch.from_numpy(np.stack(ts)), self.device),
                                  B.to_device(torch.from_numpy(np.stack(fs)), self.device))
        return _STATIC_CACHE[key]

    def eval(self, e: Node) -> tuple[torch.Tensor, torch.Tensor]:
        if not has_selector(e):
            return self.static(e)
        if isinstance(e, Op) and e.op in ("and", "or"):
            vals = [self.eval(a) for a in e.args]
            t, f = vals[0]
            for t2, f2 in vals[1:]:
                if e.op == "and":
                    t, f = t & t2, f | f2
                else:
                    t, f = t | t2, f & f2
            return t, f
        if isinstance(e, Op) and e.op == "not":
            t, f = self.eval(e.args[0])
            return f, t
        if isinstance(e, Sel):
            return self.selector(e)
        if isinstance(e, Op) and e.op in ("eq", "ne") and all(
                isinstance(a, Sel) and a.kind == "segment" for a in e.args):
            return self.segments(e)
        return self.both()

    def selector(self, e: Sel):
        d = self.table[(e.kind, e.params)]
        BN = self.bm.schedule.block_n
        if e.kind == "in_columns" and e.elem == Var("k"):
            pad = self.KB * BN - self.n
            sel = torch.nn.functional.pad(d, (0, pad), value=False).view(self.H, 1, self.KB, BN)
            valid = (torch.arange(self.KB * BN, device=self.device) < self.n).view(1, 1, -1, BN)
            return sel.any(-1), (~sel & valid).any(-1)
        if e.kind == "in_diagonals" and e.elem == Op("sub", (Var("q"), Var("k"))):
            cnt = torch.nn.functional.pad(d.to(torch.int32).cumsum(-1, dtype=torch.int32),
                                          (1, 0))
            lo = self.tq0.view(-1, 1) - self.tk1.view(1, -1)
            hi = self.tq1.view(-1, 1) - self.tk0.view(1, -1)
            clo = lo.clamp(0, d.shape[-1])
            chi = (hi + 1).clamp(0, d.shape[-1])
            got = cnt[:, chi.reshape(-1)] - cnt[:, clo.reshape(-1)]
            got = got.view(self.H, self.QB, self.KB)
            return got > 0, got < (hi - lo + 1).view(1, self.QB, self.KB)
        if e.kind in ("top_blocks", "gate"):
            blk = max(_uniform(e.param("block"), self.bm.n_var, self.H, "block"), 1)
            r0, r1 = self.tq0 // blk, self.tq1 // blk
            c0, c1 = self.tk0 // blk, self.tk1 // blk
            BM = self.bm.schedule.block_m
            if blk == BM == BN and self.bm.q_start % blk == 0:
                t = d[:, r0][:, :, c0]
                return t, ~t
            pre = torch.nn.functional.pad(d.to(torch.int32).cumsum(1, dtype=torch.int32)
                                          .cumsum(2, dtype=torch.int32), (1, 0, 1, 0))
            R0, R1 = r0.view(-1, 1), (r1 + 1).view(-1, 1)
            C0, C1 = c0.view(1, -1), (c1 + 1).view(1, -1)
            got = pre[:, R1, C1] - pre[:, R0, C1] - pre[:, R1, C0] + pre[:, R0, C0]
            return got > 0, got < (R1 - R0) * (C1 - C0)
        return self.both()

    def segments(self, e: Op):
        a, b = e.args
        if (a.elem, b.elem) not in ((Var("q"), Var("k")), (Var("k"), Var("q"))):
            return self.both()
        seg = self.table[(a.kind, a.params)].to(torch.int64)
        BM, BN = self.bm.schedule.block_m, self.bm.schedule.block_n

        def ranges(x: torch.Tensor, size: int, count: int):
            x = torch.nn.functional.pad(x, (0, count * size - x.numel()), mode="replicate") \
                if count * size > x.numel() else x[: count * size]
            x = x.view(count, size)
            return x.amin(-1), x.amax(-1)

        qlo, qhi = ranges(seg[self.bm.q_start:].view(1, -1).float(), BM, self.QB)
        klo, khi = ranges(seg.view(1, -1).float(), BN, self.KB)
        qlo, qhi, klo, khi = qlo.view(-1, 1), qhi.view(-1, 1), klo.view(1, -1), khi.view(1, -1)
        overlap = (qlo <= khi) & (klo <= qhi)
        single = (qlo == qhi) & (klo == khi) & (qlo == klo)
        t, f = overlap.unsqueeze(0), (~single).unsqueeze(0)
        return (t, f) if e.op == "eq" else (f, t)


def _csr(mask: torch.Tensor, trim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, QB, KB] bool -> counts [H, QB] and ascending indices [H, QB, W] (int32; W = the
    longest row when trimmed, else KB; entries past a row's count are 0)."""
    num = mask.sum(-1, dtype=torch.int32)
    KB = mask.shape[-1]
    # Trimming reads the longest row on the host (a wait for the device), which a CUDA graph
    # cannot capture: capture keeps the full width.
    trim = trim and not (mask.is_cuda and torch.cuda.is_current_stream_capturing())
    w = max(int(num.max().item()) if num.numel() else 0, 1) if trim else KB
    pos = mask.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1
    pos = torch.where(mask, pos, w)  # dropped below
    out = torch.zeros(*mask.shape[:-1], w + 1, dtype=torch.int32, device=mask.device)
    idx = torch.arange(KB, dtype=torch.int32, device=mask.device).expand(mask.shape)
    out.scatter_(-1, pos.long(), idx)
    return num.contiguous(), out[..., :w].contiguous()


def block_lists(bm: BlockMaskIR, H: int, n: int, sl: list[Slot], data, device,
                mask: Node | None = None, flex: bool = True) -> tuple[dict, dict]:
    """Partial and full key blocks per query block: (trimmed lists for the kernel, full-width
    lists for FlexAttention; empty without `flex`)."""
    ev = _Blocks(bm, H, n, sl, data, device)
    t, f = ev.eval(rewrite(bm.pattern.mask) if mask is None else mask)
    shape = (H, ev.QB, ev.KB)
    t, f = t.expand(shape), f.expand(shape)
    partial, full = t & f, t & ~f
    if n % bm.schedule.block_n:
        # The last key block runs past n: never full, since the kernel loads full blocks
        # without masks (as compiler.blockmask rules for static patterns). From the block
        # bounds already on the device: nothing here may wait for or write from the host
        # (CUDA graph capture).
        whole = ((ev.tk1 - ev.tk0 + 1) == bm.schedule.block_n).view(1, 1, -1)
        full, partial = full & whole, partial | (full & ~whole)
    out: dict[str, torch.Tensor] = {}
    flex_lists: dict[str, torch.Tensor] = {}
    for name, m in (("kv", partial), ("full_kv", full)):
        out[f"{name}_num_blocks"], out[f"{name}_indices"] = _csr(m, True)
        if flex:
            flex_lists[f"{name}_num_blocks"], flex_lists[f"{name}_indices"] = _csr(m, False)
    return out, flex_lists


def build_index(q: torch.Tensor, k: torch.Tensor, bm: BlockMaskIR, *,
                sm_scale: float | None = None, segments: torch.Tensor | None = None,
                lists: bool = True, gates: GateInput | None = None,
                side: bool = True, flex: bool = True) -> IndexSets:
    """Run the pattern's index builders for one batch element: q [H, Lq, D], k [Hkv, n, D].
    `gates`: the learned gate's block scores for gate() (see GateInput). side=False skips the
    side tensor (the vertical-slash kernel reads packed flags instead); flex=False skips the
    full-width lists for FlexAttention (the kernel reads the trimmed ones)."""
    H, Lq, D = q.shape
    n = k.shape[1]
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    sl = slots(bm.pattern)
    extra: dict[str, torch.Tensor] = {}
    data = _select(q, k, bm, sl, sm_scale, segments, extra, gates)
    side_t = _side(sl, data, H, n, q.device) if side or lists else \
        torch.zeros(1, 1, 1, dtype=torch.int32, device=q.device)
    if lists:
        trimmed, flex_lists = block_lists(bm, H, n, sl, data, q.device, flex=flex)
    else:
        trimmed, flex_lists = {}, {}
    return IndexSets(sl, data, side_t, trimmed, flex_lists, extra)


# ---------------------------------------------------------------- vertical-slash fast path


def vertical_slash_form(pattern: PatternIR) -> tuple[Sel, Sel] | None:
    """(columns, diagonals) when the mask is exactly causal & (k in C | q - k in D): then the
    kernel visits diagonal ranges and gathered columns instead of key blocks."""
    return _memo(pattern, "vs_form", _vs_form)


def _vs_form(pattern: PatternIR) -> tuple[Sel, Sel] | None:
    m = rewrite(pattern.mask)
    if pattern.bias is not None or not (isinstance(m, Op) and m.op == "and"
                                        and len(m.args) == 2):
        return None
    causal = Op("le", (Var("k"), Var("q")))
    rest = [a for a in m.args if a != causal]
    if len(rest) != 1 or not (isinstance(rest[0], Op) and rest[0].op == "or"
                              and len(rest[0].args) == 2):
        return None
    col = [a for a in rest[0].args if isinstance(a, Sel) and a.kind == "in_columns"
           and a.elem == Var("k")]
    dia = [a for a in rest[0].args if isinstance(a, Sel) and a.kind == "in_diagonals"
           and a.elem == Op("sub", (Var("q"), Var("k")))]
    if len(col) != 1 or len(dia) != 1:
        return None
    return col[0], dia[0]


@triton.jit
def _vs_columns_kernel(COLS, NCOLS, AHI, OUT, NOUT, s_c_h, s_a_h, s_o_h, s_o_m, s_no_h,
                       Q_START, Q_LEN, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """Per query block: the selected columns c <= q1 that no diagonal group's key range covers
    (covered: the group with the largest dlo <= q1 - c has dhi >= q0 - c), compacted."""
    h = tl.program_id(0).to(tl.int64)
    qb = tl.program_id(1).to(tl.int64)
    q0 = Q_START + qb * BLOCK_M
    q1 = tl.minimum(q0 + BLOCK_M - 1, Q_START + Q_LEN - 1)
    ncol = tl.load(NCOLS + h)
    base = 0
    for c0 in range(0, ncol, CHUNK):
        i = c0 + tl.arange(0, CHUNK)
        c = tl.load(COLS + h * s_c_h + i, mask=i < ncol, other=0).to(tl.int64)
        ok = (i < ncol) & (c <= q1)
        a = tl.load(AHI + h * s_a_h + tl.where(ok, q1 - c, 0), mask=ok, other=-1)
        keep = ok & (a < q0 - c)
        pos = base + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(OUT + h * s_o_h + qb * s_o_m + pos, c.to(tl.int32), mask=keep)
        base += tl.sum(keep.to(tl.int32), 0)
    tl.store(NOUT + h * s_no_h + qb, base)


VS_PAD = 256  # bit of diagonal offset d in the packed flags: d + VS_PAD (offsets >= -VS_PAD)

VS_TEMPLATE = '''"""attnc vertical-slash kernel: diagonal ranges and gathered columns. key {key}"""
import triton
import triton.language as tl
{prelude}

@triton.jit
def vs_mask(s, t0, k_idx, kk, k_ok, full, q_pos, row_ok, h, DBITS, CFLAGS, s_db_h, s_cf_h,
            BAND: tl.constexpr, BLOCK_N: tl.constexpr):
    # The mask is causal & (k in columns | q - k in diagonals) (vertical_slash_form); a full
    # tile keeps everything.
    # Positions fit int32 (the flags are [H, n] tensors): half the work of int64 per pair.
    keep = k_ok[None, :] & row_ok[:, None] & \
        (k_idx.to(tl.int32)[None, :] <= q_pos.to(tl.int32))
    if BAND:
        # Keys t0 + j: offset q - t0 - j. Row q needs the bits of offsets
        # [q - t0 - BLOCK_N + 1, q - t0]: a few packed words per row, not a load per pair.
        bit0 = (q_pos - t0 - (BLOCK_N - 1) + {pad}).to(tl.int32)  # [BM, 1], {pad} = VS_PAD
        w = bit0 >> 5
        if BLOCK_N <= 64:
            # Per row, the 64 bits from bit0 on in one uint64 (three words funnel-shifted),
            # then one shift per pair: bit BLOCK_N - 1 - j belongs to key t0 + j.
            sh = (bit0 & 31).to(tl.uint64)
            w0 = tl.load(DBITS + h * s_db_h + w).to(tl.uint32, bitcast=True).to(tl.uint64)
            w1 = tl.load(DBITS + h * s_db_h + w + 1).to(tl.uint32, bitcast=True).to(tl.uint64)
            w2 = tl.load(DBITS + h * s_db_h + w + 2).to(tl.uint32, bitcast=True).to(tl.uint64)
            # (w2 << 1) << (63 - sh): no shift by 64 when sh is 0.
            win = ((w0 | (w1 << 32)) >> sh) | ((w2 << 1) << (63 - sh))
            jj = (BLOCK_N - 1 - tl.arange(0, BLOCK_N)).to(tl.uint64)[None, :]
            diag = ((win >> jj) & 1) != 0
        else:
            bb = (bit0 & 31) + (BLOCK_N - 1 - tl.arange(0, BLOCK_N))[None, :]  # [BM, BN]
            sel = bb >> 5
            word = tl.zeros_like(bb)
            for i in tl.static_range((BLOCK_N + 30) // 32 + 1):
                wi = tl.load(DBITS + h * s_db_h + w + i)
                word = tl.where(sel == i, wi, word)
            diag = ((word >> (bb & 31)) & 1) != 0
        col = tl.load(CFLAGS + h * s_cf_h + kk, mask=k_ok, other=0) != 0
        keep = keep & (diag | col[None, :])
    return tl.where(keep | full, s, float("-inf"))


@triton.jit
def vs_tile(acc, l_i, m_i, q, t0, k_idx, k_ok, full, q_pos, row_ok, h, hk, b, qk_scale,
            K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, DBITS, CFLAGS, s_db_h, s_cf_h, KD, VD,
            BAND: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
            UPCAST: tl.constexpr, IEEE: tl.constexpr, BRANCH: tl.constexpr,
            DESC: tl.constexpr):
    # The loads and the product do not depend on `full` (a run-time flag), so the loops that
    # call this keep one body and Triton software-pipelines their loads; only the predicate
    # sits behind the branch.
    offs_d = tl.arange(0, HEAD_DIM)
    kk = tl.where(k_ok, k_idx, 0)
    if DESC:
        # A diagonal range's keys are contiguous from t0 (any row, not block-aligned): one
        # bulk copy per tile through the [Hkv, n, D] descriptors. Rows past the range are
        # real keys that the predicate drops (k_ok); rows past n come back as zeros.
        r0 = tl.cast(t0, tl.int32)  # a plain int under the interpreter
        k = KD.load([tl.cast(hk, tl.int32), r0, 0]).reshape([BLOCK_N, HEAD_DIM])
        v = VD.load([tl.cast(hk, tl.int32), r0, 0]).reshape([BLOCK_N, HEAD_DIM])
    else:
        k = tl.load(K + b * sk_b + hk * sk_h + kk[:, None] * sk_n + offs_d[None, :],
                    mask=k_ok[:, None], other=0.0)
        v = tl.load(V + b * sv_b + hk * sv_h + kk[:, None] * sv_n + offs_d[None, :],
                    mask=k_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    # BRANCH: evaluate the predicate in partial tiles only (a branch in the loop body), else
    # in every tile (no branch; full tiles keep everything through `full`).
    if BRANCH:
        if not full:
            s = vs_mask(s, t0, k_idx, kk, k_ok, full, q_pos, row_ok, h, DBITS, CFLAGS, s_db_h,
                        s_cf_h, BAND, BLOCK_N)
    else:
        s = vs_mask(s, t0, k_idx, kk, k_ok, full, q_pos, row_ok, h, DBITS, CFLAGS, s_db_h,
                    s_cf_h, BAND, BLOCK_N)
    return attnc_update(acc, l_i, m_i, s, v, qk_scale, True, IEEE)


@triton.jit
def attnc_fwd(Q, K, V, O, LSE, GLO, GHI, DCOUNT, NGROUPS, COLS, NCOLS, DBITS, CFLAGS, KD, VD,
              sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m, sl_b, sl_h,
              s_g_h, s_gf_h, s_c_h, s_c_m, s_nc_h, s_db_h, s_cf_h,
              sm_scale, Q_LEN, Q_START, H, GROUP,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr, BRANCH: tl.constexpr = True,
              TMA: tl.constexpr = 0):
    # Last query blocks first (they visit the most keys): less tail in the last wave.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = offs_m < Q_LEN
    q_pos = (Q_START + offs_m).to(tl.int64)[:, None]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_m + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    LOG2E: tl.constexpr = 1.4426950408889634
    qk_scale = sm_scale * LOG2E
    q0 = (Q_START + pid_m * BLOCK_M).to(tl.int64)
    q1 = tl.minimum(q0 + BLOCK_M - 1, Q_START + Q_LEN - 1).to(tl.int64)
    complete = (q0 + BLOCK_M - 1) <= (Q_START + Q_LEN - 1)
    # Diagonal groups: selected offsets [dlo, dhi] whose key ranges [q0 - dhi, q1 - dlo] are
    # disjoint for every query block; tiles start at the range's first key (not block-aligned).
    n_groups = tl.load(NGROUPS + h)
    for g in range(0, n_groups):
        dlo = tl.load(GLO + h * s_g_h + g).to(tl.int64)
        dhi = tl.load(GHI + h * s_g_h + g).to(tl.int64)
        lo = tl.maximum(q0 - dhi, 0)
        hi = tl.minimum(q1 - dlo, q1)
        # Full when every offset the tile spans, [q0 - t0 - BLOCK_N + 1, q1 - t0], is
        # selected (prefix counts of the selected offsets). The counts of the next tile are
        # loaded one step ahead, so the branch never waits on memory.
        c_hi_n = tl.load(DCOUNT + h * s_gf_h + tl.maximum(q1 - lo + 1, 0))
        c_lo_n = tl.load(DCOUNT + h * s_gf_h + tl.maximum(q0 - lo - BLOCK_N + 1, 0))
        for t0 in range(lo, hi + 1, BLOCK_N):
            c_hi = c_hi_n
            c_lo = c_lo_n
            c_hi_n = tl.load(DCOUNT + h * s_gf_h + tl.maximum(q1 - t0 - BLOCK_N + 1, 0))
            c_lo_n = tl.load(DCOUNT + h * s_gf_h + tl.maximum(q0 - t0 - 2 * BLOCK_N + 1, 0))
            k_idx = t0 + offs_n
            k_ok = k_idx <= hi
            d_lo = q0 - (t0 + BLOCK_N - 1)
            d_hi = q1 - t0
            full = complete & (t0 + BLOCK_N - 1 <= hi) & (d_lo >= 0) & \
                ((c_hi - c_lo) == (d_hi - d_lo + 1))
            acc, l_i, m_i = vs_tile(acc, l_i, m_i, q, t0, k_idx, k_ok, full, q_pos, row_ok, h,
                                    hk, b, qk_scale, K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                                    DBITS, CFLAGS, s_db_h, s_cf_h, KD, VD, True, BLOCK_N,
                                    HEAD_DIM, UPCAST, IEEE, BRANCH, TMA != 0)
    # Selected columns outside every diagonal range, gathered BLOCK_N at a time (ascending).
    n_cols = tl.load(NCOLS + h * s_nc_h + pid_m)
    for c0 in range(0, n_cols, BLOCK_N):
        i = c0 + offs_n
        k_ok = i < n_cols
        k_idx = tl.load(COLS + h * s_c_h + pid_m * s_c_m + i, mask=k_ok, other=0).to(tl.int64)
        full = complete & (c0 + BLOCK_N <= n_cols) & \
            (tl.max(tl.where(k_ok, k_idx, 0), 0) <= q0)
        # Gathered columns are selected: only causality can drop a pair.
        acc, l_i, m_i = vs_tile(acc, l_i, m_i, q, c0, k_idx, k_ok, full, q_pos, row_ok, h, hk, b,
                                qk_scale, K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                                DBITS, CFLAGS, s_db_h, s_cf_h, KD, VD, False, BLOCK_N,
                                HEAD_DIM, UPCAST, IEEE, BRANCH, False)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out = tl.where(empty[:, None], 0.0, out)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / LOG2E)
    tl.store(O + b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_m + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b * sl_b + h * sl_h + offs_m, lse, mask=row_ok)
'''


def vs_kernel_source(pattern: PatternIR) -> str:
    """The vertical-slash kernel for a pattern of vertical_slash_form (its predicate is that
    form, evaluated from the packed flags)."""
    from .expr import PRELUDE

    if vertical_slash_form(pattern) is None:
        raise ValueError(f"pattern '{pattern.name}' is not causal & (columns | diagonals)")
    return VS_TEMPLATE.format(key=pattern.key, prelude=PRELUDE, pad=VS_PAD)




@triton.jit
def _vs_plan_kernel(COLS, DIAGS, CNT, GLO, GHI, NG, AHI, CLIST, NCOLS, DBITS,
                    s_c_h, s_d_h, s_cnt_h, s_g_h, s_a_h, s_cl_h, s_db_h,
                    N, G, C, PAD_WORDS, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """One program per head builds the vertical-slash plan from the column and diagonal flags
    in three passes over the offsets (one launch instead of a chain of small torch ops, whose
    launches cost the host more than their device time; docs/BENCHMARKS.md):
    1. prefix counts of the selected diagonals, the selected columns compacted, the diagonal
       flags packed 32 per word;
    2. diagonal groups: a selected offset starts a group when no selected offset lies within
       BLOCK_M below it and ends one likewise (two runs merge when their key ranges touch in a
       full query block); starts and ends compacted; per offset x, the index of the group
       with the largest start <= x;
    3. that index replaced by the group's end (ahi[x], -1 before the first group).
    Each pass reads what others threads wrote in the one before: a barrier between them."""
    h = tl.program_id(0).to(tl.int64)
    tl.store(CNT + h * s_cnt_h, 0)
    carry = 0
    ccarry = 0
    for c0 in range(0, N, CHUNK):
        i = c0 + tl.arange(0, CHUNK)
        ok = i < N
        d = tl.load(DIAGS + h * s_d_h + i, mask=ok, other=0).to(tl.int32)
        tl.store(CNT + h * s_cnt_h + i + 1, carry + tl.cumsum(d, 0), mask=ok)
        carry += tl.sum(d, 0)
        c = tl.load(COLS + h * s_c_h + i, mask=ok, other=0).to(tl.int32)
        pos = ccarry + tl.cumsum(c, 0) - 1
        tl.store(CLIST + h * s_cl_h + pos, i, mask=(c > 0) & (pos < C))
        ccarry += tl.sum(c, 0)
        # Bit i % 32 of word PAD_WORDS + i // 32 (CHUNK is a multiple of 32).
        bits = d.to(tl.int64) << (i % 32).to(tl.int64)
        w = tl.sum(tl.reshape(bits, [CHUNK // 32, 32]), 1)
        w = tl.where(w >= 2147483648, w - 4294967296, w).to(tl.int32)
        j = c0 // 32 + tl.arange(0, CHUNK // 32)
        tl.store(DBITS + h * s_db_h + PAD_WORDS + j, w, mask=j * 32 < N)
    tl.store(NCOLS + h, tl.minimum(ccarry, C))
    for f0 in range(0, C, CHUNK):
        f = f0 + tl.arange(0, CHUNK)
        tl.store(CLIST + h * s_cl_h + f, tl.full([CHUNK], 0, tl.int32) + N,
                 mask=(f < C) & (f >= ccarry))
    tl.debug_barrier()
    scarry = 0
    ecarry = 0
    for c0 in range(0, N, CHUNK):
        i = c0 + tl.arange(0, CHUNK)
        ok = i < N
        d = tl.load(DIAGS + h * s_d_h + i, mask=ok, other=0).to(tl.int32) > 0
        base = CNT + h * s_cnt_h
        below = tl.load(base + i, mask=ok, other=0) - tl.load(base + tl.maximum(i - BLOCK_M, 0),
                                                              mask=ok, other=0)
        above = tl.load(base + tl.minimum(i + BLOCK_M + 1, N), mask=ok, other=0) \
            - tl.load(base + i + 1, mask=ok, other=0)
        st = ok & d & (below == 0)
        en = ok & d & (above == 0)
        sp = scarry + tl.cumsum(st.to(tl.int32), 0) - 1
        ep = ecarry + tl.cumsum(en.to(tl.int32), 0) - 1
        tl.store(GLO + h * s_g_h + sp, i, mask=st)
        tl.store(GHI + h * s_g_h + ep, i, mask=en)
        tl.store(AHI + h * s_a_h + i, sp, mask=ok)
        scarry += tl.sum(st.to(tl.int32), 0)
        ecarry += tl.sum(en.to(tl.int32), 0)
    tl.store(NG + h, scarry)
    for f0 in range(0, G, CHUNK):
        f = f0 + tl.arange(0, CHUNK)
        fill = tl.full([CHUNK], 0, tl.int32) + N
        tl.store(GLO + h * s_g_h + f, fill, mask=(f < G) & (f >= scarry))
        tl.store(GHI + h * s_g_h + f, fill, mask=(f < G) & (f >= scarry))
    tl.debug_barrier()
    for c0 in range(0, N, CHUNK):
        i = c0 + tl.arange(0, CHUNK)
        ok = i < N
        g = tl.load(AHI + h * s_a_h + i, mask=ok, other=-1)
        e = tl.load(GHI + h * s_g_h + tl.maximum(g, 0), mask=ok & (g >= 0), other=-1)
        tl.store(AHI + h * s_a_h + i, e, mask=ok)


def vs_plan(cols: torch.Tensor, diags: torch.Tensor, bm: BlockMaskIR,
            max_cols: int | None = None) -> dict[str, torch.Tensor]:
    """From column / diagonal flags [H, n]: the diagonal groups (offsets [dlo, dhi]), prefix
    counts of the selected offsets (full tiles), and per query block the columns outside every
    group's key range. `max_cols` bounds the selected columns per head (the selector's count;
    measured on the device, with a wait, when not given). Two launches: the plan kernel (one
    program per head) and the per-query-block column lists."""
    H, n = diags.shape
    dev = diags.device
    BM = bm.schedule.block_m
    cols, diags = cols.contiguous(), diags.contiguous()
    if max_cols is None:
        max_cols = int(cols.sum(-1).max().item()) if H else 0
    C = max(min(max_cols, n), 1)
    # Groups are more than BM apart: at most ceil(n / (BM + 1)) of them, a bound known on the
    # host (no wait for the device to size the lists).
    G = max(-(-n // (BM + 1)), 1)
    i32 = torch.int32
    cnt = torch.empty(H, n + 1, dtype=i32, device=dev)
    glo = torch.empty(H, G, dtype=i32, device=dev)
    ghi = torch.empty(H, G, dtype=i32, device=dev)
    ng = torch.empty(H, dtype=i32, device=dev)
    ahi = torch.empty(H, max(n, 1), dtype=i32, device=dev)
    col_list = torch.empty(H, C, dtype=i32, device=dev)
    ncols = torch.empty(H, dtype=i32, device=dev)
    # Packed diagonal flags: VS_PAD zero bits first, and enough zero words after for any row
    # of a tile to read.
    dbits = torch.zeros(H, -(-(n + VS_PAD) // 32) + 16, dtype=i32, device=dev)
    if H and n:
        chunk = 64 if os.environ.get("TRITON_INTERPRET") == "1" else 2048
        _vs_plan_kernel[(H,)](cols.view(torch.int8), diags.view(torch.int8), cnt, glo, ghi, ng,
                              ahi, col_list, ncols, dbits, cols.stride(0), diags.stride(0),
                              cnt.stride(0), glo.stride(0), ahi.stride(0), col_list.stride(0),
                              dbits.stride(0), n, G, C, VS_PAD // 32, BLOCK_M=BM, CHUNK=chunk,
                              num_warps=8)
    else:  # nothing to walk: the values the kernel would leave
        for t, v in ((cnt, 0), (glo, n), (ghi, n), (ng, 0), (ahi, -1), (col_list, n),
                     (ncols, 0)):
            t.fill_(v)
    QB = -(-bm.q_len // BM)
    out = torch.empty(H, QB, C, dtype=i32, device=dev)
    nout = torch.empty(H, QB, dtype=i32, device=dev)
    chunk = min(1024, triton.next_power_of_2(C))
    _vs_columns_kernel[(H, QB)](col_list, ncols, ahi, out, nout, col_list.stride(0),
                                ahi.stride(0), out.stride(0), out.stride(1), nout.stride(0),
                                bm.q_start, bm.q_len, BLOCK_M=BM, CHUNK=chunk)
    return {"glo": glo, "ghi": ghi, "dcount": cnt, "ngroups": ng,
            "cols": out, "ncols": nout, "dbits": dbits, "cflags": cols.view(torch.int8)}


def vs_max_columns(bm: BlockMaskIR, H: int) -> int:
    """The most columns top_columns keeps for any head (its count), from the pattern."""
    col = next(s for s in slots(bm.pattern) if s.kind == "in_columns")
    return int(_per_head(col.param("count"), bm.n_var, H).max())


def _vs_attention(q, k, v, o, lse, bm: BlockMaskIR, plan, sm_scale: float, b: int,
                  launch: dict | None = None):
    from .kernel import load_kernel

    # One kernel per pattern: printing and hashing its source on every call costs host time
    # that the device would otherwise overlap.
    cache = bm.__dict__.setdefault("_vs_kernel", {})
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if interp not in cache:
        cache[interp] = load_kernel(vs_kernel_source(bm.pattern))
    fn = cache[interp]
    _, H, Lq, D = q.shape
    Hkv = k.shape[1]
    upcast = bool(interp and q.dtype != torch.float32)
    qb_, kb_, vb_, ob_ = q[b:b + 1], k[b:b + 1], v[b:b + 1], o[b:b + 1]
    lb_ = lse[b:b + 1]
    BM, BN = bm.schedule.block_m, bm.schedule.block_n
    grid = (-(-Lq // BM), H)
    launch = dict(launch or {})
    if "TMA" not in launch:
        from .kernel import _tma_by_default

        # H200, 128k: 23.60 -> 20.74 ms with 64 x 64 tiles (docs/BENCHMARKS.md).
        launch["TMA"] = int(_tma_by_default(qb_, kb_, vb_, None))
    kd, vd = kb_, vb_  # never read without TMA
    if launch["TMA"]:
        # Hopper: the diagonal ranges' tiles through TMA descriptors; gathered columns keep
        # pointer loads.
        from triton.tools.tensor_descriptor import TensorDescriptor

        kd = TensorDescriptor.from_tensor(kb_.view(Hkv, -1, D), [1, BN, D])
        vd = TensorDescriptor.from_tensor(vb_.view(Hkv, -1, D), [1, BN, D])
    fn[grid](qb_, kb_, vb_, ob_, lb_, plan["glo"], plan["ghi"], plan["dcount"], plan["ngroups"],
             plan["cols"], plan["ncols"], plan["dbits"], plan["cflags"], kd, vd,
             qb_.stride(0), qb_.stride(1), qb_.stride(2), kb_.stride(0), kb_.stride(1),
             kb_.stride(2), vb_.stride(0), vb_.stride(1), vb_.stride(2), ob_.stride(0),
             ob_.stride(1), ob_.stride(2), lb_.stride(0), lb_.stride(1),
             plan["glo"].stride(0), plan["dcount"].stride(0), plan["cols"].stride(0),
             plan["cols"].stride(1), plan["ncols"].stride(0), plan["dbits"].stride(0),
             plan["cflags"].stride(0),
             sm_scale, Lq, bm.q_start, H, H // Hkv,
             BLOCK_M=BM, BLOCK_N=BN, HEAD_DIM=D, UPCAST=upcast,
             IEEE=bool(q.dtype == torch.float32 or upcast), **launch)


# ---------------------------------------------------------------- entry point


def dynamic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMaskIR, *,
                      sm_scale: float | None = None, segments: torch.Tensor | None = None,
                      poison: bool = False, fast: bool | None = None,
                      return_index: bool = False, launch: dict | None = None,
                      gates: GateInput | None = None):
    """Index builders, then attention, for a dynamic pattern: q [B, H, Lq, D], k, v
    [B, Hkv, n, D]. Selections are made per batch element. With `fast` (the default where the
    mask is causal & (k in top_columns | q - k in top_diagonals)) the vertical-slash kernel
    visits diagonal ranges and gathered columns; otherwise the generated block kernel visits
    the builders' block lists. Returns the kernel's Output, and with return_index also the
    IndexSets of every batch element (for FlexAttention on the same sets). `launch`: Triton
    launch options of the vertical-slash kernel (num_warps, num_stages, and TMA: 1 loads the
    diagonal ranges' tiles through TMA descriptors, the default on Hopper for 16-bit inputs
    with head dims up to 128; 0 uses pointer loads). `gates`: gate()'s
    block scores (a tensor, mapping or function as attnc.reference takes them, shared by the
    batch; or a codegen.gate.BlockGate, run on each batch element's q and k)."""
    from .kernel import Output, attention

    if not bm.pattern.dynamic:
        raise ValueError(f"pattern '{bm.pattern.name}' is static: use codegen.kernel.attention")
    if bm.layout is not None:
        raise NotImplementedError("dynamic patterns run without a layout transform")
    Bsz, H, Lq, D = q.shape
    n = k.shape[2]
    if (Lq, n) != (bm.q_len, bm.n) or k.shape[1] == 0 or H % k.shape[1] or v.shape != k.shape:
        raise ValueError(f"shapes q {list(q.shape)} k {list(k.shape)} v {list(v.shape)} do not "
                         f"fit the block mask (q_len {bm.q_len}, n {bm.n})")
    slots(bm.pattern)  # refuses unsupported selectors early
    vs = vertical_slash_form(bm.pattern)
    # The packed diagonal flags cover offsets down to -VS_PAD: tiles up to that size.
    vs_fits = bm.schedule.block_m + bm.schedule.block_n <= VS_PAD + 2
    fast = (vs is not None and vs_fits) if fast is None else (fast and vs is not None
                                                               and vs_fits)
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    sets: list[IndexSets] = []
    if fast:
        o = torch.empty_like(q)
        lse = torch.empty((Bsz, H, Lq), device=q.device, dtype=torch.float32)
        if poison:
            o.fill_(float("nan"))
            lse.fill_(float("nan"))
    outs = []
    for b in range(Bsz):
        ix = build_index(q[b], k[b], bm, sm_scale=sm_scale, segments=segments,
                         lists=not fast or return_index, gates=gates,
                         side=not fast or return_index, flex=return_index)
        sets.append(ix)
        if fast:
            plan = vs_plan(ix.of("in_columns"), ix.of("in_diagonals"), bm,
                           max_cols=vs_max_columns(bm, H))
            ix.extra.update({f"vs_{name}": t for name, t in plan.items()})
            _vs_attention(q, k, v, o, lse, bm, plan, sm_scale, b, launch)
        else:
            outs.append(attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], bm, sm_scale=sm_scale,
                                  poison=poison, block_mask=ix.block_mask, side=ix.side))
    if not fast:
        res = outs[0] if Bsz == 1 else Output(torch.cat([x.out for x in outs]),
                                              torch.cat([x.lse for x in outs]))
    else:
        res = Output(o, lse)
    return (res, sets) if return_index else res


class Graphed:
    """`dynamic_attention` (index builders and kernel) captured as one CUDA graph for fixed
    shapes. The builders are a dozen small kernels whose launches take the host longer than
    the device takes to run them (at 128k the host's share is about as large as their device
    time); a replay launches them all at once. Nothing in them waits for the device, which is
    what makes them capturable.

    `g = Graphed(q, k, v, bm, **options)` copies q, k, v into static buffers `g.q, g.k, g.v`,
    runs twice (compiles, fills the caches of small per-head tensors) and captures. `g()`
    replays on what the buffers hold now; `g(q, k, v)` copies new inputs of the same shapes in
    first. The returned Output (and IndexSets with `return_index=True`) are static tensors
    that every replay overwrites: clone what you keep."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMaskIR,
                 **options):
        if q.device.type != "cuda":
            raise ValueError("CUDA graphs need CUDA tensors")
        self.q, self.k, self.v = (x.detach().contiguous().clone() for x in (q, k, v))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                dynamic_attention(self.q, self.k, self.v, bm, **options)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.result = dynamic_attention(self.q, self.k, self.v, bm, **options)

    def __call__(self, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
                 v: torch.Tensor | None = None):
        for dst, src in ((self.q, q), (self.k, k), (self.v, v)):
            if src is None:
                continue
            if src.shape != dst.shape:
                raise ValueError(f"shape {list(src.shape)} is not the captured "
                                 f"{list(dst.shape)}")
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)
        self.graph.replay()
        return self.result


__all__ = ["GateInput", "Graphed", "IndexSets", "Slot", "block_lists", "build_index",
           "dynamic_attention", "selector_printer", "slots", "vertical_slash_form",
           "vs_kernel_source", "vs_max_columns", "vs_plan"]
