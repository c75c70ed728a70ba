"""Distil learned block gates from a dense model's block-level attention maps (train_gate)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from attnc.codegen.gate import (
    BlockGate,
    GateSet,
    density_thresholds,
    eligible,
    gate_features,
    own_blocks_first,
)
from attnc.compiler.ir import Const, Op, PatternIR, Sel, Var, free_vars
from attnc.compiler.lower import lower_plan
from attnc.compiler.rules import rewrite
from attnc.dsl.check import PlanInfo

from .capture import use_attention
from .model import model_device, shape

_CAPTURE = "attnc_gate_capture"
FORMAT = "attnc-gates/1"
SCHEDULES = ("constant", "cosine")  # learning-rate schedules of fit
WEIGHTINGS = ("uniform", "gradient")  # how train_gate weighs the query block rows


# ---------------------------------------------------------------- identity and plan keys


def model_id(model) -> str:
    """A hash of the model's config and a weight checksum (per parameter: name, shape, sum and
    sum of squares in float64), so weights trained for one model are refused for another."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "_attn_implementation",
              "_attn_implementation_internal", "torch_dtype", "dtype"):
        cfg.pop(k, None)  # where it was loaded from and how it attends do not change weights
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().double()
            h.update(f"{name}:{list(p.shape)}:{float(x.sum()):.9e}:"
                     f"{float((x * x).sum()):.9e};".encode())
    return h.hexdigest()[:32]


def _gate_sels(e) -> list[Sel]:
    out, stack = [], [e]
    while stack:
        x = stack.pop()
        if isinstance(x, Sel):
            if x.kind == "gate":
                out.append(x)
            stack.extend(v for _, v in x.params)
        elif isinstance(x, Op):
            stack.extend(x.args)
    return out


def gate_block(sel: Sel) -> int:
    """A gate selector's block size: a constant, or 0 for `block = n` (one block, DuoAttention)."""
    b = sel.param("block")
    if b == Var("n"):
        return 0
    if isinstance(b, Const) and not free_vars(b):
        return max(int(b.value), 1)
    raise NotImplementedError(f"gate block must be a constant or n, not {b}")


def gate_cells(plan: PlanInfo) -> tuple[int | None, list[tuple[int, int]]]:
    """(block, gated (layer, query head) cells) of a plan; block is None when no cell is gated.
    Every gated cell must use one block size (one gate set serves the plan)."""
    blocks: set[int] = set()
    cells = []
    for cell, ir in lower_plan(plan).items():
        sels = _gate_sels(rewrite(ir.mask))
        if sels:
            blocks.update(gate_block(s) for s in sels)
            cells.append(cell)
    if len(blocks) > 1:
        raise NotImplementedError(f"plan '{plan.name}' uses gates of block sizes "
                                  f"{sorted(blocks)}; one gate set has one block size")
    return (blocks.pop() if blocks else None), sorted(cells)


def cells_key(block: int, cells: list[tuple[int, int]]) -> str:
    """The structural key of a gate set's duty: its block size and its cells. The selection
    parameters (topk, threshold) are not part of it: one trained gate serves any of them."""
    text = f"block={block};cells=" + ",".join(f"{ly}.{h}" for ly, h in sorted(cells))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def pattern_is_gated(ir: PatternIR) -> bool:
    return bool(_gate_sels(rewrite(ir.mask)))


# ---------------------------------------------------------------- targets


def block_targets(q: torch.Tensor, k: torch.Tensor, block: int, scale: float,
                  rows: int = 512) -> torch.Tensor:
    """The dense causal attention of q [H, L, D] over k [G, L, D] max-pooled to blocks and
    renormalised per query block row: [H, nb, nb]. Computed a chunk of query rows at a time
    over the keys up to the chunk's end (never L x L for all heads at once)."""
    H, L, _ = q.shape
    group = H // k.shape[0]
    kx = k.repeat_interleave(group, dim=0) if group > 1 else k
    nb = -(-L // block)
    out = torch.zeros(H, nb, nb, dtype=torch.float32, device=q.device)
    rows = max(block, rows // block * block)
    for s in range(0, L, rows):
        e = min(L, s + rows)
        logits = torch.einsum("hqd,hkd->hqk", q[:, s:e].float(), kx[:, :e].float()) * scale
        qpos = torch.arange(s, e, device=q.device).view(-1, 1)
        logits.masked_fill_(torch.arange(e, device=q.device).view(1, -1) > qpos, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        rb, kb = -(-(e - s) // block), -(-e // block)
        p = F.pad(p, (0, kb * block - e, 0, rb * block - (e - s)))
        pooled = p.view(H, rb, block, kb, block).amax(dim=(2, 4))
        out[:, s // block:s // block + rb, :kb] = pooled
    return out / out.sum(-1, keepdim=True).clamp(min=1e-30)


@dataclass
class LayerData:
    pq: list[torch.Tensor] = field(default_factory=list)  # per sequence [H, nb, 3D]
    pk: list[torch.Tensor] = field(default_factory=list)  # [G, nb, 3D]
    target: list[torch.Tensor] = field(default_factory=list)  # [H, nb, nb]
    # [H, nb] per sequence with collect(grad=True): how much each query block row's output
    # matters to the loss (sum over its rows of |dL/do|), the rows' weights in kl_loss.
    weight: list[torch.Tensor] = field(default_factory=list)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.stack(self.pq), torch.stack(self.pk), torch.stack(self.target)

    def weights(self) -> torch.Tensor | None:
        return torch.stack(self.weight) if self.weight else None


class _Recorder:
    """An attention function: dense causal SDPA (the model runs unchanged) that also records,
    per wanted layer, the pooled Q and K and the block-level attention target."""

    def __init__(self, block: int, layers: set[int], inv_freq: torch.Tensor | None = None,
                 grad: bool = False):
        self.block, self.layers, self.inv_freq, self.grad = block, layers, inv_freq, grad
        self.data: dict[int, LayerData] = {ly: LayerData() for ly in layers}

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                             enable_gqa=key.shape[1] != query.shape[1])
        if module.layer_idx in self.layers:
            d = self.data[module.layer_idx]
            for b in range(query.shape[0]):
                # Computed where the model runs (a GPU does the n x n work), kept on the CPU:
                # the training set of many chunks need not fit the device.
                q, k = query[b].detach().float(), key[b].detach().float()
                d.pq.append(gate_features(q, self.block, inv_freq=self.inv_freq).cpu())
                d.pk.append(gate_features(k, self.block, inv_freq=self.inv_freq).cpu())
                d.target.append(block_targets(q, k, self.block, float(scale)).cpu())
            if self.grad and out.requires_grad:
                out.register_hook(lambda g, d=d: d.weight.extend(
                    _block_norms(g, self.block).cpu().unbind(0)))
        return out.transpose(1, 2).contiguous(), None


def _block_norms(g: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, nb]: per query block, the sum over its rows of |g| (g [B, H, L, D])."""
    B, H, L, _ = g.shape
    nb = -(-L // block)
    r = g.detach().float().norm(dim=-1)
    r = F.pad(r, (0, nb * block - L))
    return r.view(B, H, nb, block).sum(-1)


def model_rope(model) -> torch.Tensor | None:
    """The model's rotary inverse frequencies (the `inv_freq` buffer of its rotary embedding
    module), or None when it has none or several different ones (e.g. per layer type): then
    gates see the post-RoPE Q and K."""
    found: list[torch.Tensor] = []
    for m in model.modules():
        f = getattr(m, "inv_freq", None)
        if isinstance(f, torch.Tensor) and f.ndim == 1 and f.numel() > 0:
            f = f.detach().float().cpu()
            if not any(f.shape == g.shape and torch.equal(f, g) for g in found):
                found.append(f)
    if len(found) != 1 or 2 * found[0].numel() > shape(model)[3]:
        return None
    return found[0]


@torch.no_grad()
def collect(model, sequences: list[torch.Tensor], block: int,
            layers: list[int] | None = None, *, inv_freq: torch.Tensor | None = None,
            gates: GateSet | None = None, grad: bool = False) -> dict[int, LayerData]:
    """Run the dense model on each sequence (ids [L], one length) and collect, per layer, the
    pooled features (of Q and K with the rotary embedding of `inv_freq` undone, when given,
    or as `gates` see them) and block targets the gates learn from. grad=True also runs the
    backward pass of the sequence's next-token loss and records each query block row's
    weight (LayerData.weight: the sum over its rows of |dL/do| per head)."""
    from transformers import AttentionInterface

    if gates is not None:
        inv_freq = gates.model_inv_freq

    L = shape(model)[0]
    dev = model_device(model)
    rec = _Recorder(block, set(range(L)) if layers is None else set(layers), inv_freq, grad)
    AttentionInterface.register(_CAPTURE, rec)
    was_training = model.training
    params = [p.requires_grad for p in model.parameters()]
    model.eval()
    try:
        if grad:  # the gradient reaches the attention outputs, never the weights
            for p in model.parameters():
                p.requires_grad_(False)
        with use_attention(model, _CAPTURE), torch.set_grad_enabled(grad):
            for ids in sequences:
                x = ids.reshape(1, -1).to(dev)
                if grad:
                    emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
                    model(inputs_embeds=emb, labels=x, use_cache=False).loss.backward()
                else:
                    model(x, use_cache=False)
                _trim_heap()
    finally:
        for p, r in zip(model.parameters(), params, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    return rec.data


def _trim_heap() -> None:
    """Give glibc's freed heap back to the system. Each forward pass frees hundreds of MB of
    activations around the few small tensors it keeps, and glibc keeps the freed pages: RSS
    grew by 0.75 GB per 4096-token sequence of SmolLM2 while 22 MB were kept (77 sequences
    were killed at 24 GB); with a trim after each, four sequences grew it by 22 MB each."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
        pass


# ---------------------------------------------------------------- training


def kl_loss(gate: BlockGate, pq: torch.Tensor, pk: torch.Tensor, target: torch.Tensor,
            heads: list[int] | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(target || gate) over the query block rows (with at least two eligible key
    blocks: a row with one has nothing to choose) of the given heads; with `weight` (rows'
    weights, the shape of target without its last axis), a weighted mean, each head's
    weights scaled to mean 1 (a head's rows are reweighted, heads keep equal shares)."""
    nb = pq.shape[-2]
    el = eligible(nb, gate.block, 0, nb * gate.block, device=pq.device)
    lp = gate.log_probs(pq, pk, el)
    t = target
    if heads is not None:
        lp, t = lp[..., heads, :, :], t[..., heads, :, :]
        weight = weight[..., heads, :] if weight is not None else None
    kl = torch.where(t > 0, t * (torch.log(t.clamp(min=1e-30)) - lp), torch.zeros_like(t))
    rows = el.sum(-1) >= 2
    per_row = kl.sum(-1)[..., rows]
    if weight is None:
        return per_row.mean()
    w = weight[..., rows]
    other = tuple(i for i in range(w.dim()) if i != w.dim() - 2)  # all but the head axis
    w = w / w.mean(dim=other, keepdim=True).clamp(min=1e-30)
    return (per_row * w).mean()


@dataclass
class TrainResult:
    gates: GateSet
    history: list[float]  # mean KL over layers, before each step and after the last
    heldout: tuple[float, float] | None  # held-out KL (before, after) when held-out ids given
    seconds: dict[str, float]
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out KL)
    best_step: int | None = None  # the step whose weights were kept (early stopping)


def fit(gates: dict[int, BlockGate], data: dict[int, LayerData],
        heads: dict[int, list[int]], *, steps: int = 300, lr: float = 3e-3,
        weight_decay: float = 0.0, val: dict[int, LayerData] | None = None,
        check_every: int = 25, log: Callable[[str], None] | None = None,
        schedule: str = "constant"
        ) -> tuple[list[float], list[tuple[int, float]], int | None]:
    """Adam on the sum over layers of each layer's KL (the layers are independent, so one
    optimiser trains them all at once), at a constant learning rate or (`schedule` "cosine")
    one that decays from `lr` to 0 over the steps. With `val`, the held-out KL is checked every
    `check_every` steps and the best weights are kept (the gates overfit a few calibration
    chunks). Returns the mean training KL before each step and after the last, the held-out
    curve [(step, KL)] and the step whose weights were kept (None without `val`)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule '{schedule}' ({', '.join(SCHEDULES)})")
    dev = next(iter(gates.values())).wq.device  # the gates' device: the data goes there
    tensors = {ly: _to(data[ly].stacked(), dev) for ly in gates}
    # Row weights where the data has them (collect(grad=True)); the held-out KL stays plain.
    wts = {ly: None if data[ly].weights() is None else data[ly].weights().to(dev)
           for ly in gates}
    vt = {ly: _to(val[ly].stacked(), dev) for ly in gates} if val is not None else None
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)  # small tensors: threads cost more than they save
    try:
        return _fit(gates, tensors, vt, heads, steps, lr, weight_decay, check_every, log,
                    schedule, wts)
    finally:
        torch.set_num_threads(threads)


def _to(ts: tuple[torch.Tensor, ...], dev: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(dev) for t in ts)



def _mean_kl(gates, tensors, heads, wts=None) -> torch.Tensor:
    return sum(kl_loss(g, *tensors[ly], heads[ly], (wts or {}).get(ly))
               for ly, g in gates.items()) / len(gates)


def _fit(gates, tensors, vt, heads, steps, lr, weight_decay, check_every, log, schedule, wts):
    params = [p for g in gates.values() for p in (g.wq, g.wk, g.dist)]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    # Full-batch steps: the last ones, at a small rate, settle into the minimum that a
    # constant rate keeps circling (the held-out KL was still falling at the last step).
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))) \
        if schedule == "cosine" else None
    hist: list[float] = []
    curve: list[tuple[int, float]] = []
    best: tuple[float, int, list[torch.Tensor]] | None = None

    def check(step: int) -> None:
        nonlocal best
        with torch.no_grad():
            v = float(_mean_kl(gates, vt, heads))
        curve.append((step, v))
        if best is None or v < best[0]:
            best = (v, step, [p.detach().clone() for p in params])

    for step in range(steps):
        if vt is not None and step % check_every == 0:
            check(step)
        opt.zero_grad()
        # The layers' losses share no parameters: one backward per layer gives the gradient
        # of their mean while only one layer's graph is alive (all 30 of SmolLM2's at once
        # outgrew 24 GB with 77 training chunks).
        total = 0.0
        for ly, g in gates.items():
            loss = kl_loss(g, *tensors[ly], heads[ly], wts[ly]) / len(gates)
            loss.backward()
            total += loss.item()
        opt.step()
        if sched is not None:
            sched.step()
        hist.append(total)
        if log and (step % 50 == 0):
            log(f"step {step}: KL {hist[-1]:.4f}"
                + (f", held-out {curve[-1][1]:.4f}" if curve else ""))
    if vt is not None:
        check(steps)
        with torch.no_grad():
            for p, b in zip(params, best[2], strict=True):
                p.copy_(b)
    with torch.no_grad():
        hist.append(float(_mean_kl(gates, tensors, heads, wts)))
    return hist, curve, (best[1] if best is not None else None)


def training_chunks(ids: torch.Tensor, length: int, count: int | None = None,
                    stride: int | None = None, what: str = "calibration") -> list[torch.Tensor]:
    """The chunks train_gate distils on (and finetune_gate may fine-tune on): `count` chunks of
    `length` tokens starting every `stride` tokens (default: length, disjoint); a stride below
    the length overlaps them, so the same text is seen at other block alignments and
    positions."""
    ids = ids.reshape(-1)
    stride = length if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be at least 1, not {stride}")
    if ids.numel() < length:
        raise ValueError(f"{what} text has {ids.numel()} tokens, fewer than the training "
                         f"length {length}")
    k = (ids.numel() - length) // stride + 1
    k = k if count is None else min(k, count)
    return [ids[i * stride:i * stride + length] for i in range(k)]


def train_gate(model, calib_ids: torch.Tensor, *, plan=None, block: int = 64,
               d_gate: int = 64, length: int = 2048, sequences: int | None = 2,
               steps: int = 300, lr: float = 3e-3, weight_decay: float = 0.0,
               init: str = "pooled", seed: int = 0, heldout_ids: torch.Tensor | None = None,
               early_stop: bool = True, log: Callable[[str], None] | None = None,
               stride: int | None = None, rope: int = 32,
               pre_rope: bool = True, extra_ids: Sequence[torch.Tensor] = (),
               device: str | torch.device | None = None,
               schedule: str = "constant", weighting: str = "uniform") -> TrainResult:
    """Train gates for `model` by distillation: the dense model runs on `sequences` chunks of
    `length` calibration tokens; per layer and head the gate learns the attention probabilities
    max-pooled to blocks (KL(target || gate)). With `plan` (a plan with gated cells: PlanInfo,
    .attn path or text) the plan's gated cells and block size are trained; without, every head
    of every layer with `block`. `heldout_ids` (one more chunk of `length`, not calibration
    text) measures held-out KL before and after training and, with `early_stop`, keeps the
    weights of the step with the lowest held-out KL (checked every 25 steps). `stride`
    (default `length`) spaces the chunks' starts: a stride below the length gives overlapping
    chunks, which generalise better from little text (docs/BENCHMARKS.md). `pre_rope`: the
    gates see Q and K with the model's rotary embedding undone (when it has one, see
    model_rope); `rope`: extra gate dimensions with a block-level rotary embedding of their
    own (0: none). Both lowered held-out KL on SmolLM2 (docs/gate.md). `extra_ids`: more
    training chunks of `length` tokens after the calibration chunks, e.g. synthetic retrieval
    samples (autotune.text.retrieval_ids), so the gates see attention that fetches a fact
    from far back. `device`: where the gates train (default: the model's device); the model
    runs where it is, its features are kept on the CPU between the chunks, and the returned
    gates stay on `device`. `schedule`: the learning rate, "constant" or "cosine" (decays to
    0 over the steps; see fit). `weighting` "gradient" weighs each query block row's KL by
    how much its output matters to the model's loss (the sum over its rows of |dL/do|, from
    one backward pass per training chunk; each head's weights averaged to 1): the gate's
    capacity goes to the rows whose attention the loss depends on (MoA's loss-aware view
    applied to the distillation); "uniform" (the default) weighs every row alike."""
    from .apply import _plan_info

    if schedule not in SCHEDULES:  # before the model's passes, not after
        raise ValueError(f"unknown schedule '{schedule}' ({', '.join(SCHEDULES)})")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting '{weighting}' ({', '.join(WEIGHTINGS)})")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    L, H, G, D = shape(model)
    if plan is not None:
        info = _plan_info(plan)
        if (info.layers, info.heads) != (L, H):
            raise ValueError(f"the plan is for {info.layers} layers x {info.heads} heads; the "
                             f"model has {L} x {H}")
        pb, cells = gate_cells(info)
        if pb is None:
            raise ValueError(f"plan '{info.name}' has no gated cell")
        block = pb
    else:
        cells = [(ly, h) for ly in range(L) for h in range(H)]
    if block == 0:
        raise NotImplementedError("training the one-block gate (gate(block = n), DuoAttention) "
                                  "needs a per-head target; only block gates are distilled")
    if block < 0 or length < 2 * block:
        # One block per chunk leaves no row with two eligible key blocks: no loss (NaN).
        raise ValueError(f"block {block}, length {length}: the training length must hold at "
                         "least two blocks")
    if sequences is not None and sequences < 1:
        raise ValueError(f"sequences {sequences}: at least 1 (None: all the text holds)")
    layers = sorted({ly for ly, _ in cells})
    heads = {ly: sorted(h for c, h in cells if c == ly) for ly in layers}
    seqs = training_chunks(calib_ids, length, sequences, stride)
    for i, x in enumerate(extra_ids):
        x = torch.as_tensor(x).reshape(-1)
        if x.numel() != length:
            raise ValueError(f"extra training chunk {i} has {x.numel()} tokens; every chunk "
                             f"has the training length {length}")
        seqs.append(x)
    inv_freq = model_rope(model) if pre_rope else None
    data = collect(model, seqs, block, layers, inv_freq=inv_freq,
                   grad=weighting == "gradient")
    t1 = time.perf_counter()
    dev = model_device(model) if device is None else torch.device(device)
    gates = {ly: BlockGate(H, G, D, block, d_gate, init=init, seed=seed + ly,
                           rope=rope).set_model_rope(inv_freq).to(dev) for ly in layers}
    val = collect(model, training_chunks(heldout_ids, length, 1, what="held-out"), block, layers,
                  inv_freq=inv_freq) \
        if heldout_ids is not None else None
    vt = {ly: _to(val[ly].stacked(), dev) for ly in layers} if val is not None else None

    def val_kl() -> float:
        with torch.no_grad():
            return float(_mean_kl(gates, vt, heads))

    before = val_kl() if val is not None else None
    t2 = time.perf_counter()
    hist, curve, best = fit(gates, data, heads, steps=steps, lr=lr, weight_decay=weight_decay,
                            val=val if early_stop else None, log=log, schedule=schedule)
    t3 = time.perf_counter()
    after = val_kl() if val is not None else None
    gs = GateSet(gates, cells)
    gs.configure(max_distance=-(-length // block) - 1)
    gs.meta = gate_meta(gs, model, {"length": length, "sequences": len(seqs),
                                    "extra_chunks": len(extra_ids),
                                    "stride": stride or length, "steps": steps,
                                    "lr": lr, "schedule": schedule,
                                    "weighting": weighting, "init": init,
                                    "seed": seed,
                                    "kl_first": hist[0], "kl_last": hist[-1],
                                    "heldout_kl": after, "best_step": best})
    for p in gs.parameters():
        p.requires_grad_(False)
    secs = {"collect": t1 - t0, "fit": t3 - t2, "total": time.perf_counter() - t0}
    return TrainResult(gs, hist, None if before is None else (before, after), secs, curve,
                       best)


# ---------------------------------------------------------------- fine-tuning on the model's loss


_FINETUNE = "attnc_gate_finetune"
_GATED_EVAL = "attnc_gate_eval"  # gated_perplexity's, so it never replaces a fine-tuning's


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      block: int, scale: float) -> torch.Tensor:
    """Causal attention of q [H, L, D] over k, v [G, L, D] in which each key's weight is
    multiplied by its block's `keep` [H, nb, nb] (0/1 forward; its gradient says what adding or
    dropping a block would do to the loss). Every row keeps its own block, so no row is empty."""
    H, L, _ = q.shape
    group = H // k.shape[0]
    k = k.repeat_interleave(group, dim=0).float()
    v = v.repeat_interleave(group, dim=0).float()
    s = torch.einsum("hqd,hkd->hqk", q.float(), k) * scale
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1),
                      float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True).detach())
    nb = keep.shape[-1]
    pad = nb * block - L
    e = F.pad(e, (0, pad, 0, pad)).view(H, nb, block, nb, block)
    w = (e * keep[:, :, None, :, None]).view(H, nb * block, nb * block)[:, :L, :L]
    # The own key's weight is at least exp(-88) of the row's largest unless scores differ by
    # more than that: the floor keeps such a row finite (0) instead of NaN.
    return (w / w.sum(-1, keepdim=True).clamp(min=1e-30)) @ v


class _FineTune:
    """An attention function for finetune_gate: the gated heads attend with the gate's hard
    block selection at `threshold` (the evaluation's mask: score >= threshold, the own block
    always) and a sigmoid relaxation of it in the backward pass (straight-through), the other
    heads densely."""

    def __init__(self, gs: GateSet, threshold: float, tau: float):
        self.gs, self.threshold, self.tau = gs, threshold, tau
        self.heads = {ly: sorted(h for c, h in gs.cells if c == ly) for ly in gs.layers}
        self.kept = [0.0, 0.0]  # kept, eligible blocks of the gated heads in the last pass

    def keep(self, ly: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        g = self.gs[ly]
        H, L, _ = q.shape
        dev = g.wq.device  # the gate runs where its weights are; the mask goes to q's device
        with torch.no_grad():
            pq = gate_features(q.detach().float(), g.block, inv_freq=g.model_inv_freq).to(dev)
            pk = gate_features(k.detach().float(), g.block, inv_freq=g.model_inv_freq).to(dev)
        nb = pq.shape[-2]
        el = eligible(nb, g.block, 0, L, device=dev)
        own = torch.eye(nb, dtype=torch.bool, device=dev)
        sc = g.scores(g.log_probs(pq, pk, el), el)
        hard = (el & (sc >= self.threshold)) | own
        # A threshold of 0 (keep everything) has no boundary to learn at: the sigmoid is 1.
        soft = torch.sigmoid((torch.log(sc.clamp(min=1e-30))
                              - math.log(max(self.threshold, 1e-30))) / self.tau)
        keep = hard.float() + soft - soft.detach()  # forward: hard; backward: the sigmoid's
        keep = torch.where(own, torch.ones_like(keep), torch.where(el, keep,
                                                                    torch.zeros_like(keep)))
        gated = torch.zeros(H, dtype=torch.bool, device=dev)
        gated[self.heads[ly]] = True
        with torch.no_grad():
            self.kept[0] += float(hard[gated].logical_and(el).sum())
            self.kept[1] += float(el.sum()) * int(gated.sum())
        return torch.where(gated.view(-1, 1, 1), keep, el.float()).to(q.device)

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 **kwargs):
        from torch.utils.checkpoint import checkpoint

        ly = module.layer_idx
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if ly not in self.heads:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                                 enable_gqa=key.shape[1] != query.shape[1])
        else:
            outs = []
            for b in range(query.shape[0]):
                keep = self.keep(ly, query[b], key[b])
                # Recomputed in the backward pass: the L x L weights of every layer at once
                # would not fit (9 heads x 4096^2 floats is 600 MB a layer).
                outs.append(checkpoint(_masked_attention, query[b], key[b], value[b], keep,
                                       self.gs.block, float(scale), use_reentrant=False))
            out = torch.stack(outs).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None


@torch.no_grad()
def gated_perplexity(model, gates: GateSet | TrainResult, ids: torch.Tensor, threshold: float
                     ) -> tuple[float, float]:
    """(perplexity, block density of the gated cells) of `model` on ids [L] with every cell of
    the gate set keeping the blocks whose gate score is at least `threshold` (and its own
    block) and every other head dense: what attnc.gate_api.apply gives for that plan
    (`gated(block, topk = 0, threshold)` in the gates' cells), computed where the model runs,
    without element masks on the CPU (dense L x L weights per layer)."""
    from transformers import AttentionInterface

    if isinstance(gates, TrainResult):
        gates = gates.gates
    ft = _FineTune(gates, threshold, 1.0)
    AttentionInterface.register(_GATED_EVAL, ft)
    x = ids.reshape(1, -1).to(model_device(model))
    with use_attention(model, _GATED_EVAL):
        loss = model(x, labels=x, use_cache=False).loss
    return math.exp(float(loss)), ft.kept[0] / max(ft.kept[1], 1.0)


@dataclass
class FinetuneResult:
    gates: GateSet
    history: list[dict]  # per step: chunk, KL to the dense model, threshold, block density
    thresholds: list[float]
    seconds: float
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val perplexity)
    best_step: int | None = None  # the step whose weights were kept (with val_ids)


def finetune_gate(model, gates: GateSet | TrainResult, chunks: Sequence[torch.Tensor], *,
                  density: float = 0.18, steps: int = 100, lr: float = 1e-4, tau: float = 0.5,
                  distill: float = 1.0, recalibrate_every: int = 1,
                  calib_chunks: int = 4, log: Callable[[str], None] | None = None,
                  seed: int = 0, max_seconds: float | None = None,
                  val_ids: torch.Tensor | None = None, check_every: int = 10
                  ) -> FinetuneResult:
    """Fine-tune distilled gates on what the model loses through them (beyond SeerAttention's
    distillation): the model runs with every gated cell attending through the gate's hard block
    selection at the global threshold that keeps `density` of the blocks (as the evaluation
    does), the loss is the KL from the dense model's next-token distributions to the gated
    model's, and its gradient reaches the gate through a sigmoid of the log score around the
    threshold (temperature `tau`; a straight-through estimator: only blocks near the threshold
    learn, and they learn whether keeping them lowers the model's loss).

    The threshold is recalibrated on the dense features of the first `calib_chunks` chunks
    every `recalibrate_every` steps (default every step: the gates' ranking moves, and the
    density with it, otherwise). `distill` (default 1) adds that weight of the distillation KL
    of the same chunk, a regulariser for the ranking away from the threshold (without it the
    block distributions sharpened and perplexity got worse on SmolLM2, as with lr 3e-4). One
    chunk per step, cycled in a fixed shuffled order; `max_seconds` stops earlier (after the
    step that passes it). With `val_ids` (held-out tokens, not a chunk trained on) the gated
    model's perplexity on them at the current threshold is measured every `check_every` steps
    and after the last, and the weights with the lowest are kept (early stopping: the loss of
    one training chunk is a noisy guide).

    Trains the gates in place, moved to the model's device (a GPU: each step runs the model
    forward and backward with dense L x L weights per layer), and returns them, frozen again,
    with the history."""
    if isinstance(gates, TrainResult):
        gates = gates.gates
    if not 0 < density < 1:
        raise ValueError(f"density must be in (0, 1), not {density}")
    if steps < 1 or tau <= 0 or recalibrate_every < 1 or calib_chunks < 1:
        raise ValueError("steps, tau, recalibrate_every and calib_chunks must be positive")
    chunks = [torch.as_tensor(c).reshape(-1) for c in chunks]
    if not chunks:
        raise ValueError("finetune_gate needs at least one chunk")
    if gates.block <= 0:
        raise NotImplementedError("fine-tuning needs a block gate (block > 0)")
    from transformers import AttentionInterface

    t0 = time.perf_counter()
    dev = model_device(model)
    gates.to(dev)
    params = [p for ly in gates.layers for p in (gates[ly].wq, gates[ly].wk, gates[ly].dist)]
    for p in params:
        p.requires_grad_(True)
    heads = {ly: sorted(h for c, h in gates.cells if c == ly) for ly in gates.layers}
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
    cal = collect(model, chunks[:calib_chunks], gates.block, gates=gates)
    # Each chunk's pooled features and block targets (the distillation term's data), collected
    # the first time the chunk comes up: they do not depend on the gates (kept on the CPU as
    # train_gate keeps them, 22 MB a chunk for SmolLM2 at 4096 tokens).
    targets: dict[int, dict[int, LayerData]] = {}
    opt = torch.optim.Adam(params, lr=lr)
    ft = _FineTune(gates, 1.0, tau)
    AttentionInterface.register(_FINETUNE, ft)
    was_training = model.training
    req = [p.requires_grad for p in model.parameters()]
    model.eval()
    hist: list[dict] = []
    thresholds: list[float] = []
    curve: list[tuple[int, float]] = []
    best: tuple[float, int, list[torch.Tensor]] | None = None

    def check(step: int) -> None:
        nonlocal best
        ppl, _ = gated_perplexity(model, gates, val_ids, ft.threshold)
        curve.append((step, ppl))
        if best is None or ppl < best[0]:
            best = (ppl, step, [p.detach().clone() for p in params])

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for step in range(steps):
            if step % recalibrate_every == 0:
                ft.threshold = calibrate_threshold(gates, cal, density)
                thresholds.append(ft.threshold)
            if val_ids is not None and step % check_every == 0:
                check(step)
            i = order[step % len(order)]
            x = chunks[i].reshape(1, -1).to(dev)
            with torch.no_grad():
                ref = F.log_softmax(model(x, use_cache=False).logits.float(), -1)
            ft.kept = [0.0, 0.0]
            with use_attention(model, _FINETUNE):
                lg = F.log_softmax(model(x, use_cache=False).logits.float(), -1)
            kl = (ref.exp() * (ref - lg)).sum(-1).mean()
            loss = kl
            if distill > 0:
                if i not in targets:
                    targets[i] = collect(model, [chunks[i]], gates.block, gates=gates)
                d = targets[i]
                loss = loss + distill * sum(
                    kl_loss(gates[ly], *_to(d[ly].stacked(), dev), heads[ly])
                    for ly in gates.layers) / len(gates.layers)
            opt.zero_grad()
            loss.backward()
            opt.step()
            row = {"step": step, "chunk": i, "kl": float(kl.detach()), "threshold": ft.threshold,
                   "block_density": ft.kept[0] / max(ft.kept[1], 1.0)}
            hist.append(row)
            if log and step % 10 == 0:
                log(f"finetune step {step}: KL to dense {row['kl']:.4f}, gated block density "
                    f"{row['block_density']:.4f}, threshold {ft.threshold:.5g}, "
                    f"{time.perf_counter() - t0:.0f} s")
            del lg, ref, loss, kl
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                break
        if val_ids is not None:
            ft.threshold = calibrate_threshold(gates, cal, density)
            check(len(hist))
            with torch.no_grad():
                for p, b in zip(params, best[2], strict=True):
                    p.copy_(b)
    finally:
        for p, r in zip(model.parameters(), req, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
        for p in params:
            p.requires_grad_(False)
    train = json.loads(gates.meta.get("train", "{}") or "{}")
    train["finetune"] = {"steps": len(hist), "density": density, "lr": lr, "tau": tau,
                         "distill": distill, "chunks": len(chunks), "seed": seed,
                         "kl_first": hist[0]["kl"], "kl_last": hist[-1]["kl"],
                         "best_step": best[1] if best is not None else None}
    gates.meta["train"] = json.dumps(train)
    return FinetuneResult(gates, hist, thresholds, time.perf_counter() - t0, curve,
                          best[1] if best is not None else None)


def gate_meta(gs: GateSet, model, train: dict | None = None) -> dict[str, str]:
    """The metadata a gate file carries (see attnc.gate_api.save_gates): format, the model's
    identity, the plan key of the set's cells, shapes, cells and how it was trained."""
    L = shape(model)[0]
    g = gs[gs.layers[0]]
    return {"format": FORMAT, "model_id": model_id(model),
            "plan_key": cells_key(gs.block, gs.cells), "block": str(gs.block),
            "d_gate": str(gs.d_gate), "heads": str(g.heads), "kv_heads": str(g.kv_heads),
            "head_dim": str(g.head_dim), "layers": str(L),
            "rope": str(g.rope), "rope_base": repr(g.rope_base),
            "pre_rope": "1" if g.model_inv_freq is not None else "0",
            "cells": json.dumps([list(c) for c in gs.cells]),
            "train": json.dumps(train or {}),
            **{k: gs.meta[k] for k in ("scores", "max_distance") if k in gs.meta}}


def calibrate_threshold(gs: GateSet, data: dict[int, LayerData], density: float, *,
                        oracle: bool = False) -> float:
    """The smallest gate threshold whose block density on `data` (kept blocks, with each query
    block's own block always kept as `gated` does, over causal blocks, all of the set's cells)
    is at most `density`: a per-head adaptive budget (peaked rows keep few blocks, flat rows
    many) in place of a fixed top-k. With `oracle`, the threshold for the data's true block
    targets instead of the gate's scores."""
    scores = []
    with torch.no_grad():
        for ly in gs.layers:
            g = gs[ly]
            pq, pk, target = _to(data[ly].stacked(), g.wq.device)
            nb = pq.shape[-2]
            el = eligible(nb, g.block, 0, nb * g.block, device=pq.device)
            hs = sorted(h for c, h in gs.cells if c == ly)
            s = target if oracle else g.scores(g.log_probs(pq, pk, el), el)
            scores.append(own_blocks_first(s[..., hs, :, :], el))
    return density_thresholds(scores, [density])[0]


def random_kl(gs: GateSet, data: dict[int, LayerData], seed: int = 1) -> float:
    """The KL of randomly initialised gates of the same shape (a baseline for a trained one)."""
    out = []
    for ly in gs.layers:
        g = gs[ly]
        r = BlockGate(g.heads, g.kv_heads, g.head_dim, g.block, g.d_gate, init="random",
                      seed=seed + ly, rope=g.rope, rope_base=g.rope_base).to(g.wq.device)
        hs = sorted(h for c, h in gs.cells if c == ly)
        with torch.no_grad():
            out.append(float(kl_loss(r, *_to(data[ly].stacked(), g.wq.device), hs)))
    return sum(out) / len(out)


def evaluate_kl(gs: GateSet, data: dict[int, LayerData]) -> float:
    """Mean KL of a gate set on collected data."""
    out = []
    for ly in gs.layers:
        hs = sorted(h for c, h in gs.cells if c == ly)
        with torch.no_grad():
            out.append(float(kl_loss(gs[ly], *_to(data[ly].stacked(), gs[ly].wq.device), hs)))
    return sum(out) / len(out)


__all__ = ["FORMAT", "FinetuneResult", "LayerData", "TrainResult", "block_targets",
           "calibrate_threshold", "cells_key", "collect", "evaluate_kl", "finetune_gate", "fit",
           "gate_block", "gate_cells", "gate_meta", "gated_perplexity", "kl_loss", "model_id",
           "pattern_is_gated", "random_kl", "train_gate", "training_chunks"]
