"""Learned block gate (SeerAttention-style): pooled Q and K per block, per-head projections."""

from __future__ import annotations

import math

import torch
from torch import nn

NEG_INF = float("-inf")
# Distance buckets of the gate's positional prior: block distance 0, 1, 2-3, 4-7, ... (log2),
# the last for 2^14 blocks and more; one more bucket for key block 0 (the attention sink).
DIST_BUCKETS = 16
# What a gate threshold compares against: the block probability, or it times the sequence's key
# blocks ("length") or the row's eligible blocks ("relative"), or the row's mass from the block
# down in rank order ("mass": a threshold t is top-p with p = 1 - t); see BlockGate.
SCORE_KINDS = ("probability", "length", "relative", "mass")


def pool3(x: torch.Tensor, block: int, *, start: int = 0, nb: int | None = None) -> torch.Tensor:
    """Average, max and min pooling of x [..., L, D] (positions start .. start + L - 1) over
    absolute blocks of `block` positions: [..., nb, 3 * D]. Only present positions count (a
    partial first or last block pools what it holds); blocks holding none are zero."""
    *lead, L, D = x.shape
    nb = -(-(start + L) // block) if nb is None else nb
    pad_front = start - (start // block) * block
    b0 = start // block
    span = (nb - b0) * block
    pad_back = span - pad_front - L
    if pad_back < 0:
        raise ValueError(f"{nb} blocks of {block} do not hold positions {start}..{start + L - 1}")
    xf = x.float()
    present = torch.zeros(span, dtype=torch.bool, device=x.device)
    present[pad_front:pad_front + L] = True
    present = present.view(nb - b0, block, 1)

    def padded(fill: float) -> torch.Tensor:
        return torch.nn.functional.pad(xf, (0, 0, pad_front, pad_back), value=fill).reshape(
            *lead, nb - b0, block, D)

    count = present.sum(-2).clamp(min=1).to(xf.dtype)  # [nb - b0, 1]
    avg = padded(0.0).sum(-2) / count
    mx = padded(NEG_INF).amax(-2)
    mn = padded(float("inf")).amin(-2)
    some = present.any(-2)  # [nb - b0, 1]
    feats = torch.cat([avg, mx, mn], dim=-1)
    feats = torch.where(some, feats, torch.zeros((), dtype=feats.dtype, device=feats.device))
    if b0:
        feats = torch.nn.functional.pad(feats, (0, 0, b0, 0))
    return feats


def unrotate(x: torch.Tensor, inv_freq: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Undo a model's rotary embedding on x [..., L, D] at positions start .. start + L - 1:
    transformers' rotate_half convention over the first 2 R dims (R = len(inv_freq); the rest,
    under partial rotary, pass through). The angles are float32 positions times inv_freq, as
    transformers computes them, so the inverse matches the forward rotation's rounding."""
    R = inv_freq.numel()
    L = x.shape[-2]
    pos = torch.arange(start, start + L, device=x.device, dtype=torch.float32)
    ang = pos.view(-1, 1) * inv_freq.to(device=x.device, dtype=torch.float32).view(1, -1)
    c, s = ang.cos(), ang.sin()
    xf = x.float()
    x1, x2 = xf[..., :R], xf[..., R:2 * R]
    # Forward: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s); the inverse rotates by -angle.
    return torch.cat([x1 * c + x2 * s, x2 * c - x1 * s, xf[..., 2 * R:]], dim=-1)


def gate_features(x: torch.Tensor, block: int, *, start: int = 0, nb: int | None = None,
                  inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """What a gate sees of x [..., L, D] (post-RoPE Q or K at positions start ..): with the
    model's `inv_freq`, its rotary embedding undone, then pool3 over absolute blocks. On the
    GPU one fused Triton kernel (codegen.builders.gate_pool) does both."""
    D = x.shape[-1]
    if x.is_cuda and D & (D - 1) == 0 and x.shape[-2] > 0:
        from .builders import gate_pool

        return gate_pool(x, block, start=start, nb=nb, inv_freq=inv_freq)
    if inv_freq is not None:
        x = unrotate(x, inv_freq, start)
    return pool3(x, block, start=start, nb=nb)


def block_rope(x: torch.Tensor, dims: int, base: float) -> torch.Tensor:
    """Rotate the last `dims` features of x [..., nb, d] by their row's block index (RoPE at
    block level: pairs (i, i + dims / 2) at angle index * base^(-i / (dims / 2))), so that a
    query block row times a key block row depends on their block distance."""
    if dims == 0:
        return x
    h = dims // 2
    n = x.shape[-2]
    w = base ** (-torch.arange(h, device=x.device, dtype=x.dtype) / h)
    ang = torch.arange(n, device=x.device, dtype=x.dtype).view(-1, 1) * w
    c, s = ang.cos(), ang.sin()
    keep, x1, y1 = x[..., :-dims], x[..., -dims:-h], x[..., -h:]
    return torch.cat([keep, x1 * c - y1 * s, x1 * s + y1 * c], dim=-1)


def distance_buckets(nq: int, nk: int, device=None,
                     max_distance: int | None = None) -> torch.Tensor:
    """[nq, nk] int64: the prior's bucket of each (query block, key block) pair by absolute
    block index: floor(log2(distance)) + 1 (0 on the diagonal, capped), DIST_BUCKETS for key
    block 0. Distances beyond `max_distance` (the longest the gate was trained on) count as
    that distance: buckets never trained keep no meaningless zero prior."""
    d = (torch.arange(nq, device=device).view(-1, 1)
         - torch.arange(nk, device=device).view(1, -1)).clamp(min=0)
    if max_distance is not None:
        d = d.clamp(max=max(max_distance, 0))
    lg = torch.floor(torch.log2(d.clamp(min=1).double())).long() + 1
    b = torch.where(d == 0, 0, lg).clamp(max=DIST_BUCKETS - 1)
    b[:, 0] = DIST_BUCKETS
    return b


def eligible(nb: int, block: int, q_start: int, q_len: int, causal: bool = True,
             device=None) -> torch.Tensor:
    """[nb, nb] bool: the key blocks each absolute query block may select, as in
    attnc.reference: under causality those holding a key at or before the block's last query;
    query blocks without evaluated queries select nothing."""
    qb = torch.arange(nb, device=device)
    last = torch.clamp((qb + 1) * block - 1, max=q_start + q_len - 1)
    has = (qb + 1) * block - 1 >= q_start
    el = torch.ones(nb, nb, dtype=torch.bool, device=device)
    if causal:
        el = (qb * block).view(1, -1) <= last.view(-1, 1)
    return el & has.view(-1, 1)


class BlockGate(nn.Module):
    """One layer's gate: for each query head h, block scores
    (pool3(Q_h) Wq_h)(pool3(K_g(h)) Wk_h)^T / sqrt(d_gate) over absolute blocks, softmax over
    the eligible key blocks of each query block row (SeerAttention's block distribution).

    Like SeerAttention's gate, it can see Q and K before the model's rotary embedding (the
    model's `inv_freq`, set with `set_model_rope`: the gate undoes the rotation before pooling,
    since mean-pooling rotated vectors cancels their fast-turning pairs) and puts a rotary
    embedding of its own on `rope` extra projected dimensions at block level (`block_rope`):
    content-dependent relative position, where the prior below is content-independent.

    A learned per-head positional prior is added to the block logits: one value per log2
    bucket of the block distance and one for key block 0 (a bucketed bias costs 17 numbers per
    head and generalises from little calibration text; the block rotary dimensions above add
    position that depends on content). It starts at 0, so an untrained gate is the
    pooled-score heuristic.

    Scores (`score_kind`, SCORE_KINDS) are the block probabilities ("probability"); or the
    probabilities times the number of key blocks of the sequence ("length"): at one length the
    same order and the same selection as probabilities, and a threshold calibrated at one length
    keeps about the same share at another, where a probability threshold keeps fewer blocks the
    more a row holds; or times the number of eligible blocks of the row ("relative", 1 = the
    row's uniform share), which keeps about the same share of every row, short or long; or
    the row's probability mass ranked at or below the block ("mass": 1 minus the mass of the
    row's better blocks, ties to the lower key block), so that a threshold t keeps the fewest
    best blocks of each row whose mass reaches 1 - t: top-p (nucleus) selection, where a
    peaked row keeps few blocks and a flat one many. On SmolLM2-135M the per-row rule
    ("relative") costs far more perplexity at the same density than "probability" and
    "length" (docs/gate.md), so "length" is the head tuner's kind.

    `block = 0` is the degenerate one-block gate (DuoAttention's `gate(block = n)`): one score
    per head, sigmoid(logit + bias_h), where the softmax over a single block would always be 1.
    """

    def __init__(self, heads: int, kv_heads: int, head_dim: int, block: int, d_gate: int = 64,
                 *, init: str = "pooled", seed: int = 0, rope: int = 0,
                 rope_base: float = 10000.0):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
        if rope < 0 or rope % 2:
            raise ValueError(f"rope must be an even number of dimensions >= 0, not {rope}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.block, self.d_gate = block, d_gate
        self.rope, self.rope_base = rope, float(rope_base)
        F = 3 * head_dim
        g = torch.Generator().manual_seed(seed)
        wq = torch.randn(heads, F, d_gate + rope, generator=g) / math.sqrt(F)
        wk = torch.randn(heads, F, d_gate + rope, generator=g) / math.sqrt(F)
        if init == "pooled":
            # Start from the mean-pooled Q . K block score (top_blocks' heuristic): the average
            # features map to the first min(D, d_gate) gate dimensions, with the attention
            # scale split between the two sides; a little noise elsewhere breaks symmetry.
            m = min(head_dim, d_gate)
            s = (d_gate / head_dim) ** 0.25
            wq = wq * 0.01
            wk = wk * 0.01
            eye = torch.eye(head_dim, m)
            wq[:, :head_dim, :m] += s * eye
            wk[:, :head_dim, :m] += s * eye
        elif init != "random":
            raise ValueError(f"init is 'pooled' or 'random', not '{init}'")
        self.wq = nn.Parameter(wq)
        self.wk = nn.Parameter(wk)
        self.bias = nn.Parameter(torch.zeros(heads))
        self.dist = nn.Parameter(torch.zeros(heads, DIST_BUCKETS + 1))
        self.score_kind = "probability"  # see SCORE_KINDS and the class docstring
        self.max_distance: int | None = None  # longest block distance trained on
        # The model's rotary inverse frequencies, when the gate sees Q and K without them.
        self.register_buffer("model_inv_freq", None, persistent=False)

    def set_model_rope(self, inv_freq: torch.Tensor | None) -> BlockGate:
        """See Q and K before the model's rotary embedding of these inverse frequencies (None:
        as given). The features must match what the gate was trained on."""
        if inv_freq is not None:
            inv_freq = inv_freq.detach().float().reshape(-1)
            if 2 * inv_freq.numel() > self.head_dim:
                raise ValueError(f"{inv_freq.numel()} rotary frequencies do not fit head dim "
                                 f"{self.head_dim}")
            inv_freq = inv_freq.to(self.wq.device)
        self.model_inv_freq = inv_freq
        return self

    @property
    def relative(self) -> bool:
        """Scores relative to the row's uniform share (score_kind "relative")."""
        return self.score_kind == "relative"

    @relative.setter
    def relative(self, on: bool) -> None:
        self.score_kind = "relative" if on else "probability"

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def block_size(self, n: int) -> int:
        return n if self.block == 0 else self.block

    def logits(self, pq: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
        """pq [..., H, NQ, 3D], pk [..., G, NK, 3D] -> [..., H, NQ, NK] (unmasked)."""
        pk = pk.repeat_interleave(self.group, dim=-3)
        a = torch.einsum("...hqf,hfd->...hqd", pq, self.wq)
        b = torch.einsum("...hkf,hfd->...hkd", pk, self.wk)
        if self.rope:
            # Rows are absolute blocks, so the rotation angle is the block index.
            a = block_rope(a, self.rope, self.rope_base)
            b = block_rope(b, self.rope, self.rope_base)
        return a @ b.transpose(-1, -2) / math.sqrt(self.d_gate)

    def log_probs(self, pq: torch.Tensor, pk: torch.Tensor, el: torch.Tensor) -> torch.Tensor:
        """Log of the gate's block distribution per query block row, -inf where not eligible
        (rows with nothing eligible are all -inf)."""
        z = self.logits(pq, pk)
        z = z + self.dist[:, distance_buckets(z.shape[-2], z.shape[-1], z.device,
                                              self.max_distance)]
        z = z.masked_fill(~el, NEG_INF)
        lp = torch.log_softmax(z, dim=-1)
        return torch.nan_to_num(lp, nan=NEG_INF, posinf=NEG_INF)

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, q_start: int | None = None,
                causal: bool = True) -> torch.Tensor:
        """Gate scores [H, nb, nb] for q [H, Lq, D] (the last Lq of n positions unless
        q_start says otherwise) and k [G, n, D], indexed by absolute block as
        attnc.reference's gates= expects: the block probabilities (0 where not eligible), or,
        for the one-block gate, sigmoid scores [H, 1, 1]."""
        H, Lq, _ = q.shape
        n = k.shape[-2]
        q_start = n - Lq if q_start is None else q_start
        b = self.block_size(n)
        nb = -(-n // b)
        inv = self.model_inv_freq
        pq = gate_features(q, b, start=q_start, nb=nb, inv_freq=inv)
        pk = gate_features(k, b, nb=nb, inv_freq=inv)
        if self.block == 0:
            z = self.logits(pq, pk) + self.bias.view(-1, 1, 1)
            return torch.sigmoid(z)
        el = eligible(nb, b, q_start, Lq, causal, q.device)
        return self.scores(self.log_probs(pq, pk, el), el)

    def scores(self, lp: torch.Tensor, el: torch.Tensor) -> torch.Tensor:
        """The selector's scores from log_probs (el: eligible blocks, key blocks last): the
        probabilities, times the sequence's key blocks ("length") or the row's eligible blocks
        ("relative")."""
        p = lp.exp()
        if self.score_kind == "relative":
            p = p * el.sum(-1, keepdim=True).to(p.dtype)
        elif self.score_kind == "length":
            p = p * el.shape[-1]
        elif self.score_kind == "mass":
            p = mass_scores(p, el)
        return p


def mass_scores(p: torch.Tensor, el: torch.Tensor) -> torch.Tensor:
    """Per row of block probabilities p [..., nk] (0 where not eligible): 1 minus the mass of
    the blocks ranked above each block (descending, ties to the lower key block), 0 where not
    eligible. Rows that keep nothing eligible are all 0."""
    order = torch.sort(-p, dim=-1, stable=True).indices
    ranked = torch.gather(p, -1, order)
    # Float64 sums, so that a block's score does not depend on rounding in a long row.
    above = torch.cumsum(ranked.double(), -1) - ranked.double()
    out = torch.empty_like(p)
    out.scatter_(-1, order, (1.0 - above).clamp_(0.0, 1.0).to(p.dtype))
    return torch.where(el, out, torch.zeros((), dtype=p.dtype, device=p.device))


def block_keep(scores: torch.Tensor, el: torch.Tensor, topk: torch.Tensor | int,
               threshold: torch.Tensor | float) -> torch.Tensor:
    """The gate selector's rule on scores [H, nb, nb]: eligible blocks with score >= threshold
    that are, when topk > 0, among the topk best eligible of their row (ties to the lower key
    block), exactly as attnc.reference's gate()."""
    H, nb, _ = scores.shape
    topk = torch.as_tensor(topk, dtype=torch.int64).reshape(-1).expand(H)
    thr = torch.as_tensor(threshold, dtype=scores.dtype).reshape(-1).expand(H)
    s = torch.where(el, scores, torch.tensor(NEG_INF, dtype=scores.dtype))
    order = torch.sort(-s, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nb).expand_as(order).contiguous())
    ranked = (rank < topk.view(H, 1, 1)) | (topk.view(H, 1, 1) == 0)
    return el & (scores >= thr.view(H, 1, 1)) & ranked


def own_blocks_first(scores: torch.Tensor, el: torch.Tensor) -> torch.Tensor:
    """The eligible scores of [..., nb, nb] flattened, each query block's own block ranked
    above every threshold (the `gated` pattern keeps it whatever the gate says)."""
    nb = scores.shape[-1]
    own = torch.eye(nb, dtype=torch.bool, device=scores.device)
    return torch.where(own, torch.tensor(float("inf"), dtype=scores.dtype,
                                         device=scores.device), scores)[..., el].reshape(-1)


def density_thresholds(scores: list[torch.Tensor], densities) -> list[float]:
    """Per density, the smallest threshold that keeps at most that share of the blocks whose
    scores (own_blocks_first) are given: just above the (keep + 1)-th largest score. 0 keeps
    all; when the own blocks alone exceed the budget, a threshold above every gate score keeps
    only them."""
    # On the CPU: scores may come from gates on a GPU, and one sort of them is cheap.
    flat = torch.sort(torch.cat([s.cpu() for s in scores]), descending=True).values
    finite = flat[torch.isfinite(flat)]
    top = finite.max() if finite.numel() else torch.tensor(0.0, dtype=flat.dtype)
    out = []
    for d in densities:
        keep = int(d * flat.numel())
        if keep >= flat.numel():
            out.append(0.0)
            continue
        at = top if torch.isinf(flat[keep]) else flat[keep]
        out.append(float(torch.nextafter(at, torch.tensor(float("inf"), dtype=at.dtype))))
    return out


class GateSet(nn.Module):
    """The gates of a model: one BlockGate per gated layer, all with one block size, and the
    (layer, query head) cells they serve."""

    def __init__(self, gates: dict[int, BlockGate], cells: list[tuple[int, int]],
                 meta: dict[str, str] | None = None):
        super().__init__()
        if not gates:
            raise ValueError("a gate set needs at least one layer")
        first = next(iter(gates.values()))
        for ly, g in gates.items():
            if (g.heads, g.kv_heads, g.head_dim, g.block, g.d_gate) != (
                    first.heads, first.kv_heads, first.head_dim, first.block, first.d_gate):
                raise ValueError(f"layer {ly}: every gate of a set has the same shape and block")
        missing = sorted({ly for ly, _ in cells} - set(gates))
        if missing:
            raise ValueError(f"cells of layers {missing} have no gate")
        self.layer_gates = nn.ModuleDict({str(ly): g for ly, g in sorted(gates.items())})
        self.cells = sorted(set(cells))
        self.meta = dict(meta or {})

    def configure(self, *, scores: str | None = None, relative: bool | None = None,
                  max_distance: int | None = None) -> GateSet:
        """Set the score kind (SCORE_KINDS; `relative=True` is scores="relative", False is
        "probability") and the longest trained block distance on every layer's gate, and record
        them in the metadata (so a saved file keeps them)."""
        if relative is not None:
            if scores is not None:
                raise ValueError("give scores= or relative=, not both")
            scores = "relative" if relative else "probability"
        if scores is not None and scores not in SCORE_KINDS:
            raise ValueError(f"score kind is one of {', '.join(SCORE_KINDS)}, not '{scores}'")
        for g in self.layer_gates.values():
            if scores is not None:
                g.score_kind = scores
            if max_distance is not None:
                g.max_distance = max_distance
        first = next(iter(self.layer_gates.values()))
        self.meta["scores"] = first.score_kind
        if first.max_distance is not None:
            self.meta["max_distance"] = str(first.max_distance)
        return self

    @property
    def relative(self) -> bool:
        return next(iter(self.layer_gates.values())).relative

    @property
    def score_kind(self) -> str:
        return next(iter(self.layer_gates.values())).score_kind

    @property
    def model_inv_freq(self) -> torch.Tensor | None:
        """The model rotary frequencies the gates undo (None: they see post-RoPE Q and K)."""
        return next(iter(self.layer_gates.values())).model_inv_freq

    @property
    def block(self) -> int:
        return next(iter(self.layer_gates.values())).block

    @property
    def d_gate(self) -> int:
        return next(iter(self.layer_gates.values())).d_gate

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.layer_gates]

    def __getitem__(self, layer: int) -> BlockGate:
        return self.layer_gates[str(layer)]

    def __contains__(self, layer: object) -> bool:
        return str(layer) in self.layer_gates


__all__ = ["DIST_BUCKETS", "SCORE_KINDS", "BlockGate", "GateSet", "block_keep", "block_rope",
           "density_thresholds", "distance_buckets", "eligible", "gate_features",
           "own_blocks_first", "pool3", "unrotate"]
