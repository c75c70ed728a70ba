"""Pictures of a pattern: its mask pooled into cells, as ASCII art or a PNG, with its density."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


@dataclass
class BlockPicture:
    """The block mask of the shown head: EMPTY / PARTIAL / FULL per (query block, key block)."""

    cells: np.ndarray  # [rows, cols]: 0 empty, 1 some partial, 2 all full, 3 full and empty
    visited: int
    partial: int
    full: int
    total: int
    block_m: int
    block_n: int
    layout: str


def block_picture(target: PatternInfo | PlanInfo, *, n: int, head: int = 0, layer: int = 0,
                  q_len: int | None = None, args: Mapping[str, object] | None = None,
                  rows: int = 32, cols: int = 64, block_m: int = 128,
                  block_n: int = 128) -> BlockPicture | None:
    """Classify the blocks of one head (natural token order); None for dynamic patterns,
    whose blocks are chosen at run time."""
    from attnc.compiler.blockmask import Schedule, build
    from attnc.compiler.lower import lower_pattern

    q_len = n if q_len is None else q_len
    if isinstance(target, PlanInfo):
        a = target.cell(layer, head)
        if a.pattern.dynamic:
            return None
        ir = lower_pattern(a.pattern, call=a.call, scope=target.module.scope)
    else:
        if target.dynamic:
            return None
        ir = lower_pattern(target, dict(args or {}))
    bm = build(ir, n=n, heads=head + 1, q_len=q_len, schedule=Schedule(block_m, block_n))
    csr = bm.materialize()
    QB, KB = csr.num_q_blocks, csr.num_kv_blocks
    cls = np.zeros((QB, KB), dtype=np.int8)
    for qb in range(QB):
        cls[qb, csr.kv_indices[head, qb, : csr.kv_num_blocks[head, qb]]] = 1
        cls[qb, csr.full_kv_indices[head, qb, : csr.full_kv_num_blocks[head, qb]]] = 2
    rows = max(1, min(rows, q_len))
    cols = max(1, min(cols, n))
    # Prefix sums per class give each cell's block counts in O(1).
    sums = {}
    for code in (0, 1, 2):
        p = np.zeros((QB + 1, KB + 1), dtype=np.int64)
        p[1:, 1:] = np.cumsum(np.cumsum(cls == code, axis=0), axis=1)
        sums[code] = p
    r0 = np.arange(rows) * q_len // rows // block_m
    r1 = ((np.arange(rows) + 1) * q_len // rows - 1) // block_m
    c0 = np.arange(cols) * n // cols // block_n
    c1 = ((np.arange(cols) + 1) * n // cols - 1) // block_n
    r1 = np.maximum(r1, r0)
    c1 = np.maximum(c1, c0)

    def count(code):
        p = sums[code]
        a, b = r0[:, None], r1[:, None] + 1
        c, d = c0[None, :], c1[None, :] + 1
        return p[b, d] - p[a, d] - p[b, c] + p[a, c]

    e, pa, f = count(0), count(1), count(2)
    cells = np.where(pa > 0, 1, np.where((f > 0) & (e > 0), 3, np.where(f > 0, 2, 0)))
    part = int(csr.kv_num_blocks[head].sum())
    full = int(csr.full_kv_num_blocks[head].sum())
    return BlockPicture(cells.astype(np.int8), part + full, part, full, QB * KB, block_m,
                        block_n, "natural order")


BLOCK_CHARS = {0: " ", 1: "+", 2: "#", 3: ":"}


def block_ascii(bp: BlockPicture) -> list[str]:
    top = "+" + "-" * bp.cells.shape[1] + "+"
    lines = [top]
    for row in bp.cells.tolist():
        lines.append("|" + "".join(BLOCK_CHARS[c] for c in row) + "|")
    lines.append(top)
    return lines


def block_summary(bp: BlockPicture) -> str:
    return (f"blocks {bp.block_m}x{bp.block_n}: visited {bp.visited} of {bp.total} "
            f"({bp.full} full '#', {bp.partial} partial '+'; ':' = full and empty blocks in "
            "one cell)")


def side_by_side(left: list[str], right: list[str], gap: str = "   ") -> str:
    width = max((len(x) for x in left), default=0)
    rows = max(len(left), len(right))
    left = left + [""] * (rows - len(left))
    right = right + [""] * (rows - len(right))
    return "\n".join(f"{a.ljust(width)}{gap}{b}".rstrip() for a, b in zip(left, right,
                                                                            strict=True))


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


def save_png(pic: Picture, path: str | os.PathLike, blocks: BlockPicture | None = None) -> None:
    """Write the picture (and the block mask beside it) as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    path = Path(path)
    aspect = pic.fractions.shape[0] / pic.fractions.shape[1]
    ncols = 2 if blocks is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 6 * aspect + 0.9), squeeze=False)
    extent = (0, pic.n, pic.n, pic.n - pic.q_len)
    if blocks is not None:
        ax = axes[0][0]
        cmap = ListedColormap(["#ffffff", "#f4a340", "#1f5fa8", "#9fb8d8"])
        ax.imshow(blocks.cells, cmap=cmap, vmin=0, vmax=3, interpolation="nearest",
                  aspect="auto", extent=extent)
        ax.set_title(f"blocks {blocks.block_m}x{blocks.block_n}: {blocks.full} full (blue), "
                     f"{blocks.partial} partial (orange)", fontsize=9)
        ax.set_xlabel("key position k")
        ax.set_ylabel("query position q")
    ax = axes[0][ncols - 1]
    ax.imshow(pic.fractions.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest",
              aspect="auto", extent=extent)
    ax.set_xlabel("key position k")
    ax.set_ylabel("query position q")
    ax.set_title(f"{pic.title}\ndensity {pic.density:.2%}", fontsize=10)
    fig.tight_layout()
    try:
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
