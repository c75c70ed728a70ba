"""Learned gates: train, save / load next to a plan (safetensors), and attend with a gated plan."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attnc import atomic, reference
from attnc.autotune import dynamic as dyn
from attnc.autotune.apply import NAME, _plan_info, padding_mask, perplexity, remove
from attnc.autotune.gate_train import (
    FORMAT,
    TrainResult,
    cells_key,
    finetune_gate,
    gate_cells,
    model_id,
    pattern_is_gated,
    train_gate,
)
from attnc.autotune.model import shape
from attnc.codegen.gate import SCORE_KINDS, BlockGate, GateSet
from attnc.compiler.ir import PatternIR
from attnc.compiler.lower import lower_plan
from attnc.compiler.rules import rewrite
from attnc.dsl.check import PlanInfo, Program
from attnc.dsl.errors import AttncError


def gates_path(plan_path: str | Path) -> Path:
    """Where a plan's gate weights live: plan.attn -> plan.gates.safetensors."""
    p = Path(plan_path)
    return p.with_name(p.stem + ".gates.safetensors")


def save_gates(gates: GateSet | TrainResult, path: str | Path) -> Path:
    """Write the gate weights and their metadata (model identity, plan key, block, cells,
    d_gate) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    gs = gates.gates if isinstance(gates, TrainResult) else gates
    tensors = {}
    for ly in gs.layers:
        g = gs[ly]
        for name in ("wq", "wk", "bias", "dist"):
            tensors[f"layers.{ly}.{name}"] = getattr(g, name).detach().float().cpu().contiguous()
    inv = gs[gs.layers[0]].model_inv_freq
    if inv is not None:  # the model's rotary frequencies, which the gate undoes
        tensors["model_inv_freq"] = inv.detach().float().cpu().contiguous()
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(gs.meta))
    return path


def _fail(path: Path, what: str) -> AttncError:
    return AttncError(f"{path}: {what}")


def load_gates(path: str | Path, *, model=None, plan=None) -> GateSet:
    """Read gate weights; with `model` the file must have been trained for it (same config and
    weights), with `plan` it must serve the plan's gated cells with the plan's block size.
    A mismatch raises AttncError with a one-line message."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise _fail(path, "no gate weights (train them: attnc.train_gate, attnc tune "
                          "--train-gate)")
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    except (SafetensorError, OSError) as e:  # truncated, not safetensors, a folder
        raise _fail(path, f"not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise _fail(path, f"not an attnc gate file (format {meta.get('format')!r}, expected "
                          f"{FORMAT!r})")
    try:
        block, d_gate = int(meta["block"]), int(meta["d_gate"])
        H, G, D = int(meta["heads"]), int(meta["kv_heads"]), int(meta["head_dim"])
        cells = [tuple(c) for c in json.loads(meta["cells"])]
    except KeyError as e:
        raise _fail(path, f"missing metadata {e}") from None
    except (ValueError, TypeError) as e:
        raise _fail(path, f"bad metadata ({e})") from None
    if model is not None:
        mine = model_id(model)
        if meta.get("model_id") != mine:
            raise _fail(path, f"gates were trained for model {meta.get('model_id')}, not this "
                              f"model ({mine}); retrain them")
        L, mh, mg, md = shape(model)
        if (H, G, D) != (mh, mg, md):
            raise _fail(path, f"gates are for {H} heads / {G} KV heads / head dim {D}, the "
                              f"model has {mh} / {mg} / {md}")
    if plan is not None:
        info = _plan_info(plan)
        pb, pcells = gate_cells(info)
        if pb is None:
            raise _fail(path, f"plan '{info.name}' has no gated cell")
        if pb != block:
            raise _fail(path, f"gates have block {block}, plan '{info.name}' uses block {pb}")
        missing = sorted(set(pcells) - set(cells))
        if missing:
            ly, h = missing[0]
            raise _fail(path, f"gates do not cover plan '{info.name}' (layer {ly} head {h} and "
                              f"{len(missing) - 1} more cells; plan key "
                              f"{cells_key(pb, pcells)}, file key {meta.get('plan_key')})")
    rope = int(meta.get("rope", "0"))  # files from before the gate's own rotary: none
    rope_base = float(meta.get("rope_base", "10000.0"))
    if rope < 0 or rope % 2 or not rope_base > 0:
        raise _fail(path, f"bad gate rotary settings (rope {rope}, rope_base {rope_base})")
    inv_freq = tensors.get("model_inv_freq")
    if meta.get("pre_rope") == "1" and inv_freq is None:
        raise _fail(path, "missing tensor model_inv_freq (the gate sees pre-RoPE Q and K)")
    if inv_freq is not None and 2 * inv_freq.numel() > D:
        raise _fail(path, f"model_inv_freq has {inv_freq.numel()} frequencies, more than head "
                          f"dim {D} holds")
    gates = {}
    for ly in sorted({c[0] for c in cells}):
        g = BlockGate(H, G, D, block, d_gate, init="random", rope=rope, rope_base=rope_base)
        with torch.no_grad():
            for name in ("wq", "wk", "bias", "dist"):
                key = f"layers.{ly}.{name}"
                if key not in tensors and name == "dist":
                    continue  # files from before the positional prior: it stays 0
                if key not in tensors:
                    raise _fail(path, f"missing tensor {key}")
                want = tuple(getattr(g, name).shape)
                if tuple(tensors[key].shape) != want:
                    raise _fail(path, f"tensor {key} has shape {tuple(tensors[key].shape)}, "
                                      f"expected {want} (block {block}, d_gate {d_gate}, rope "
                                      f"{rope})")
                getattr(g, name).copy_(tensors[key])
        g.requires_grad_(False)
        gates[ly] = g.set_model_rope(inv_freq)
    gs = GateSet(gates, cells, meta)
    md = meta.get("max_distance")
    kind = meta.get("scores", "probability")
    if kind not in SCORE_KINDS:
        raise _fail(path, f"unknown score kind '{kind}' (this attnc reads "
                          f"{', '.join(SCORE_KINDS)})")
    return gs.configure(scores=kind, max_distance=int(md) if md else None)


class _Masks:
    """Per layer: the static cells' masks (evaluated from the IR, cached by pattern, head and
    shape), the gated heads, whose masks the reference evaluator computes from the gate's
    block scores at run time, and the dynamic heads (vertical-slash, block top-k), whose
    selectors run on the layer's own Q and K (attnc.autotune.dynamic)."""

    def __init__(self, info: PlanInfo, gates: GateSet | None, cache_bytes: int = 1 << 30):
        self.info, self.gates = info, gates
        self.cells: dict[tuple[int, int], PatternIR] = {}
        self.gated: dict[int, list[int]] = {}
        self.dynamic: dict[int, list[int]] = {}
        for (ly, h), ir in lower_plan(info).items():
            if ir.bias is not None:
                raise ValueError(f"cell {(ly, h)}: pattern {ir.name} has a bias; masks only")
            if pattern_is_gated(ir):
                if gates is None:
                    raise ValueError(f"cell {(ly, h)} is gated: pass the gates")
                self.gated.setdefault(ly, []).append(h)
            elif ir.dynamic and dyn.supported(ir):
                self.dynamic.setdefault(ly, []).append(h)
            elif ir.dynamic:
                raise ValueError(f"cell {(ly, h)}: dynamic pattern {ir.name} reads run-time "
                                 "data apply() does not have (segment ids); static, gated, "
                                 "vertical-slash and block top-k patterns are supported")
            self.cells[(ly, h)] = PatternIR(ir.name, rewrite(ir.mask))
        for ly in self.gated:
            self.gated[ly].sort()
        self.cache: OrderedDict = OrderedDict()
        self.cache_bytes, self._bytes = cache_bytes, 0
        # (layer, head) -> [kept pairs, causal pairs, kept blocks, causal blocks]
        self.stats: dict[tuple[int, int], list[float]] | None = None
        self.stats_block = gates.block if gates is not None and gates.block > 0 else 64

    def density(self, heads: str = "all") -> tuple[float, float]:
        """(element, block) density over the recorded cells: "all", "gated" or "static"."""
        if not self.stats:
            raise ValueError("no statistics: apply(..., stats=True) and run the model")
        def want(c):
            g = c[1] in self.gated.get(c[0], [])
            return heads == "all" or (heads == "gated") == g
        rows = [v for c, v in self.stats.items() if want(c)]
        tot = [sum(x[i] for x in rows) for i in range(4)]
        return tot[0] / max(tot[1], 1), tot[2] / max(tot[3], 1)

    def static(self, ly: int, h: int, n: int, q_len: int) -> torch.Tensor:
        from attnc.autotune.apply import static_mask

        return static_mask(self, self.cells[(ly, h)], h, n, q_len)

    def scores(self, ly: int, q: torch.Tensor, k: torch.Tensor) -> dict[int, torch.Tensor]:
        """The gate's block scores of the layer's gated heads, keyed by block size as
        attnc.reference's gates= takes them."""
        g = self.gates[ly]
        n = k.shape[-2]
        dev = g.wq.device  # gates on the CPU serve a model on a GPU, and the other way round
        with torch.no_grad():
            s = g(q.float().to(dev), k.float().to(dev))
        # The reference evaluator that expands them to element masks runs on the CPU.
        return {g.block_size(n): s[self.gated[ly]].cpu()}

    def rows(self, ly: int, n: int, q_len: int, s: int, e: int,
             scores: dict[int, torch.Tensor] | None,
             sel: dyn.Selection | None = None) -> torch.Tensor:
        """[H, e - s, n] bool: rows s..e-1 of the layer's masks (queries: last q_len); `sel`:
        the dynamic heads' selections on this input."""
        H = self.info.heads
        gated = self.gated.get(ly, [])
        dynamic = self.dynamic.get(ly, [])
        out = torch.empty(H, e - s, n, dtype=torch.bool)
        q0 = n - q_len
        for h in range(H):
            if h in dynamic:
                m = dyn.mask_rows(self.cells[(ly, h)], sel, np.arange(q0 + s, q0 + e), h)
                out[h] = torch.from_numpy(np.ascontiguousarray(m))
            elif h not in gated:
                out[h] = self.static(ly, h, n, q_len)[s:e]
        if gated:
            ev = reference.evaluate_plan(self.info, layer=ly, n=n, q_start=n - q_len + s,
                                         q_len=e - s, gates=scores, heads=gated)
            causal = torch.arange(n).view(1, -1) <= ev.q_positions.view(-1, 1)
            out[gated] = ev.mask & causal
        return out

    def record(self, ly: int, m: torch.Tensor, n: int, q_len: int, s: int) -> None:
        """Accumulate per (layer, head): kept pairs, causal pairs, and (for a full prefill in
        chunks aligned to `stats_block`) kept and causal blocks of stats_block x stats_block."""
        if self.stats is None:
            return
        r = m.shape[1]
        q0 = n - q_len + s
        causal = float(((torch.arange(q0, q0 + r) + 1)).sum())
        kept = m.sum(dim=(1, 2)).tolist()
        bk, bc = [0.0] * len(kept), 0.0
        blk = self.stats_block
        if q_len == n and s % blk == 0:
            rb, kb = -(-r // blk), -(-n // blk)
            mp = F.pad(m, (0, kb * blk - n, 0, rb * blk - r))
            bk = mp.view(m.shape[0], rb, blk, kb, blk).any(4).any(2).sum(dim=(1, 2)).tolist()
            bc = float(sum(s // blk + i + 1 for i in range(rb)))
        for h, x in enumerate(kept):
            st = self.stats.setdefault((ly, h), [0.0, 0.0, 0.0, 0.0])
            st[0] += x
            st[1] += causal
            st[2] += bk[h]
            st[3] += bc


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
              **kwargs):
    """The registered attention function: the plan's static masks and, for gated heads, the
    gate's block selection expanded to elements (attnc.reference), then masked attention a
    chunk of queries at a time (the CPU reference path)."""
    masks: _Masks = module._attnc_gate_masks
    ly = module.layer_idx
    B, H, Lq, D = query.shape
    n = key.shape[2]
    scale = scaling if scaling is not None else D ** -0.5
    extra = padding_mask(attention_mask, n)
    gqa = key.shape[1] != H
    out = torch.empty_like(query)
    chunk = max(1, (1 << 24) // max(1, H * n))
    if masks.stats is not None and chunk > masks.stats_block:
        chunk -= chunk % masks.stats_block  # block statistics need block-aligned chunks
    q0 = n - Lq
    for b in range(B):
        sc = masks.scores(ly, query[b], key[b]) if ly in masks.gated else None
        sel = dyn.Selection(query[b].float(), key[b].float(), scale) \
            if ly in masks.dynamic else None
        for s in range(0, Lq, chunk):
            e = min(Lq, s + chunk)
            kend = q0 + e  # keys after the chunk's last query are masked for every head
            m = masks.rows(ly, n, Lq, s, e, sc, sel)
            if b == 0:
                masks.record(ly, m, n, Lq, s)
            m = m[:, :, :kend].unsqueeze(0).to(query.device)
            if extra is not None:
                m = m & extra[b:b + 1, :, s:e, :kend]
            o = F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, :kend],
                                               value[b:b + 1, :, :kend], attn_mask=m,
                                               scale=scale, enable_gqa=gqa)
            out[b:b + 1, :, s:e] = o
    return out.transpose(1, 2).contiguous(), None


def apply(model, plan, *, gates: GateSet | TrainResult | str | Path | None = None,
          stats: bool = False, **kwargs):
    """Make `model` attend with `plan`, which may contain gated cells. `gates`: a GateSet (or
    train_gate's result) or the path of its safetensors file; by default the file next to the
    plan (plan.gates.safetensors) when the plan is a path. Weights are checked against the
    model and the plan. With `stats`, kept / causal pairs per (layer, head) are accumulated in
    the returned object's `stats`. Plans without gated cells (and the per-cell mappings of
    attnc.autotune.apply) go to attnc.autotune.apply.apply unless stats are asked for.
    Undo with remove(model)."""
    from attnc.autotune import apply as static

    if gates is None and not stats and not isinstance(plan, (str, Path, PlanInfo, Program)):
        return static.apply(model, plan, **kwargs)
    info = _plan_info(plan)
    if gates is None and not stats and gate_cells(info)[0] is None and \
            not any(ir.dynamic for ir in lower_plan(info).values()):
        return static.apply(model, info, **kwargs)
    if kwargs:
        raise TypeError(f"unexpected arguments {sorted(kwargs)} for a gated plan")
    L, H, _, _ = shape(model)
    if (info.layers, info.heads) != (L, H):
        raise ValueError(f"the plan is for {info.layers} layers x {info.heads} heads; the model "
                         f"has {L} x {H}")
    pb, pcells = gate_cells(info)
    if gates is None and pb is None:
        pass  # a plan without gated cells attends with its static masks only
    elif gates is None:
        if not (isinstance(plan, Path) or (isinstance(plan, str) and plan.endswith(".attn"))):
            raise ValueError("pass gates= (the plan is not a file with weights next to it)")
        gates = gates_path(plan)
    if isinstance(gates, TrainResult):
        gates = gates.gates
    if isinstance(gates, (str, Path)):
        gates = load_gates(gates, model=model, plan=info)
    elif gates is not None:
        if pb is not None and (pb != gates.block or set(pcells) - set(gates.cells)):
            raise AttncError(f"the gates (block {gates.block}) do not cover plan "
                             f"'{info.name}' (block {pb})")
        if gates.meta.get("model_id") not in (None, model_id(model)):
            raise AttncError("the gates were trained for another model; retrain them")
    masks = _Masks(info, gates)
    if stats:
        masks.stats = {}
    static.install(model, "_attnc_gate_masks", masks, attention)
    return masks


__all__ = ["NAME", "apply", "finetune_gate", "gates_path", "load_gates", "perplexity", "remove",
           "save_gates", "train_gate"]
