"""Retrieval heads: how much attention each head pays to a fact when the model recalls it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .candidates import candidate
from .capture import capture

# A sample: token ids and, per needle, (fact start, fact end, answer start, answer end), the
# layout autotune.text.retrieval_ids(..., spans=True) returns.
Sample = tuple[Sequence[int], Sequence[tuple[int, int, int, int]]]


def fact_mass(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, lo: int, hi: int,
              scaling: float) -> torch.Tensor:
    """Per query head, the mean over `rows` of the causal softmax attention mass on keys
    lo..hi-1. q [H, L, D] and k [G, L, D] post-RoPE (H a multiple of G). Only the rows are
    formed (len(rows) x L scores per head), never the L x L map."""
    H, G = q.shape[0], k.shape[0]
    top = int(rows.max()) + 1
    kx = k[:, :top].repeat_interleave(H // G, 0).float()
    s = torch.einsum("hrd,hkd->hrk", q[:, rows].float(), kx) * scaling
    causal = torch.arange(top).view(1, -1) <= rows.view(-1, 1)
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    return p[:, :, lo:hi].sum(-1).mean(-1)


def retrieval_scores(model, samples: Sequence[Sample]) -> np.ndarray:
    """[layers, heads]: for every needle of every sample, the attention mass that the rows
    predicting the answer's key tokens put on the sentences that state the fact, averaged.
    A head that copies the key from far back scores near 1, a local or sink head near 0:
    DuoAttention's retrieval heads, measured on the dense model instead of trained (one
    forward pass per sample, no gradients)."""
    total, count = None, 0
    for ids, spans in samples:
        if not spans:
            continue
        cap = capture(model, torch.as_tensor(list(ids)).view(1, -1), grad=False)
        if total is None:
            total = np.zeros((len(cap.layers), cap.heads))
        for f0, f1, a0, a1 in spans:
            if not 0 <= f0 < f1 <= a0 - 1 < a1 <= cap.n:
                raise ValueError(f"retrieval span ({f0}, {f1}, {a0}, {a1}) does not fit a "
                                 f"sample of {cap.n} tokens (fact before its answer)")
            # The row before each answer token predicts it.
            rows = torch.arange(a0 - 1, a1 - 1)
            for ly, lc in enumerate(cap.layers):
                total[ly] += fact_mass(lc.q, lc.k, rows, f0, f1, cap.scaling).numpy()
            count += 1
    if not count:
        raise ValueError("no retrieval samples with needles")
    return total / count


def retrieval_influence(model, samples: Sequence[Sample], *, sink: int = 64,
                        window: int = 256, chunk: int = 512) -> np.ndarray:
    """[layers, heads]: the first-order increase of the recalled keys' loss when a head loses
    its long-range view (keeps only `sink` + `window` keys), summed over every row of the
    sample: sum <dL/do, o_local - o> with L the mean loss of the answer tokens alone. A head
    whose far-back view the recall needs scores high even where it does not attend to the
    fact itself (it may carry the recalled key or the answer's format onwards), which the
    attention mass of retrieval_scores does not see: DuoAttention's criterion (the answers'
    loss with the head made local), to first order instead of trained. One forward and
    backward pass per sample; the local outputs are formed `chunk` rows at a time."""
    total, count = None, 0
    for ids, spans in samples:
        if not spans:
            continue
        x = torch.as_tensor(list(ids)).view(1, -1)
        labels = torch.full_like(x, -100)
        for f0, f1, a0, a1 in spans:
            if not 0 <= f0 < f1 <= a0 - 1 < a1 <= x.shape[1]:
                raise ValueError(f"retrieval span ({f0}, {f1}, {a0}, {a1}) does not fit a "
                                 f"sample of {x.shape[1]} tokens (fact before its answer)")
            labels[0, a0:a1] = x[0, a0:a1]
        cap = capture(model, x, grad=True, labels=labels)
        if total is None:
            total = np.zeros((len(cap.layers), cap.heads))
        # The library's streaming mask, once per chunk of rows for every layer and head. Rows
        # within the window see the same keys either way: only later rows can differ.
        local = candidate("streaming", sink=sink, window=window)
        chunks = []
        for r0 in range(min(window + sink, cap.n), cap.n, chunk):
            rows = torch.arange(r0, min(r0 + chunk, cap.n))
            top = int(rows[-1]) + 1
            chunks.append((rows, torch.from_numpy(local.mask_rows(rows.numpy(), top))))
        for ly, lc in enumerate(cap.layers):
            if lc.do is None:
                continue
            for h in range(cap.heads):
                g = h // cap.group
                acc = 0.0
                for rows, keep in chunks:
                    top = keep.shape[1]
                    s = (lc.q[h, rows] @ lc.k[g, :top].T) * cap.scaling
                    o_loc = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ lc.v[g, :top]
                    acc += float((lc.do[h, rows] * (o_loc - lc.o[h, rows])).sum())
                total[ly, h] += acc
        count += 1
    if not count:
        raise ValueError("no retrieval samples with needles")
    return total / count


def unit_scores(scores: np.ndarray, kv_heads: int, granularity: str = "kv",
                reduce: str = "max") -> np.ndarray:
    """[layers, units]: per KV head its best query head's score (`reduce` "max", for attention
    mass) or its query heads' sum ("sum", for influence: a unit made local changes all its
    query heads together); with granularity "q" the heads' own."""
    L, H = scores.shape
    if granularity != "kv":
        return scores
    per = scores.reshape(L, kv_heads, H // kv_heads)
    if reduce not in ("max", "sum"):
        raise ValueError(f"reduce must be 'max' or 'sum', not {reduce!r}")
    return per.max(-1) if reduce == "max" else per.sum(-1)


def top_units(scores: np.ndarray, count: int, kv_heads: int, granularity: str = "kv",
              reduce: str = "max") -> list[tuple[int, int]]:
    """The `count` units (layer, KV head) or (layer, query head) with the highest retrieval
    score (a KV head scores as its best query head, or its heads' sum), best first."""
    per = unit_scores(scores, kv_heads, granularity, reduce)
    flat = np.argsort(-per.reshape(-1), kind="stable")[:max(count, 0)]
    return [(int(i) // per.shape[1], int(i) % per.shape[1]) for i in flat]


__all__ = ["Sample", "fact_mass", "retrieval_influence", "retrieval_scores", "top_units",
           "unit_scores"]
