"""Capture per layer and head what the signals need: post-RoPE Q and K, V, the attention output
and the gradient of the loss w.r.t. it, from a transformers model run on calibration ids."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

_CAPTURE = "attnc_capture"


@dataclass
class LayerCapture:
    q: torch.Tensor  # [H, L, D] post-RoPE queries (float32)
    k: torch.Tensor  # [G, L, D] post-RoPE keys
    v: torch.Tensor  # [G, L, D]
    o: torch.Tensor  # [H, L, D] attention output (before o_proj)
    do: torch.Tensor | None = None  # [H, L, D] d loss / d o


@dataclass
class Capture:
    n: int
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    loss: float
    layers: list[LayerCapture] = field(default_factory=list)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


class _Recorder:
    def __init__(self, grad: bool):
        self.grad = grad
        self.layers: dict[int, LayerCapture] = {}
        self.scaling = 1.0

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 **kwargs):
        if query.shape[0] != 1:
            raise ValueError("capture runs one sequence at a time (batch 1)")
        idx = module.layer_idx
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        self.scaling = float(scale)
        # CPU flash attention: O(L) memory in forward and backward, so long contexts fit.
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                             enable_gqa=key.shape[1] != query.shape[1])
        rec = LayerCapture(query[0].detach().float().clone(), key[0].detach().float().clone(),
                           value[0].detach().float().clone(), out[0].detach().float().clone())
        self.layers[idx] = rec
        if self.grad and out.requires_grad:
            def hook(g, rec=rec):
                rec.do = g[0].detach().float().clone()
            out.register_hook(hook)
        return out.transpose(1, 2).contiguous(), None


def _register(fn) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_CAPTURE, fn)


class use_attention:
    """Context manager: run a transformers model with attention implementation `name`."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    def __enter__(self):
        self.before = self.model.config._attn_implementation
        self.model.set_attn_implementation(self.name)
        return self.model

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.before)
        return False


def capture(model, ids: torch.Tensor, *, grad: bool = True,
            labels: torch.Tensor | None = None) -> Capture:
    """Run `model` on ids [1, L] (or [L]) with the loss on every next token, recording each
    layer's post-RoPE Q, K, V and attention output, and (grad=True) the gradient of the mean
    next-token loss w.r.t. each attention output. `labels` (transformers' convention: the
    token at each position, -100 where it does not count) restricts the loss, e.g. to the
    answer tokens of a retrieval sample. Parameters get no gradients; memory is
    O(layers * L * hidden) plus the model's own activations (attention never forms L x L)."""
    ids = ids.reshape(1, -1)
    labels = ids if labels is None else labels.reshape(1, -1)
    if labels.shape != ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match ids {tuple(ids.shape)}")
    cfg = model.config
    rec = _Recorder(grad)
    _register(rec)
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        with use_attention(model, _CAPTURE), torch.set_grad_enabled(grad):
            emb = model.get_input_embeddings()(ids).detach()
            if grad:
                emb.requires_grad_(True)
            out = model(inputs_embeds=emb, labels=labels, use_cache=False)
            if grad:
                out.loss.backward()
            loss = float(out.loss.detach())
    finally:
        for p, r in zip(model.parameters(), params, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = [rec.layers[i] for i in sorted(rec.layers)]
    return Capture(ids.shape[1], heads, kv, head_dim, rec.scaling, loss, layers)


__all__ = ["Capture", "LayerCapture", "capture", "use_attention"]
