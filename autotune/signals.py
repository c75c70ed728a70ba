"""Signals per (layer, head, candidate) from captured tensors and the candidates' IR, streamed
over chunks of sampled query rows (no n x n mask per candidate is ever formed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .candidates import Candidate, valid_at
from .capture import Capture


@dataclass
class Signals:
    """Arrays are [lengths, layers, heads, candidates] (query heads)."""

    candidates: list[Candidate]
    lengths: list[int]
    heads: int
    kv_heads: int
    mass: np.ndarray  # mean kept attention mass per query row (MInference), 1 for dense
    influence: np.ndarray  # MoA first-order loss influence of the dropped pairs (nats)
    error: np.ndarray  # relative Frobenius error of the head's output
    valid: np.ndarray  # [lengths, candidates]: arguments in range at that length
    density: np.ndarray  # [lengths, heads, candidates]: kept / causal pairs
    rows: int  # query rows sampled per length
    # [lengths, layers, heads, candidates]: kept / causal pairs of input-dependent (gated)
    # candidates, measured on the captured text; NaN for static candidates (see `density`).
    layer_density: np.ndarray | None = None
    # [1, layers, heads, candidates]: MoA influence on the loss of recalled answers alone,
    # summed over retrieval samples (autotune.retrieval.recall_signal); None without samples.
    recall: np.ndarray | None = None

    @property
    def layers(self) -> int:
        return self.mass.shape[1]

    def to_json(self) -> dict:
        return {"candidates": [c.call_text() for c in self.candidates], "lengths": self.lengths,
                "heads": self.heads, "kv_heads": self.kv_heads, "rows": self.rows,
                "mass": self.mass.tolist(), "influence": self.influence.tolist(),
                "error": self.error.tolist(), "valid": self.valid.tolist(),
                "density": self.density.tolist(),
                "layer_density": None if self.layer_density is None
                else np.nan_to_num(self.layer_density, nan=-1.0).tolist(),
                "recall": None if self.recall is None else self.recall.tolist()}

    def cell_density(self, li: int, layer: int, head: int, ci: int) -> float:
        """Kept / causal pairs of candidate ci on (layer, head) at the li-th length."""
        if self.candidates[ci].input_dependent and self.layer_density is not None:
            return float(self.layer_density[li, layer, head, ci])
        return float(self.density[li, head, ci])


def sample_rows(n: int, count: int, seed: int = 0) -> np.ndarray:
    """`count` distinct query positions drawn uniformly from 0..n-1 (all of them if count >= n),
    sorted; perplexity weighs every position equally, so uniform rows are unbiased."""
    if count >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed + n)
    return np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)


@lru_cache(maxsize=2048)
def density(c: Candidate, n: int, head: int = 0, chunk: int = 512) -> float:
    """Kept pairs over causal pairs at length n (all queries), evaluated a row chunk at a time."""
    kept = 0
    for s in range(0, n, chunk):
        kept += int(c.mask_rows(np.arange(s, min(n, s + chunk)), n, head).sum())
    return kept / (n * (n + 1) / 2)


@lru_cache(maxsize=16)
def _block_pairs(n: int, block: int) -> torch.Tensor:
    """[nb, nb] float64: causal (q, k) pairs in each (query block, key block) at length n."""
    nb = -(-n // block)
    q = torch.arange(n, dtype=torch.int64).view(-1, 1)
    k0 = torch.arange(nb, dtype=torch.int64).view(1, -1) * block
    k1 = torch.clamp(k0 + block - 1, max=n - 1)
    per_q = (torch.minimum(q, k1) - k0 + 1).clamp(min=0).double()  # [n, nb]
    per_q = torch.nn.functional.pad(per_q, (0, 0, 0, nb * block - n))
    return per_q.view(nb, block, nb).sum(1)


def gate_masks(gate, q: torch.Tensor, k: torch.Tensor, rows: np.ndarray,
               cands: Sequence[Candidate]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of gated candidates on one layer's captured q [H, n, D] and k [G, n, D]: the
    gate's block scores once, then per candidate `causal & (gate(block, 0, threshold) | own
    block)` on the sampled query rows, [C', H, R, n] bool, and its kept / causal pairs over
    all n rows, [C', H] (from block pair counts: no n x n mask)."""
    from attnc.codegen.gate import eligible

    H, n, _ = q.shape
    block = gate.block
    with torch.no_grad():
        s = gate(q, k)  # [H, nb, nb], the scores the selector thresholds
    nb = s.shape[-1]
    el = eligible(nb, block, 0, n)
    own = torch.eye(nb, dtype=torch.bool) & el
    r = torch.from_numpy(rows)
    causal = torch.arange(n).view(1, -1) <= r.view(-1, 1)  # [R, n]
    pairs = _block_pairs(n, block)
    masks, dens = [], []
    for c in cands:
        keep = (el & (s.double() >= c.threshold())) | own  # [H, nb, nb]
        m = keep[:, r // block, :].repeat_interleave(block, dim=-1)[..., :n]
        masks.append(m & causal)
        dens.append((keep.double() * pairs).sum((-1, -2)) / (n * (n + 1) / 2))
    return torch.stack(masks), torch.stack(dens)


def dynamic_masks(q: torch.Tensor, k: torch.Tensor, scale: float, rows: np.ndarray,
                  cands: Sequence[Candidate]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of dynamic candidates (vertical-slash, block top-k) on one layer's captured q
    [H, n, D] and k [G, n, D]: their selectors run on this input as attnc.reference runs
    them, [C', H, R, n] bool on the sampled query rows, and kept / causal pairs over all n
    rows, [C', H] (closed forms: no n x n mask)."""
    from .dynamic import Selection, mask_rows, pair_density

    sel = Selection(q, k, scale)
    H = q.shape[0]
    masks = torch.zeros(len(cands), H, rows.size, k.shape[1], dtype=torch.bool)
    dens = torch.zeros(len(cands), H, dtype=torch.float64)
    for i, c in enumerate(cands):
        ir = c.ir()
        for h in range(H):
            masks[i, h] = torch.from_numpy(np.ascontiguousarray(mask_rows(ir, sel, rows, h)))
            dens[i, h] = pair_density(ir, sel, h)
    return masks, dens


def gate_thresholds(gates, cap: Capture, densities: Sequence[float]) -> list[float]:
    """Global gate thresholds that keep about `densities` of the causal blocks (own blocks
    counted, as `gated` keeps them) over every head of every layer on one capture."""
    from attnc.codegen.gate import density_thresholds, eligible, own_blocks_first

    _check_gates(gates, cap)
    scores = []
    with torch.no_grad():
        for ly, lc in enumerate(cap.layers):
            g = gates[ly]
            s = g(lc.q, lc.k)
            scores.append(own_blocks_first(s, eligible(s.shape[-1], g.block, 0, cap.n)))
    return density_thresholds(scores, densities)


def compute(captures: Sequence[Capture], candidates: Sequence[Candidate], *, rows: int = 512,
            chunk: int = 128, seed: int = 0,
            progress: Callable[[int], None] | None = None, gates=None,
            row_sets: Sequence[np.ndarray] | None = None) -> Signals:
    """Kept mass, MoA influence and relative output error of every candidate on every head, at
    each captured length. For a query row i with probabilities A_i, dA_i = dO_i V^T (the
    gradient w.r.t. A_i) and T_i = sum_j A_ij dA_ij, MoA's per-pair influence is
    A_ij (dA_ij - T_i) / (1 - A_ij); a row's influence is |sum over its dropped pairs|, and a
    head's is the sum over rows, scaled from the sampled rows to all n rows.

    Gated candidates (`gated_candidates`) need `gates` (a codegen.gate.GateSet covering every
    head of every layer): their masks come from the gate run on each layer's captured Q and
    K, so they, and their densities (`layer_density`), differ per layer and head.

    `row_sets` (one sorted array of distinct query positions per capture) replaces the
    uniform sample: the signals are then over those rows alone, influence summed over them
    (not scaled to all n rows), e.g. the rows that carry a retrieval answer's gradient."""
    cands = list(candidates)
    gated = [ci for ci, c in enumerate(cands) if c.gated]
    dyn = [ci for ci, c in enumerate(cands) if c.dynamic]
    if gated:
        _check_gates(gates, captures[0])
    C = len(cands)
    first = captures[0]
    H, G = first.heads, first.kv_heads
    group = H // G
    Ls = len(captures)
    nl = len(first.layers)
    mass = np.ones((Ls, nl, H, C))
    infl = np.zeros((Ls, nl, H, C))
    err = np.zeros((Ls, nl, H, C))
    valid = np.zeros((Ls, C), dtype=bool)
    dens = np.ones((Ls, H, C))
    ldens = np.full((Ls, nl, H, C), np.nan) if gated or dyn else None
    if row_sets is not None and len(row_sets) != Ls:
        raise ValueError(f"{len(row_sets)} row sets for {Ls} captures")
    for li, cap in enumerate(captures):
        n = cap.n
        if row_sets is None:
            rws = sample_rows(n, rows, seed)
        else:
            rws = np.asarray(row_sets[li], dtype=np.int64)
            if rws.ndim != 1 or rws.size == 0 or rws.min() < 0 or rws.max() >= n \
                    or (np.diff(rws) <= 0).any():
                raise ValueError(f"row set {li}: sorted distinct positions in 0..{n - 1}")
        R = rws.size
        scale = n / R if row_sets is None else 1.0
        valid[li] = [valid_at(c, n) for c in cands]
        for ci, c in enumerate(cands):
            if valid[li, ci] and not c.input_dependent:
                hs = range(H) if c.head_dependent else [0]
                d = {h: density(c, n, h) for h in hs}
                dens[li, :, ci] = [d[h if c.head_dependent else 0] for h in range(H)]
        # Masks on the sampled rows, shared by every layer: [C, R, n] per head class.
        live = [ci for ci in range(C) if valid[li, ci] and not cands[ci].dense
                and not cands[ci].input_dependent]
        dyn_live = [ci for ci in dyn if valid[li, ci]]
        by_head: dict[int, torch.Tensor] = {}
        shared = torch.from_numpy(np.stack(
            [cands[ci].mask_rows(rws, n, 0) for ci in live])) if live else None
        for h in range(H):
            if any(cands[ci].head_dependent for ci in live):
                by_head[h] = torch.from_numpy(np.stack(
                    [cands[ci].mask_rows(rws, n, h) for ci in live]))
            else:
                by_head[h] = shared
        q_idx = torch.from_numpy(rws)
        causal_all = torch.arange(n).view(1, -1) <= q_idx.view(-1, 1)
        for layer, lc in enumerate(cap.layers):
            gm = None
            if gated:
                gm, gd = gate_masks(gates[layer], lc.q, lc.k, rws, [cands[ci] for ci in gated])
                ldens[li, layer][:, gated] = gd.T.numpy()
            dm = None
            if dyn_live:
                dm, dd = dynamic_masks(lc.q, lc.k, cap.scaling, rws,
                                       [cands[ci] for ci in dyn_live])
                ldens[li, layer][:, dyn_live] = dd.T.numpy()
            ids_all = live + gated + dyn_live
            for h in range(H):
                g = h // group
                acc_mass = torch.zeros(len(ids_all), dtype=torch.float64)
                acc_infl = torch.zeros(len(ids_all), dtype=torch.float64)
                acc_err = torch.zeros(len(ids_all), dtype=torch.float64)
                norm = 0.0
                K, V = lc.k[g], lc.v[g]
                for s in range(0, R, chunk):
                    e = min(R, s + chunk)
                    qi = q_idx[s:e]
                    causal = causal_all[s:e]
                    S = (lc.q[h, qi] @ K.T) * cap.scaling
                    S = S.masked_fill(~causal, float("-inf"))
                    A = torch.softmax(S, dim=-1)
                    Od = A @ V
                    norm += float((Od.double() ** 2).sum())
                    if not ids_all:
                        continue
                    parts = ([by_head[h][:, s:e]] if live else []) + \
                        ([gm[:, h, s:e]] if gated else []) + \
                        ([dm[:, h, s:e]] if dyn_live else [])
                    M = torch.cat(parts).float()  # [C', r, n]
                    Am = M * A
                    kept = Am.sum(-1)  # [C', r]
                    acc_mass += kept.double().sum(-1)
                    Oc = (Am @ V) / kept.clamp(min=1e-30).unsqueeze(-1)
                    acc_err += ((Oc - Od).double() ** 2).sum((-1, -2))
                    if lc.do is not None:
                        dA = lc.do[h, qi] @ V.T
                        T = (A * dA).sum(-1, keepdim=True)
                        t = (A * (dA - T) / (1 - A).clamp(min=1e-6)).masked_fill(~causal, 0.0)
                        dropped = t.sum(-1) - (M * t).sum(-1)  # [C', r]
                        acc_infl += dropped.abs().double().sum(-1)
                ids = np.array(ids_all, dtype=np.int64)
                if ids_all:
                    mass[li, layer, h, ids] = (acc_mass / R).numpy()
                    err[li, layer, h, ids] = np.sqrt(acc_err.numpy() / max(norm, 1e-30))
                    infl[li, layer, h, ids] = (acc_infl * scale).numpy() \
                        if lc.do is not None else np.nan
            if progress is not None:
                progress(1)
        invalid = ~valid[li]
        mass[li][..., invalid] = 0.0
        err[li][..., invalid] = np.inf
        infl[li][..., invalid] = np.inf
    used = rows if row_sets is None else max(len(r) for r in row_sets)
    return Signals(cands, [c.n for c in captures], H, G, mass, infl, err, valid, dens,
                   int(min(used, min(c.n for c in captures))), ldens)


def _check_gates(gates, cap: Capture) -> None:
    if gates is None:
        raise ValueError("gated candidates need trained gates (gates=; attnc.train_gate)")
    missing = [ly for ly in range(len(cap.layers)) if ly not in gates]
    if missing:
        raise ValueError(f"the gates do not cover layers {missing}: gated candidates need a "
                         "gate for every layer (train_gate without a plan)")
    for ly in range(len(cap.layers)):
        g = gates[ly]
        if (g.heads, g.kv_heads, g.head_dim) != (cap.heads, cap.kv_heads, cap.head_dim):
            raise ValueError(f"layer {ly}: gates are for {g.heads} heads / {g.kv_heads} KV "
                             f"heads / head dim {g.head_dim}, the model has {cap.heads} / "
                             f"{cap.kv_heads} / {cap.head_dim}")
        if g.block == 0:
            raise ValueError("gated candidates need block gates, not the one-block gate")


__all__ = ["Signals", "compute", "density", "dynamic_masks", "gate_masks", "gate_thresholds",
           "sample_rows"]
