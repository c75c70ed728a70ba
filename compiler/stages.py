"""The compiler pipeline as a named list of stages, each of which can be dumped as text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from attnc.dsl.check import PatternInfo
from attnc.dsl.format import format_module
from attnc.dsl.nodes import Module

from . import layout as L
from .blockmask import BlockMaskIR, Schedule, build
from .ir import PatternIR, to_pretty
from .lower import lower_pattern
from .numeric import evaluate as num_eval
from .rules import rewrite, rules_table


@dataclass
class Compilation:
    """Everything the stages produced for one pattern, problem size and schedule."""

    pattern: PatternInfo
    args: dict
    n: int
    heads: int
    q_len: int
    schedule: Schedule
    layout_mode: str = "auto"
    texts: dict[str, str] = field(default_factory=dict)
    lowered: PatternIR | None = None
    simplified: PatternIR | None = None
    rule_stats: dict[str, int] = field(default_factory=dict)
    layout: L.Layout | None = None
    blockmask: BlockMaskIR | None = None


def _source(c: Compilation) -> str:
    node = c.pattern.node
    return format_module(Module((node,))).rstrip()


def stage_source(c: Compilation) -> str:
    args = ", ".join(f"{k} = {v}" for k, v in c.args.items()) or "(defaults)"
    return f"# pattern {c.pattern.name} from {c.pattern.module.file}, arguments {args}\n" + \
        _source(c)


def stage_lower(c: Compilation) -> str:
    c.lowered = lower_pattern(c.pattern, c.args)
    return c.lowered.pretty()


def stage_simplify(c: Compilation) -> str:
    assert c.lowered is not None
    stats: dict[str, int] = {}
    mask = rewrite(c.lowered.mask, stats=stats)
    bias = rewrite(c.lowered.bias, stats=stats) if c.lowered.bias is not None else None
    c.simplified = PatternIR(c.lowered.name, mask, bias)
    c.rule_stats = stats
    fired = ", ".join(f"{k} x{v}" for k, v in sorted(stats.items())) or "none"
    return (f"{c.simplified.pretty()}\n# key {c.simplified.key}\n# rules fired: {fired}\n"
            f"# rule table:\n" + "\n".join("#   " + x for x in rules_table().splitlines()))


def stage_layout(c: Compilation) -> str:
    assert c.simplified is not None
    s = c.schedule
    if c.simplified.dynamic or c.layout_mode == "none":
        c.layout = None
        why = "dynamic pattern" if c.simplified.dynamic else "--layout none"
        return f"(layout identity)  # {why}"
    cands = L.candidates(c.simplified.mask, c.n, s.block_m, s.block_n)
    lines = []
    best, best_cost = None, None
    base_cost = _cost(c, None)
    lines.append(f"(layout identity)  # executed blocks {base_cost}")
    for lay in cands:
        if lay.moves_queries() and c.q_len != c.n:
            lines.append(f"{lay.text()}  # skipped: needs q_len == n")
            continue
        cost = _cost(c, lay)
        lines.append(f"{lay.text()}  # executed blocks {cost}")
        if cost < base_cost and (best_cost is None or cost < best_cost):
            best, best_cost = lay, cost
    if c.layout_mode == "auto":
        c.layout = best
    lines.append(f"# chosen: {c.layout.text() if c.layout else '(layout identity)'}")
    return "\n".join(lines)


def _cost(c: Compilation, lay: L.Layout | None) -> int:
    """Blocks a kernel would execute, measured on a probe size so choosing stays cheap."""
    probe_n = min(c.n, 16384)
    probe_q = probe_n if c.q_len == c.n else min(c.q_len, probe_n)
    if lay is not None:
        lay = L.for_length(lay, probe_n, c.schedule.block_m, c.schedule.block_n)
    bm = build(c.simplified, n=probe_n, heads=min(c.heads, 4), q_len=probe_q,
               schedule=c.schedule, layout=lay)
    csr = bm.materialize()
    return int(csr.kv_num_blocks.sum() + csr.full_kv_num_blocks.sum())


def stage_blockmask(c: Compilation) -> str:
    assert c.simplified is not None
    c.blockmask = build(c.simplified, n=c.n, heads=c.heads, q_len=c.q_len,
                        schedule=c.schedule, layout=c.layout)
    return c.blockmask.text()


def stage_classes(c: Compilation) -> str:
    """The specialised mask of each head class (h substituted)."""
    assert c.blockmask is not None
    out = []
    for hc in c.blockmask.classes:
        out.append(f"heads {hc.heads}:\n{to_pretty(hc.mask, indent='  ')}")
    return "\n".join(out)


STAGES: list[tuple[str, Callable[[Compilation], str]]] = [
    ("source", stage_source),
    ("lower", stage_lower),
    ("simplify", stage_simplify),
    ("layout", stage_layout),
    ("blockmask", stage_blockmask),
    ("heads", stage_classes),
]


def compile_pattern(pattern: PatternInfo, args: dict | None = None, *, n: int, heads: int = 1,
                    q_len: int | None = None, schedule: Schedule | None = None,
                    layout: str = "auto") -> Compilation:
    if layout not in ("auto", "none"):
        raise ValueError("layout must be 'auto' or 'none'")
    c = Compilation(pattern, dict(args or {}), n, heads, n if q_len is None else q_len,
                    schedule or Schedule(), layout)
    for name, fn in STAGES:
        c.texts[name] = fn(c)
    return c


def accounting(c: Compilation, head_dim: int = 128, verify: bool = False) -> str:
    """Kept pairs, blocks, FLOPs, density and decode-time KV entries, per the block-mask IR."""
    bm = c.blockmask
    assert bm is not None
    st = bm.stats(head_dim)
    s = c.schedule
    if c.simplified.dynamic:
        from .ir import Sel, to_text, walk

        sels = sorted({to_text(x) for x in walk(c.simplified.mask) if isinstance(x, Sel)})
        head = ["kept pairs        chosen at run time by " + "; ".join(sels)]
    else:
        head = [f"kept pairs        {st.kept_pairs}", f"density           {st.density:.4%}"]
    bound = " at most: the static part's blocks" if c.simplified.dynamic else ""
    lines = head + [
        f"visited blocks    {st.visited_blocks} ({st.full_blocks} full, {st.partial_blocks} "
        f"partial){bound}",
    ]
    if not c.simplified.dynamic:
        lines.append(f"useful FLOPs      {st.useful_flops():.4g} (4 * head_dim * kept pairs, "
                     f"head_dim {head_dim})")
    lines.append(f"executed FLOPs    {st.executed_flops(s.block_m, s.block_n):.4g}"
                 + (" (at most)" if c.simplified.dynamic else ""))
    if verify and not c.simplified.dynamic:
        bad, checked = bm.inexact_blocks()
        lines.append(f"exactness         {bad} of {checked} partial blocks are really full or "
                     "empty (checked pair by pair)")
    if not c.simplified.dynamic:
        kv = kv_entries(c)
        lines.append("decode KV entries " + ", ".join(f"h{h}: {v}" for h, v in kv.items()))
    return "\n".join(lines)


def kv_entries(c: Compilation) -> dict[int, int]:
    """Keys the next decoded token (query n - 1) attends to, per head: the KV cache a head
    needs while decoding (a window plus sinks needs window + sinks, causal needs n)."""
    assert c.simplified is not None
    out = {}
    k = np.arange(c.n, dtype=np.int64)
    for h in range(c.heads):
        m = num_eval(c.simplified.mask, {"q": np.int64(c.n - 1), "k": k, "h": np.int64(h),
                                         "n": np.int64(c.n)})
        out[h] = int(np.broadcast_to(m, k.shape).sum())
    return out


def dump(c: Compilation, directory: str | Path) -> list[Path]:
    """Write one file per stage (01-source.attn, 02-lower.ir, ...), atomically."""
    from attnc import atomic

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, _) in enumerate(STAGES, 1):
        ext = "attn" if name == "source" else "txt"
        p = d / f"{i:02d}-{name}.{ext}"
        atomic.write_text(p, c.texts[name] + "\n")
        paths.append(p)
    return paths
