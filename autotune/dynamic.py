"""Dynamic selectors (vertical-slash columns and diagonals, block top-k) on one layer's Q and K,
chosen as attnc.reference chooses them, without forming the n x n scores."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from attnc.compiler.ir import Op, PatternIR, Sel, Var, walk
from attnc.compiler.numeric import evaluate as num_eval
from attnc.compiler.rules import rewrite

F64 = torch.float64
# Selectors this module computes from Q and K (the learned gate has its own module; segment
# ids are data, not a head's choice).
KINDS = ("in_columns", "in_diagonals", "top_blocks")


def selectors(ir: PatternIR) -> list[Sel]:
    """The pattern's selector nodes (deduplicated, in a stable order)."""
    out: dict[Sel, None] = {}
    for x in walk(ir.mask):
        if isinstance(x, Sel):
            out[x] = None
    return sorted(out, key=repr)


def _param(sel: Sel, name: str, n: int, head: int) -> int:
    v = num_eval(sel.param(name), {"n": np.int64(n), "h": np.int64(head)})
    return int(np.asarray(v).reshape(-1)[0])


def _rank_keep(score: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` largest entries of a 1-D score (ties to the lower index), as flags."""
    order = torch.sort(-score, stable=True).indices
    keep = torch.zeros(score.numel(), dtype=torch.bool)
    keep[order[:max(count, 0)]] = True
    return keep


class Selection:
    """The index sets of a layer's dynamic selectors for one sequence: q [H, Lq, D] (query
    positions n - Lq .. n - 1), k [G, n, D] (GQA: query head h reads KV head h // (H // G)),
    logits scaled by `scale`. Per head and selector: flags over keys (columns), offsets
    (diagonals) or [query block, key block] pairs, computed on first use."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, scale: float):
        self.q, self.k, self.scale = q, k, scale
        self.H, self.Lq = q.shape[0], q.shape[1]
        self.n = k.shape[1]
        self.group = self.H // k.shape[0]
        self.q_start = self.n - self.Lq
        self._probs: dict[tuple[int, int], torch.Tensor] = {}
        self._data: dict[tuple[Sel, int], torch.Tensor] = {}

    def _last_rows(self, h: int, last_q: int) -> torch.Tensor:
        """Causal softmax of the last `last_q` query rows of head h: [R, n] float64."""
        key = (h, last_q)
        if key not in self._probs:
            r = min(max(last_q, 0), self.Lq)
            qr = self.q[h, self.Lq - r:].to(F64)
            s = (qr @ self.k[h // self.group].to(F64).T) * self.scale
            pos = torch.arange(self.q_start + self.Lq - r, self.q_start + self.Lq).view(-1, 1)
            s = s.masked_fill(torch.arange(self.n).view(1, -1) > pos, float("-inf"))
            self._probs[key] = torch.softmax(s, dim=-1).nan_to_num(0.0)
        return self._probs[key]

    def flags(self, sel: Sel, h: int) -> torch.Tensor:
        """Head h's choice of `sel`: [n] flags (columns, diagonal offsets) or [nb, nb]."""
        key = (sel, h)
        if key in self._data:
            return self._data[key]
        n = self.n
        if sel.kind in ("in_columns", "in_diagonals"):
            p = self._last_rows(h, _param(sel, "last_q", n, h))
            if sel.kind == "in_columns":
                score = p.sum(0)
                forced = _param(sel, "keep_first", n, h)
            else:
                r = p.shape[0]
                pos = torch.arange(self.q_start + self.Lq - r, self.q_start + self.Lq)
                d = (pos.view(-1, 1) - torch.arange(n).view(1, -1)).clamp(min=0)
                score = torch.zeros(n, dtype=F64).scatter_add_(0, d.reshape(-1), p.reshape(-1))
                forced = _param(sel, "keep_near", n, h)
            score = torch.where(torch.arange(n) < forced, torch.tensor(float("inf"), dtype=F64),
                                score)
            out = _rank_keep(score, _param(sel, "count", n, h))
        elif sel.kind == "top_blocks":
            out = self._top_blocks(sel, h)
        else:
            raise ValueError(f"selector {sel.kind} is not chosen from Q and K")
        self._data[key] = out
        return out

    def _top_blocks(self, sel: Sel, h: int) -> torch.Tensor:
        n, b = self.n, max(_param(sel, "block", self.n, h), 1)
        causal = bool(_param(sel, "causal", n, h))
        nb = -(-n // b)
        qpos = torch.arange(self.q_start, n)
        qb = qpos // b
        # The mean logit over a (query block, key block) pair is mean-pooled Q . mean-pooled K
        # (the evaluated queries of the block, all its keys).
        qs = torch.zeros(nb, self.q.shape[-1], dtype=F64).index_add_(0, qb, self.q[h].to(F64))
        qc = torch.zeros(nb, dtype=F64).index_add_(0, qb, torch.ones(self.Lq, dtype=F64))
        kb = torch.arange(n) // b
        ks = torch.zeros(nb, self.k.shape[-1], dtype=F64).index_add_(
            0, kb, self.k[h // self.group].to(F64))
        kc = torch.zeros(nb, dtype=F64).index_add_(0, kb, torch.ones(n, dtype=F64))
        mean = (qs / qc.clamp(min=1).view(-1, 1)) @ (ks / kc.clamp(min=1).view(-1, 1)).T
        mean = mean * self.scale
        last = torch.full((nb,), -1, dtype=torch.int64).scatter_reduce_(0, qb, qpos, "amax")
        el = last.view(-1, 1) >= 0
        if causal:
            el = el & (torch.arange(nb).view(1, -1) * b <= last.view(-1, 1))
        mean = torch.where(el, mean, torch.tensor(float("-inf"), dtype=F64))
        count = _param(sel, "count", n, h)
        keep = torch.stack([_rank_keep(mean[i], count) for i in range(nb)]) if nb else \
            torch.zeros(0, 0, dtype=torch.bool)
        return keep & el

    def lookup(self, sel: Sel, h: int, elem, q: np.ndarray, k: np.ndarray) -> np.ndarray:
        """The selector's value at element `elem` (columns, diagonals) or at (q, k)."""
        f = self.flags(sel, h).numpy()
        if sel.kind == "top_blocks":
            b = max(_param(sel, "block", self.n, h), 1)
            qi, ki = np.broadcast_arrays(q // b, k // b)
            ok = (qi >= 0) & (qi < f.shape[0]) & (ki >= 0) & (ki < f.shape[1])
            return np.where(ok, f[np.clip(qi, 0, max(f.shape[0] - 1, 0)),
                                  np.clip(ki, 0, max(f.shape[1] - 1, 0))], False)
        e = np.asarray(elem, dtype=np.int64)
        ok = (e >= 0) & (e < f.shape[0])
        return np.where(ok, f[np.clip(e, 0, f.shape[0] - 1)], False)


def mask_rows(ir: PatternIR, sel: Selection, rows: np.ndarray, head: int) -> np.ndarray:
    """[len(rows), n] bool: the dynamic pattern's mask on query positions `rows` for head
    `head`, intersected with causal."""
    n = sel.n
    q = np.asarray(rows, dtype=np.int64).reshape(-1, 1)
    k = np.arange(n, dtype=np.int64).reshape(1, -1)
    form = _form(ir)
    if form is not None:
        # The two library forms directly (the tuner evaluates them for every head, layer and
        # length): column flags or'ed with diagonal flags at q - k, or a block lookup.
        causal = k <= q
        if form[0] == "vs":
            cols = sel.flags(form[1][0], head).numpy()
            diags = sel.flags(form[1][1], head).numpy()
            return causal & (cols[None, :] | diags[np.clip(q - k, 0, n - 1)])
        f = sel.flags(form[1][0], head).numpy()
        b = max(_param(form[1][0], "block", n, head), 1)
        return causal & f[np.ix_(q[:, 0] // b, k[0] // b)]

    def pick(s: Sel, elem):
        return sel.lookup(s, head, elem, q, k)

    m = num_eval(ir.mask, {"q": q, "k": k, "h": np.int64(head), "n": np.int64(n)},
                 selectors=pick)
    return np.broadcast_to(m, (q.shape[0], n)) & (k <= q)


@lru_cache(maxsize=256)
def _form(ir: PatternIR) -> tuple[str, tuple[Sel, ...]] | None:
    """("vs", (columns, diagonals)) for causal & (k in C | q - k in D), ("blocks", (sel,))
    for causal & top_blocks(...): the forms whose kept pairs have closed forms."""
    m = rewrite(ir.mask)
    causal = Op("le", (Var("k"), Var("q")))
    if not (isinstance(m, Op) and m.op == "and" and len(m.args) == 2 and causal in m.args):
        return None
    rest = next(a for a in m.args if a != causal)
    if isinstance(rest, Sel) and rest.kind == "top_blocks":
        return "blocks", (rest,)
    if isinstance(rest, Op) and rest.op == "or" and len(rest.args) == 2:
        col = [a for a in rest.args if isinstance(a, Sel) and a.kind == "in_columns"
               and a.elem == Var("k")]
        dia = [a for a in rest.args if isinstance(a, Sel) and a.kind == "in_diagonals"
               and a.elem == Op("sub", (Var("q"), Var("k")))]
        if len(col) == 1 and len(dia) == 1:
            return "vs", (col[0], dia[0])
    return None


def pair_density(ir: PatternIR, sel: Selection, head: int, chunk: int = 512) -> float:
    """Kept / causal pairs of the dynamic pattern over the evaluated queries (positions
    n - Lq .. n - 1): closed forms for vertical-slash and block top-k, else row chunks."""
    n, q0 = sel.n, sel.q_start
    causal = (n * (n + 1) - q0 * (q0 + 1)) / 2
    form = _form(ir)
    if form is not None and form[0] == "vs":
        cols = torch.nonzero(sel.flags(form[1][0], head)).view(-1)
        diags = torch.nonzero(sel.flags(form[1][1], head)).view(-1)
        # A column c is kept by the queries q >= max(c, q0); a diagonal d by q >= max(d, q0);
        # both hold at q = c + d when that query is evaluated.
        kept = float((n - torch.clamp(cols, min=q0)).sum()
                     + (n - torch.clamp(diags, min=q0)).sum())
        ds = torch.sort(diags).values
        lo = torch.searchsorted(ds, (q0 - cols).clamp(min=0))
        hi = torch.searchsorted(ds, n - cols, right=False)
        kept -= float((hi - lo).clamp(min=0).sum())
        return kept / causal
    if form is not None and form[0] == "blocks" and q0 == 0:
        from .signals import _block_pairs

        s_ = form[1][0]
        b = max(_param(s_, "block", n, head), 1)
        return float((sel.flags(s_, head).double() * _block_pairs(n, b)).sum()) / causal
    kept = sum(int(mask_rows(ir, sel, np.arange(s, min(n, s + chunk)), head).sum())
               for s in range(q0, n, chunk))
    return kept / causal


def supported(ir: PatternIR) -> bool:
    """Whether every selector of the pattern is one this module chooses from Q and K."""
    sels = selectors(ir)
    return bool(sels) and all(s.kind in KINDS for s in sels)


__all__ = ["KINDS", "Selection", "mask_rows", "pair_density", "selectors", "supported"]
