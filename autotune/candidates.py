"""Candidate patterns per head: every shipped static family over a grid of (elastic) arguments."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch
from attnc.compiler.ir import PatternIR, free_vars
from attnc.compiler.lower import lower_pattern
from attnc.compiler.numeric import evaluate as num_eval
from attnc.compiler.rules import rewrite
from attnc.dsl.check import loads
from attnc.dsl.parser import parse_expr

DENSE = "causal"

# Argument grids. Sizes are MoA-style elastic `alpha + n // d` (alpha + beta * n with beta = 1/d)
# so that one plan serves several lengths; constants are the alpha = 0 / beta = 0 corners.
_WINDOWS = ["64 + n // 32", "128 + n // 16", "256 + n // 8", "256 + n // 4", "n // 2", "256",
            "512"]
# A finer ladder of constant windows (with 64 sinks), from very local heads to wide ones, so the
# knapsack can give each head about the window it needs instead of jumping between few sizes.
_LADDER = ["64", "128", "768", "1024", "1536", "2048"]
GRIDS: dict[str, list[dict[str, str]]] = {
    "causal": [{}],
    "streaming": [{"sink": s, "window": w} for s in ("4", "64") for w in _WINDOWS]
    + [{"sink": "64", "window": w} for w in _LADDER],
    "a_shape": [{"sink": "128", "local": w} for w in ("128 + n // 16", "256 + n // 8")],
    "dilated": [{"window": w, "dilation": d} for d in ("2", "4") for w in ("n // 16", "n // 8")],
    "shards": [{"stride": s, "step": "1", "block": "64", "local": loc}
               for s in ("4", "8") for loc in ("128 + n // 16", "256 + n // 8")],
    "radial": [{"block": "64", "dense": d, "causal": "true"} for d in ("2", "4", "8")],
    "power": [{"block": "64", "local": loc, "sink": "1"} for loc in ("2", "4", "8")],
    # Dynamic (MInference): key columns and diagonals chosen from the last 64 queries' attention
    # (the first 30 columns and the 100 nearest diagonals always kept), and block top-k from
    # mean-pooled Q and K. Their masks depend on the input: signals and densities are measured
    # on the captured Q and K per layer and head, like the learned gate's.
    "vertical_slash": [{"vertical": v, "slash": s, "last_q": "64"}
                       for v in ("30 + n // 64", "30 + n // 16")
                       for s in ("100 + n // 32", "100 + n // 16", "100 + n // 8")],
    "block_topk": [{"topk": t, "block": "64"}
                   for t in ("1 + n // 2048", "2 + n // 1024", "4 + n // 512")],
}
# Library patterns that are not candidates, and why.
NOT_CANDIDATES = {
    "dense": "bidirectional; `causal` is the dense candidate of a decoder",
    "window": "no sinks; covered by streaming(sink = 4, ...)",
    "band": "bidirectional",
    "sink": "sinks alone lose the local context",
    "prefix_lm": "a superset of causal",
    "alibi": "a bias, not a sparsity pattern",
    "document": "needs segment ids", "fixed_documents": "a data layout, not a head choice",
    "duo": "dynamic: its one-block gate has no distillation target yet",
}
# `gated` is a candidate when the tuner is given trained gates (autotune(..., gates=)): its
# masks come from the gate run on the captured Q and K (gated_candidates, signals.gate_masks).
GATED = "gated"


@dataclass(frozen=True)
class Candidate:
    """One pattern call: a family and its arguments as expression text (may use n)."""

    family: str
    args: tuple[tuple[str, str], ...] = ()

    def call_text(self) -> str:
        if not self.args:
            return self.family
        return f"{self.family}(" + ", ".join(f"{k} = {v}" for k, v in self.args) + ")"

    def __str__(self) -> str:
        return self.call_text()

    @property
    def dense(self) -> bool:
        return self.family == DENSE

    def ir(self) -> PatternIR:
        return _ir(self)

    def mask_rows(self, rows: np.ndarray, n: int, head: int = 0) -> np.ndarray:
        """The mask (intersected with causal) on query rows `rows` (absolute positions) and all
        n keys: a [len(rows), n] bool array; nothing n x n is formed unless rows has n rows.
        Static candidates only (dynamic ones: autotune.dynamic.mask_rows on a Selection)."""
        ir = self.ir()
        q = np.asarray(rows, dtype=np.int64).reshape(-1, 1)
        k = np.arange(n, dtype=np.int64).reshape(1, -1)
        m = num_eval(ir.mask, {"q": q, "k": k, "h": np.int64(head), "n": np.int64(n)})
        return np.broadcast_to(m, (q.shape[0], n)) & (k <= q)

    @property
    def head_dependent(self) -> bool:
        return "h" in free_vars(self.ir().mask)

    @property
    def gated(self) -> bool:
        """Chosen per (query block, key block) by a learned gate: its mask depends on the
        input, so its signals and density come from the gate run on captured Q and K."""
        return self.family == GATED

    @property
    def dynamic(self) -> bool:
        """Chosen at run time from the input's own Q and K (vertical-slash, block top-k): its
        signals and density come from autotune.dynamic on captured Q and K."""
        return not self.gated and _dynamic(self)

    @property
    def input_dependent(self) -> bool:
        """Gated or dynamic: the mask, and so the density, differ per layer, head and input."""
        return self.gated or self.dynamic

    def threshold(self) -> float:
        return float(dict(self.args)["threshold"])


@cache
def _library():
    return loads("", "<library>")


@lru_cache(maxsize=4096)
def _ir(c: Candidate) -> PatternIR:
    prog = _library()
    p = prog.pattern(c.family)
    args = {k: parse_expr(v, f"{c.family}.{k}") for k, v in c.args}
    low = lower_pattern(p, args)
    return PatternIR(low.name, rewrite(low.mask),
                     rewrite(low.bias) if low.bias is not None else None)


@lru_cache(maxsize=4096)
def _dynamic(c: Candidate) -> bool:
    from .dynamic import supported

    return supported(_ir(c))


def candidate(family: str, **args: object) -> Candidate:
    """A candidate from Python values or expression text: candidate("streaming", window=256)."""
    def text(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v)

    return Candidate(family, tuple((k, text(v)) for k, v in args.items()))


# The default families. `dilated` is left out: it drops every other neighbour of a query, and
# for decoder LMs its measured damage (SmolLM2: perplexity x2 and worse) is far above what
# first-order signals predict, while its block cost after the layout transform is the lowest,
# so the knapsack would favour it. Pass families=[...] to include it.
DEFAULT_FAMILIES = [f for f in GRIDS if f != "dilated"]


def grid(families: Iterable[str] | None = None) -> list[Candidate]:
    """The candidate list: dense (`causal`) first, then each family's grid (default:
    DEFAULT_FAMILIES)."""
    fams = list(DEFAULT_FAMILIES) if families is None else list(families)
    unknown = [f for f in fams if f not in GRIDS]
    if unknown:
        raise ValueError(f"unknown candidate families {unknown}; known: {sorted(GRIDS)}")
    out = [Candidate(DENSE)]
    for f in fams:
        if f == DENSE:
            continue
        out += [Candidate(f, tuple(a.items())) for a in GRIDS[f]]
    return out


def gated_candidates(block: int, thresholds) -> list[Candidate]:
    """`gated(block, topk = 0, threshold = t)` for each threshold (an adaptive block budget
    per query block row; the trained gate's scores are a distribution over the row's blocks)."""
    return [Candidate(GATED, (("block", str(block)), ("topk", "0"),
                              ("threshold", f"{float(t):.6g}"))) for t in thresholds]


def valid_at(c: Candidate, n: int) -> bool:
    """Whether the candidate's arguments are in range at length n (e.g. window = n // 16 >= 1),
    judged by the reference evaluator on the last query row."""
    from attnc.dsl.errors import AttncError

    from attnc import reference

    if c.gated:
        return n >= 1
    # Dynamic selectors read scores; any will do to check the arguments' ranges.
    scores = torch.zeros(1, 1, n, dtype=torch.float64) if c.dynamic else None
    try:
        reference.evaluate(_library(), c.family, n=n, q_len=1, scores=scores,
                           args={k: parse_expr(v) for k, v in c.args})
    except AttncError:
        return False
    return True


__all__ = ["DEFAULT_FAMILIES", "DENSE", "GATED", "GRIDS", "NOT_CANDIDATES", "Candidate",
           "candidate", "gated_candidates", "grid", "valid_at"]
