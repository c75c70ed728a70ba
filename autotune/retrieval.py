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
        cap = capture(model, x, grad=True, labels=_answer_labels(x, spans))
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


def _answer_labels(x: torch.Tensor, spans) -> torch.Tensor:
    """transformers labels that count the needles' answer tokens alone (-100 elsewhere)."""
    labels = torch.full_like(x, -100)
    for f0, f1, a0, a1 in spans:
        if not 0 <= f0 < f1 <= a0 - 1 < a1 <= x.shape[1]:
            raise ValueError(f"retrieval span ({f0}, {f1}, {a0}, {a1}) does not fit a "
                             f"sample of {x.shape[1]} tokens (fact before its answer)")
        labels[0, a0:a1] = x[0, a0:a1]
    return labels


def gradient_rows(cap, spans, count: int) -> np.ndarray:
    """The query positions that carry most of the answer loss's gradient: every row that
    predicts an answer token, then the rows with the largest |dL/do|^2 summed over layers and
    heads, `count` in all (fewer if the sample is shorter), sorted."""
    energy = torch.zeros(cap.n, dtype=torch.float64)
    for lc in cap.layers:
        if lc.do is not None:
            energy += (lc.do.double() ** 2).sum((0, 2))
    must = sorted({r for _, _, a0, a1 in spans for r in range(a0 - 1, a1 - 1)})
    energy[must] = float("inf")
    k = min(max(count, len(must)), cap.n)
    return np.sort(torch.topk(energy, k).indices.numpy()).astype(np.int64)


def recall_signal(model, samples: Sequence[Sample], candidates, *, rows: int = 256,
                  gates=None, progress=None) -> np.ndarray:
    """[layers, heads, candidates]: MoA's first-order loss influence of each candidate's
    dropped pairs (autotune.signals.compute) with the loss of the recalled answers' tokens
    alone, summed over the samples. Prose calibration barely weighs a fact recalled from far
    back, so its signals let a plan drop the keys that recall needs; this signal makes the
    knapsack pay for exactly those (MoA's point about calibration data with long-range
    dependencies, on the answers' loss as DuoAttention measures it). Per sample: one forward
    and backward pass, then the signals on the `rows` query positions that carry most of the
    answers' gradient (gradient_rows), where a uniform sample would mostly miss them. Gated
    candidates need `gates`. `progress(k)` is called per layer of each sample."""
    from .signals import compute

    total = None
    for ids, spans in samples:
        if not spans:
            continue
        x = torch.as_tensor(list(ids)).view(1, -1)
        cap = capture(model, x, grad=True, labels=_answer_labels(x, spans))
        rws = gradient_rows(cap, spans, rows)
        sig = compute([cap], candidates, row_sets=[rws], gates=gates, progress=progress)
        del cap
        total = sig.influence[0] if total is None else total + sig.influence[0]
    if total is None:
        raise ValueError("no retrieval samples with needles")
    return total


def _answer_rows(spans) -> torch.Tensor:
    """The rows that predict the needles' answer tokens, needle after needle."""
    return torch.tensor([r for _, _, a0, a1 in spans for r in range(a0 - 1, a1 - 1)])


def _recalled(right: torch.Tensor, spans) -> int:
    """Needles whose every answer token is right (`right` over _answer_rows(spans))."""
    hits, k = 0, 0
    for _, _, a0, a1 in spans:
        hits += bool(right[k:k + a1 - a0].all())
        k += a1 - a0
    return hits


def answer_recall(model, samples: Sequence[Sample]) -> tuple[int, int, float]:
    """(needles recalled, needles, mean loss of the answer tokens in nats) of `model` as it is
    (a plan applied or not): a needle is recalled when every token of its key is the model's
    top prediction after the text before it (teacher forcing: greedy decoding from the
    question gives the same key). Logits are formed for the answer rows only."""
    from .model import model_device

    hits = needles = 0
    nll, tokens = 0.0, 0
    dev = model_device(model)
    for ids, spans in samples:
        if not spans:
            continue
        x = torch.as_tensor(list(ids)).view(1, -1)
        _answer_labels(x, spans)  # the spans' checks
        rows = _answer_rows(spans)
        with torch.no_grad():
            logits = model(x.to(dev), logits_to_keep=rows.to(dev), use_cache=False).logits
        logp = torch.log_softmax(logits[0].float().cpu(), -1)
        want = x[0, rows + 1]
        nll -= float(logp[torch.arange(rows.numel()), want].sum())
        tokens += rows.numel()
        hits += _recalled(logp.argmax(-1) == want, spans)
        needles += len(spans)
    if not needles:
        raise ValueError("no retrieval samples with needles")
    return hits, needles, nll / tokens


def loss_and_recall(model, ids, spans) -> tuple[float, int, int]:
    """One forward pass over a retrieval sample: its mean next-token loss over every token (as
    autotune.apply.perplexity takes it) and (needles recalled, needles) as answer_recall
    counts them, so a sample that is in the objective is checked for recall at no extra
    pass."""
    from .model import model_device

    x = torch.as_tensor(list(ids)).view(1, -1)
    _answer_labels(x, spans)  # the spans' checks
    with torch.no_grad():
        logits = model(x.to(model_device(model)), use_cache=False).logits[0, :-1]
    logp = torch.log_softmax(logits.float(), -1).cpu()
    del logits
    want = x[0, 1:]
    loss = -float(logp[torch.arange(want.numel()), want].mean())
    rows = _answer_rows(spans)
    return loss, _recalled(logp[rows].argmax(-1) == want[rows], spans), len(spans)


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


__all__ = ["Sample", "answer_recall", "fact_mass", "gradient_rows", "loss_and_recall",
           "recall_signal", "retrieval_influence", "retrieval_scores", "top_units", "unit_scores"]
