"""Pictures of a tuning result: the layer x head map of chosen families and densities, and the
Pareto front."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def head_map(report: dict, path: str | Path) -> Path:
    """A layers x query heads grid coloured by family, each cell labelled with its density."""
    plt = _plt()
    cells = report["cells"]
    L, H = report["model"]["layers"], report["model"]["heads"]
    fams = sorted({c["family"] for c in cells})
    idx = {f: i for i, f in enumerate(fams)}
    grid = np.zeros((L, H))
    dens = np.zeros((L, H))
    for c in cells:
        grid[c["layer"], c["head"]] = idx[c["family"]]
        dens[c["layer"], c["head"]] = c["density"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * H, 1.0 + 0.28 * L))
    cmap = plt.get_cmap("tab10", max(len(fams), 1))
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(fams) - 0.5, aspect="auto")
    for ly in range(L):
        for h in range(H):
            ax.text(h, ly, f"{dens[ly, h]:.0%}", ha="center", va="center", fontsize=6)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(fams))]
    ax.legend(handles, fams, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    ax.set_title(f"chosen patterns (density at n = {report['latency_n']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def pareto(report: dict, path: str | Path) -> Path:
    """Every trial (modelled latency vs calibration perplexity ratio), the front, the held-out
    validation of the front and the chosen point."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    tr = [t for t in report["trials"] if t["values"] is not None]
    if tr:
        ax.scatter([t["values"][0] for t in tr], [t["values"][1] for t in tr], s=12,
                   color="0.7", label="trials (calibration)")
    fr = report["front"]
    if fr:
        ax.plot([p["latency"] for p in fr], [p["calib_ppl_ratio"] for p in fr], "o-",
                color="C0", label="Pareto front (calibration)")
        val = [p for p in fr if p.get("heldout_ppl_ratio") is not None]
        ax.plot([p["latency"] for p in val], [p["heldout_ppl_ratio"] for p in val], "s--",
                color="C1", label=f"front validated (held-out, n = {report['validation_n']})")
    ch = report.get("chosen")
    if ch and ch.get("heldout_ppl_ratio") is not None:
        ax.scatter([ch["latency"]], [ch["heldout_ppl_ratio"]], s=90, marker="*", color="C3",
                   zorder=5, label="chosen")
    lim = report["budgets"].get("max_ppl_increase")
    if lim is not None:
        ax.axhline(1 + lim, color="C3", lw=0.8, ls=":", label="accuracy budget")
    ax.set_xlabel("attention time / dense (latency model)")
    ax.set_ylabel("perplexity / dense")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


__all__ = ["head_map", "pareto"]
