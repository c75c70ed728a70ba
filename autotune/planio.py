"""Write a per-head assignment as a canonical `.attn` plan, and read a plan's cells back."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping

from attnc.dsl.check import PlanInfo, loads
from attnc.dsl.format import format_expr, format_module
from attnc.dsl.parser import parse

from .candidates import Candidate


def _runs(xs) -> str:
    from attnc.compiler.blockmask import ranges_text

    return ranges_text(sorted(xs))


def plan_text(name: str, *, layers: int, heads: int, kv_heads: int,
              choice: Mapping[tuple[int, int], Candidate], granularity: str = "kv",
              comments: list[str] | None = None) -> str:
    """The plan for `choice`, keyed by (layer, kv head) when granularity is "kv" or by
    (layer, query head) when "q"; the most frequent candidate becomes the default. The text is
    checked and canonically formatted (it round-trips through `attnc check` and `attnc fmt`)."""
    if granularity not in ("kv", "q"):
        raise ValueError("granularity is 'kv' or 'q'")
    units = kv_heads if granularity == "kv" else heads
    missing = [(ly, u) for ly in range(layers) for u in range(units) if (ly, u) not in choice]
    if missing:
        raise ValueError(f"no candidate for units {missing[:4]}")
    default = Counter(choice.values()).most_common(1)[0][0]
    by: dict[tuple[Candidate, frozenset[int]], list[int]] = defaultdict(list)
    per: dict[tuple[Candidate, int], set[int]] = defaultdict(set)
    for (ly, u), c in choice.items():
        if c != default:
            per[(c, u)].add(ly)
    for (c, u), lys in per.items():
        by[(c, frozenset(lys))].append(u)
    sel = "kv_heads" if granularity == "kv" else "heads"
    lines = [f"# {x}" for x in (comments or [])]
    kv = f", kv_heads = {kv_heads}" if kv_heads != heads else ""
    lines.append(f"plan {name}(layers = {layers}, heads = {heads}{kv}) {{")
    entries = sorted(by.items(), key=lambda it: (min(it[0][1]), min(it[1]), str(it[0][0])))
    for (c, lys), us in entries:
        what = f" {sel} {_runs(us)}" if len(us) < units else ""
        lines.append(f"    layers {_runs(lys)}{what}: {c.call_text()}")
    lines.append(f"    default: {default.call_text()}")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    out = format_module(parse(text, f"<plan {name}>"))
    loads(out, f"<plan {name}>")  # raises AttncError if the plan is not valid
    return out


def cells(plan: PlanInfo) -> dict[tuple[int, int], str]:
    """Every (layer, query head) cell of a checked plan as canonical call text."""
    out: dict[tuple[int, int], str] = {}
    for a in plan.assignments:
        text = format_expr(a.call) if a.call.args or a.call.kwargs else a.call.func
        for cell in a.cells:
            out[cell] = text
    return out


def expand(choice: Mapping[tuple[int, int], Candidate], *, heads: int, kv_heads: int,
           granularity: str) -> dict[tuple[int, int], Candidate]:
    """A unit-level choice as (layer, query head) cells."""
    if granularity == "q":
        return dict(choice)
    group = heads // kv_heads
    return {(ly, g * group + j): c for (ly, g), c in choice.items() for j in range(group)}


__all__ = ["cells", "expand", "plan_text"]
