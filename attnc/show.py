"""Pictures of a pattern: its mask pooled into cells, as ASCII art or a PNG, with its density."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from attnc import atomic, reference
from attnc.dsl.check import PatternInfo, PlanInfo
from attnc.dsl.errors import AttncError

# Characters by kept fraction of a cell: empty, then quarter steps, then full.
SHADES = " .:+*#"
# Dynamic patterns need dense scores; keep their synthetic inputs to a few hundred MB.
MAX_DYNAMIC_N = 4096


@dataclass
class Picture:
    title: str
    fractions: torch.Tensor  # [rows, cols] kept fraction of each cell
    kept: int
    total: int
    causal_total: int  # pairs with k <= q, for the density relative to causal attention
    n: int
    q_len: int

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 0.0


def synthetic_inputs(n: int, q_len: int, heads: torch.Tensor, seed: int = 0,
                     ) -> reference.Inputs:
    """Plausible run-time inputs for showing dynamic patterns: attention logits with a few heavy
    columns and a local bias (as real heads have), random gate scores, a few documents."""
    g = torch.Generator().manual_seed(seed)
    H = heads.numel()
    d = 32
    qv = torch.randn(H, q_len, d, generator=g, dtype=torch.float64)
    kv = torch.randn(H, n, d, generator=g, dtype=torch.float64)
    scores = qv @ kv.transpose(1, 2) / d**0.5
    heavy = torch.randint(0, max(n, 1), (H, max(1, n // 256)), generator=g)
    scores.scatter_add_(2, heavy.unsqueeze(1).expand(H, q_len, -1),
                        torch.full((H, q_len, heavy.shape[1]), 4.0, dtype=torch.float64))
    qpos = torch.arange(n - q_len, n).view(1, -1, 1)
    kpos = torch.arange(n).view(1, 1, -1)
    scores = scores - 0.01 * (qpos - kpos).abs()

    def gates(block: int) -> torch.Tensor:
        nb = -(-n // block)
        return torch.rand(H, nb, nb, generator=torch.Generator().manual_seed(seed + block),
                          dtype=torch.float64)

    lengths = torch.randint(max(1, n // 8), max(2, n // 2), (n,), generator=g)
    seg = torch.repeat_interleave(torch.arange(n), lengths)[:n]
    return reference.Inputs(scores=scores, gates=gates, segments=seg)


def picture(
    target: PatternInfo | PlanInfo,
    *,
    n: int,
    head: int = 0,
    layer: int = 0,
    q_len: int | None = None,
    args: Mapping[str, object] | None = None,
    rows: int = 32,
    cols: int = 64,
    seed: int = 0,
) -> Picture:
    """Evaluate one head of a pattern (or of a plan's layer) and pool it into rows x cols cells."""
    if n < 1:
        raise AttncError(f"--n must be at least 1, not {n}")
    q_len = n if q_len is None else q_len
    if not 1 <= q_len <= n:
        raise AttncError(f"--q-len must be between 1 and n = {n}, not {q_len}")
    is_plan = isinstance(target, PlanInfo)
    if is_plan:
        if not 0 <= head < target.heads:
            raise AttncError(f"--head must be in 0..{target.heads - 1}, not {head}")
        dynamic = target.cell(layer, head).pattern.dynamic
        title = f"plan {target.name}, layer {layer}, head {head}"
    else:
        if head < 0:
            raise AttncError(f"--head must be >= 0, not {head}")
        dynamic = target.dynamic
        title = f"{target.name}, head {head}"
    if dynamic and n > MAX_DYNAMIC_N:
        raise AttncError(
            f"dynamic patterns are shown with synthetic scores, which needs n <= {MAX_DYNAMIC_N}"
        )
    rows = max(1, min(rows, q_len))
    cols = max(1, min(cols, n))
    heads = torch.tensor([head])
    inputs = synthetic_inputs(n, q_len, heads, seed) if dynamic else reference.Inputs()
    counts = torch.zeros(rows, cols, dtype=torch.float64)
    row_of = torch.arange(q_len) * rows // q_len
    col_of = torch.arange(n) * cols // n
    # Evaluate static patterns a slab of queries at a time so large n stays in memory.
    step = q_len if dynamic else max(1, (1 << 22) // max(n, 1))
    kept = 0
    start0 = n - q_len
    for lo in range(0, q_len, step):
        hi = min(q_len, lo + step)
        kw = dict(n=n, q_len=hi - lo, q_start=start0 + lo)
        if dynamic:
            kw.update(scores=inputs.scores, gates=inputs.gates, segments=inputs.segments)
        if is_plan:
            ev = reference.evaluate_plan(target, layer=layer, heads=[head], **kw)
        else:
            ev = reference.evaluate(target, heads=[head], args=args, **kw)
        m = ev.mask[0].to(torch.float64)  # [rows in slab, n]
        kept += int(m.sum())
        per_col = torch.zeros(hi - lo, cols, dtype=torch.float64).index_add_(1, col_of, m)
        counts.index_add_(0, row_of[lo:hi], per_col)
    cell_rows = torch.bincount(row_of, minlength=rows).to(torch.float64)
    cell_cols = torch.bincount(col_of, minlength=cols).to(torch.float64)
    fractions = counts / (cell_rows.view(-1, 1) * cell_cols.view(1, -1))
    total = q_len * n
    qpos = torch.arange(start0, n)
    causal_total = int((qpos + 1).sum())
    return Picture(title, fractions, kept, total, causal_total, n, q_len)


def ascii_art(pic: Picture) -> str:
    """The picture as text: one character per cell, darker for more kept pairs, with a frame."""
    top = "+" + "-" * pic.fractions.shape[1] + "+"
    lines = [top]
    for row in pic.fractions.tolist():
        chars = []
        for f in row:
            if f <= 0:
                chars.append(SHADES[0])
            elif f >= 1:
                chars.append(SHADES[-1])
            else:
                chars.append(SHADES[1 + min(3, int(f * 4))])
        lines.append("|" + "".join(chars) + "|")
    lines.append(top)
    return "\n".join(lines)


def summary(pic: Picture) -> str:
    causal = pic.kept / pic.causal_total if pic.causal_total else 0.0
    return (
        f"{pic.title}: n = {pic.n}, queries = {pic.q_len}, kept {pic.kept} of {pic.total} pairs, "
        f"density {pic.density:.2%} ({causal:.2%} of causal pairs)"
    )


def save_png(pic: Picture, path: str | os.PathLike) -> None:
    """Write the picture as a PNG, atomically (temp file then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 6 * pic.fractions.shape[0] / pic.fractions.shape[1] + 0.8))
    ax.imshow(pic.fractions.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest",
              aspect="auto", extent=(0, pic.n, pic.n, pic.n - pic.q_len))
    ax.set_xlabel("key position k")
    ax.set_ylabel("query position q")
    ax.set_title(f"{pic.title}\ndensity {pic.density:.2%}", fontsize=10)
    fig.tight_layout()
    try:
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
