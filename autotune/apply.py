"""Make a transformers model attend with a plan's patterns (through its attention registry)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from attnc.compiler.ir import PatternIR, free_vars
from attnc.compiler.lower import lower_plan
from attnc.compiler.numeric import evaluate as num_eval
from attnc.compiler.rules import rewrite
from attnc.dsl.check import PlanInfo, Program, load, loads

from .candidates import Candidate
from .model import model_device

NAME = "attnc"


class PlanMasks:
    """The boolean mask of every (layer, query head) cell, evaluated from the pattern IR on
    demand per (pattern, head, n, q_len) and kept in a bounded cache shared across layers."""

    def __init__(self, cells: Mapping[tuple[int, int], PatternIR], layers: int, heads: int,
                 cache_bytes: int = 1 << 30):
        self.layers, self.heads = layers, heads
        self.cells = {}
        for cell, ir in cells.items():
            if ir.dynamic:
                raise ValueError(f"cell {cell}: dynamic pattern {ir.name} needs a run-time "
                                 "index builder; apply() supports static patterns")
            if ir.bias is not None:
                raise ValueError(f"cell {cell}: pattern {ir.name} has a bias; apply() "
                                 "supports masks only")
            self.cells[cell] = PatternIR(ir.name, rewrite(ir.mask))
        self.cache: OrderedDict = OrderedDict()
        self.cache_bytes = cache_bytes
        self._bytes = 0
        # Kernel path: None = on CUDA tensors, True = always (tests: the interpreter on CPU).
        self.kernels: bool | None = None
        self._launch: dict[tuple[int, int, int], object] = {}

    def layer_kernel(self, layer: int, n: int, q_len: int):
        """The generated kernel's input for one layer (codegen.kernel): one plan kernel for the
        layer's heads, each head's mask intersected with causal as on the reference path."""
        key = (layer, n, q_len)
        if key not in self._launch:
            from attnc.codegen import kernel
            from attnc.compiler.blockmask import Schedule
            from attnc.compiler.ir import Op, Var

            causal = Op("le", (Var("k"), Var("q")))
            irs = [PatternIR(ir.name, rewrite(Op("and", (ir.mask, causal))))
                   for ir in (self.cells[(layer, h)] for h in range(self.heads))]
            self._launch[key] = kernel.heads_kernel(irs, n=n, q_len=q_len,
                                                    schedule=Schedule(64, 64))
        return self._launch[key]

    def _one(self, ir: PatternIR, h: int, n: int, q_len: int) -> torch.Tensor:
        return static_mask(self, ir, h, n, q_len)

    def layer_rows(self, layer: int, n: int, q_len: int, s: int, e: int,
                   kend: int) -> torch.Tensor:
        """[heads, e - s, kend] bool: rows s..e-1 of the layer's masks, keys below kend."""
        return torch.stack([self._one(self.cells[(layer, h)], h, n, q_len)[s:e, :kend]
                            for h in range(self.heads)])

    def layer(self, layer: int, n: int, q_len: int) -> torch.Tensor:
        """[heads, q_len, n] bool for one layer (queries are the last q_len positions)."""
        return torch.stack([self._one(self.cells[(layer, h)], h, n, q_len)
                            for h in range(self.heads)])


def static_mask(store, ir: PatternIR, h: int, n: int, q_len: int) -> torch.Tensor:
    """[q_len, n] bool: a static pattern's mask (queries are the last q_len positions) and
    causal, from a bounded LRU cache on `store` (its cache, cache_bytes and _bytes), keyed by
    (pattern, head if the mask uses h, n, q_len)."""
    hk = h if "h" in free_vars(ir.mask) else -1
    key = (ir.key, hk, n, q_len)
    hit = store.cache.get(key)
    if hit is not None:
        store.cache.move_to_end(key)
        return hit
    q = np.arange(n - q_len, n, dtype=np.int64).reshape(-1, 1)
    k = np.arange(n, dtype=np.int64).reshape(1, -1)
    m = num_eval(ir.mask, {"q": q, "k": k, "h": np.int64(max(hk, 0)), "n": np.int64(n)})
    t = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(m, (q_len, n)) & (k <= q)))
    store.cache[key] = t
    store._bytes += t.numel()
    while store._bytes > store.cache_bytes and len(store.cache) > 1:
        _, old = store.cache.popitem(last=False)
        store._bytes -= old.numel()
    return t


def plan_masks(plan, *, layers: int | None = None, heads: int | None = None) -> PlanMasks:
    """PlanMasks from a plan (PlanInfo, Program with one plan, .attn path or text) or from a
    mapping (layer, query head) -> Candidate | PatternIR."""
    if isinstance(plan, Mapping):
        cells = {cell: (c.ir() if isinstance(c, Candidate) else c) for cell, c in plan.items()}
        ly = layers if layers is not None else 1 + max(x for x, _ in cells)
        hs = heads if heads is not None else 1 + max(h for _, h in cells)
        return PlanMasks(cells, ly, hs)
    info = _plan_info(plan)
    return PlanMasks(lower_plan(info), info.layers, info.heads)


def _plan_info(plan) -> PlanInfo:
    if isinstance(plan, PlanInfo):
        return plan
    if isinstance(plan, Path) or (isinstance(plan, str) and plan.endswith(".attn")
                                  and "\n" not in plan):
        plan = load(plan)
    elif isinstance(plan, str):
        plan = loads(plan, "<plan>")
    if isinstance(plan, Program):
        if len(plan.plans) != 1:
            raise ValueError(f"the program has {len(plan.plans)} plans; pass one PlanInfo")
        return next(iter(plan.plans.values()))
    raise TypeError(f"cannot use {type(plan).__name__} as a plan")


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
              **kwargs):
    """The registered attention function: masked attention per head with the plan's masks,
    computed a chunk of queries at a time over the keys up to the chunk's last query (every
    plan mask is intersected with causal), on the CPU reference path."""
    masks: PlanMasks = module._attnc_masks
    B, H, Lq, D = query.shape
    n = key.shape[2]
    scale = scaling if scaling is not None else D ** -0.5
    extra = padding_mask(attention_mask, n)
    use_kernels = masks.kernels if masks.kernels is not None else query.is_cuda
    if use_kernels and (extra is None or _only_causal(extra, n, Lq)):
        # The generated kernel runs the layer's heads in one launch; a padding mask (not
        # expressible in the plan) sends the batch to the reference path below.
        from attnc.codegen import kernel

        res = kernel.attention(query, key, value, masks.layer_kernel(module.layer_idx, n, Lq),
                               sm_scale=scale)
        return res.out.transpose(1, 2).contiguous(), None
    gqa = key.shape[1] != H
    out = torch.empty_like(query)
    chunk = max(1, (1 << 24) // max(1, H * n))
    q0 = n - Lq
    for s in range(0, Lq, chunk):
        e = min(Lq, s + chunk)
        kend = q0 + e  # keys after the chunk's last query are masked for every head
        m = masks.layer_rows(module.layer_idx, n, Lq, s, e, kend).to(query.device)
        m = m.unsqueeze(0)
        if extra is not None:
            m = m & extra[:, :, s:e, :kend]
        o = F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, :kend],
                                           value[:, :, :kend], attn_mask=m, scale=scale,
                                           enable_gqa=gqa)
        out[:, :, s:e] = o
    return out.transpose(1, 2).contiguous(), None


def padding_mask(attention_mask, n: int) -> torch.Tensor | None:
    """transformers' 4D attention mask over the n keys as booleans (True: may attend), or
    None when there is none."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    extra = attention_mask[:, :, :, :n]
    return extra if extra.dtype == torch.bool else extra == 0


def _only_causal(extra: torch.Tensor, n: int, q_len: int) -> bool:
    """True when a 4D boolean mask allows every causal pair (no padding): the plan's own masks,
    which are causal, then say everything."""
    q = torch.arange(n - q_len, n, device=extra.device).view(-1, 1)
    k = torch.arange(n, device=extra.device).view(1, -1)
    return bool((extra | (k > q)).all())


def apply(model, plan, *, layers: int | None = None, heads: int | None = None,
          kernels: bool | None = None) -> PlanMasks:
    """Make `model` attend with `plan` (see plan_masks for what a plan may be). Every attention
    module gets the plan's masks; the model's attention implementation becomes "attnc" until
    remove(model). The plan's shape must match the model's layers and query heads.
    kernels: run attention through the generated Triton kernels (one launch per layer) -- by
    default when the inputs are on a CUDA device; True also under TRITON_INTERPRET=1 on the
    CPU; False always takes the reference path."""
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    pm = plan if isinstance(plan, PlanMasks) else plan_masks(
        plan, layers=layers or L, heads=heads or H)
    if (pm.layers, pm.heads) != (L, H):
        raise ValueError(f"the plan is for {pm.layers} layers x {pm.heads} heads; the model "
                         f"has {L} x {H}")
    pm.kernels = kernels
    install(model, "_attnc_masks", pm, attention)
    return pm


def install(model, attr: str, masks, fn) -> None:
    """Register fn as the attention function NAME, give every attention module `attr` = masks
    and switch the model to NAME (remove() switches back)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, fn)
    L = model.config.num_hidden_layers
    found = 0
    for mod in model.modules():
        if hasattr(mod, "layer_idx") and hasattr(mod, "o_proj"):
            setattr(mod, attr, masks)
            found += 1
    if found != L:
        raise ValueError(f"found {found} attention modules, expected {L}")
    if not hasattr(model, "_attnc_before"):
        model._attnc_before = model.config._attn_implementation
    model.set_attn_implementation(NAME)


def remove(model) -> None:
    """Undo apply(): the model's previous attention implementation."""
    before = getattr(model, "_attnc_before", None)
    for mod in model.modules():
        for attr in ("_attnc_masks", "_attnc_gate_masks"):  # plain and gated apply
            if hasattr(mod, attr):
                delattr(mod, attr)  # frees the mask cache
    if before is not None:
        model.set_attn_implementation(before)
        del model._attnc_before


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    """exp(mean next-token loss) of one sequence ids [1, L] or [L]."""
    ids = ids.reshape(1, -1).to(model_device(model))
    out = model(ids, labels=ids, use_cache=False)
    return math.exp(float(out.loss))


__all__ = ["NAME", "PlanMasks", "apply", "attention", "padding_mask", "perplexity",
           "plan_masks", "remove", "static_mask"]
