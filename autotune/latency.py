"""Latency model: measured kernel times from tuning records, else a block-count model fitted to
them by least squares (never density alone).

Tuning records are JSON files in a directory (searched recursively, `*.json`); each holds one
measurement object, or a list of them, with the keys

    pattern_key     structural key of the simplified pattern IR (PatternIR.key)
    args            the pattern's arguments as text (informational)
    n               key length (prefill: q_len == n)
    heads           query heads in the launch
    head_dim        head dimension
    dtype           "float16" | "bfloat16" | "float32"
    device          e.g. "NVIDIA H100 80GB HBM3"
    block_m, block_n    the schedule
    visited_blocks, full_blocks, partial_blocks   over all heads (from the block-mask IR)
    ms              measured forward time of the launch in milliseconds

Time per head for a candidate is `ms / heads` of a matching record (same pattern_key, n,
head_dim and dtype, and device when one is asked for); otherwise the block-count model
`c_q * query_blocks + c_full * full_blocks + c_partial * partial_blocks` (per head, ms), whose
coefficients are fitted by non-negative least squares on all records (with a per-launch
constant), or, without records, the documented defaults below.

Dynamic candidates (vertical-slash, block top-k) are timed end to end (index builder and
kernel, one CUDA graph) by `benchmarks/latency_records.py` into dynamic records (objects with
"kind": "dynamic": family, pattern, n, heads, head_dim, dtype, device, kept_pairs, ms); a
dynamic head costs, per the records of its family and n (else the nearest recorded n), the
least-squares line ms = a + b * kept pairs divided among the heads; without records, its
builder (one pass over the query blocks) plus its kept pairs as partial blocks of the block
model.

Gated candidates (a learned gate picks key blocks at run time) are timed end to end, gate and
index builder included, by `benchmarks/latency_records.py` into gate records (objects with
"kind": "gate": n, heads, head_dim, dtype, device, block, kept_blocks, causal_blocks, ms).
A gated head costs, per the records of its n (else of the nearest recorded n), the
least-squares line ms = a + b * kept blocks divided among the heads; without gate records, the
block model over the gate's blocks (all kept blocks full) plus one more pass over the query
blocks for the gate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .candidates import Candidate

# Defaults (ms per block of 128 x 128 at head_dim 64 in fp16), rough H100 figures: a full block
# is two 128x128x64 MMAs plus the online softmax, a partial block adds the predicate and its
# select, a query block pays its loads, the final rescale and the store. Scaled linearly with
# block_m * block_n * head_dim. Replace them by fitting tuning records.
DEFAULT_COEFFS = {"q_block": 1.2e-5, "full": 1.0e-5, "partial": 1.6e-5}
_REF_WORK = 128 * 128 * 64

KEYS = ("pattern_key", "n", "heads", "head_dim", "dtype", "block_m", "block_n",
        "visited_blocks", "full_blocks", "partial_blocks", "ms")


@dataclass(frozen=True)
class Blocks:
    q_blocks: int
    full: int
    partial: int

    @property
    def visited(self) -> int:
        return self.full + self.partial


@lru_cache(maxsize=4096)
def pattern_key(c: Candidate) -> str:
    return c.ir().key


@lru_cache(maxsize=4096)
def blocks(c: Candidate, n: int, block_m: int = 128, block_n: int = 128,
           head: int = 0) -> Blocks:
    """Visited full / partial key blocks of one head at length n (prefill), from the compiler's
    block-mask IR with the layout the compiler would choose."""
    from attnc.compiler.blockmask import Schedule
    from attnc.compiler.stages import compile_pattern

    from .candidates import _library

    prog = _library()
    from attnc.dsl.parser import parse_expr

    comp = compile_pattern(prog.pattern(c.family), {k: parse_expr(v) for k, v in c.args}, n=n,
                           heads=head + 1, schedule=Schedule(block_m, block_n))
    csr = comp.blockmask.materialize()
    full = int(csr.full_kv_num_blocks[head].sum())
    partial = int(csr.kv_num_blocks[head].sum())
    return Blocks(csr.num_q_blocks, full, partial)


@dataclass
class Record:
    pattern_key: str
    n: int
    heads: int
    head_dim: int
    dtype: str
    block_m: int
    block_n: int
    visited_blocks: int
    full_blocks: int
    partial_blocks: int
    ms: float
    device: str = ""
    args: object = None

    @classmethod
    def from_json(cls, d: dict) -> Record:
        missing = [k for k in KEYS if k not in d]
        if missing:
            raise ValueError(f"tuning record lacks {missing}")
        return cls(str(d["pattern_key"]), int(d["n"]), int(d["heads"]), int(d["head_dim"]),
                   str(d["dtype"]), int(d["block_m"]), int(d["block_n"]),
                   int(d["visited_blocks"]), int(d["full_blocks"]), int(d["partial_blocks"]),
                   float(d["ms"]), str(d.get("device", "")), d.get("args"))

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in (*KEYS, "device", "args")}


SHIPPED = Path(__file__).parent / "data" / "records"


def shipped_records() -> list[str]:
    """Names of the record sets that ship with attnc (autotune/data/records/NAME): `h200`
    holds every candidate of the default grid timed at SmolLM2-135M's shapes (9 heads, 3 KV
    heads, head dim 64, fp16) on an NVIDIA H200 at n = 2048 (part), 4096 and 8192, gated
    patterns end to end (CUDA graphs) at 4096 and 8192, and the dynamic candidates
    (vertical-slash, block top-k: index builder and kernel, CUDA graphs) at 2048-8192."""
    return sorted(p.name for p in SHIPPED.iterdir() if p.is_dir()) if SHIPPED.exists() else []


def records_path(directory: str | Path | None) -> Path | None:
    """A record directory, or the shipped set of that name (`--records h200`)."""
    if directory is None:
        return None
    d = Path(directory)
    if not d.exists() and str(directory) in shipped_records():
        return SHIPPED / str(directory)
    return d


def _items(directory: str | Path | None):
    d = records_path(directory)
    if d is None:
        return
    if not d.exists():
        return
    for p in sorted(d.rglob("*.json")):
        data = json.loads(p.read_text())
        yield from (data if isinstance(data, list) else [data])


def load_records(directory: str | Path | None) -> list[Record]:
    """The kernel tuning records under directory (gate and dynamic records aside)."""
    return [Record.from_json(x) for x in _items(directory)
            if x.get("kind") not in ("gate", "dynamic")]


def _load_kind(directory: str | Path | None, kind: str, keys: tuple[str, ...]) -> list[dict]:
    out = []
    for x in _items(directory):
        if x.get("kind") == kind:
            missing = [k for k in keys if k not in x]
            if missing:
                raise ValueError(f"{kind} record lacks {missing}")
            out.append(x)
    return out


def load_dynamic_records(directory: str | Path | None) -> list[dict]:
    """The dynamic-pattern records (end-to-end times of vertical-slash and block top-k: index
    builder and kernel) under directory."""
    return _load_kind(directory, "dynamic",
                      ("family", "n", "heads", "head_dim", "dtype", "kept_pairs", "ms"))


def load_gate_records(directory: str | Path | None) -> list[dict]:
    """The gate records (end-to-end times of gated patterns) under directory."""
    return _load_kind(directory, "gate",
                      ("n", "heads", "head_dim", "dtype", "block", "kept_blocks", "ms"))


@dataclass
class LatencyModel:
    """Per-head attention time (ms) of a candidate at length n."""

    head_dim: int = 64
    dtype: str = "float16"
    device: str | None = None
    block_m: int = 128
    block_n: int = 128
    records: list[Record] = field(default_factory=list)
    coeffs: dict[str, float] = field(default_factory=dict)
    fitted: bool = False
    gate_records: list[dict] = field(default_factory=list)
    dynamic_records: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self._lines: dict[tuple[int, int, bool], tuple[float, float, int] | None] = {}
        self._dlines: dict[tuple[str, int, bool], tuple[float, float, int] | None] = {}
        if not self.coeffs:
            s = self.block_m * self.block_n * self.head_dim / _REF_WORK
            self.coeffs = {k: v * s for k, v in DEFAULT_COEFFS.items()}
        self._index = {}
        for r in self.records:
            if self.device and r.device and r.device != self.device:
                continue
            if r.head_dim == self.head_dim and r.dtype == self.dtype:
                self._index[(r.pattern_key, r.n)] = r

    @classmethod
    def from_records(cls, directory: str | Path | None, **kw) -> LatencyModel:
        recs = load_records(directory)
        m = cls(records=recs, gate_records=load_gate_records(directory),
                dynamic_records=load_dynamic_records(directory), **kw)
        usable = [r for r in recs if r.head_dim == m.head_dim and r.dtype == m.dtype
                  and (not m.device or not r.device or r.device == m.device)]
        if len(usable) >= 4:
            m.coeffs = fit(usable)
            m.fitted = True
        return m

    def measured(self, c: Candidate, n: int) -> float | None:
        r = self._index.get((pattern_key(c), n))
        return None if r is None else r.ms / r.heads

    def modelled(self, c: Candidate, n: int, head: int = 0) -> float:
        b = blocks(c, n, self.block_m, self.block_n, head if c.head_dependent else 0)
        k = self.coeffs
        return k["q_block"] * b.q_blocks + k["full"] * b.full + k["partial"] * b.partial

    def ms(self, c: Candidate, n: int, head: int = 0) -> float:
        m = self.measured(c, n)
        return m if m is not None else self.modelled(c, n, head)

    def _gate_line(self, n: int, block: int, exact: bool = True
                   ) -> tuple[float, float, int] | None:
        """(a, b, heads) of ms = a + b * kept blocks over the gate records of (n, block); with
        exact=False those of the nearest recorded n (by ratio) when n has none. Fitted once
        per argument set (the problem asks for every unit and gated candidate)."""
        key = (n, block, exact)
        if key not in self._lines:
            self._lines[key] = self._fit_gate_line(n, block, exact)
        return self._lines[key]

    def _fit_gate_line(self, n: int, block: int, exact: bool):
        return self._fit_line([r for r in self.gate_records if r["block"] == block], n, exact,
                              "kept_blocks")

    def _fit_line(self, recs: list[dict], n: int, exact: bool, x_key: str):
        """(a, b, heads) of ms = a + b * x over the records of this head dim, dtype and device
        at n (with exact=False, at the nearest recorded n when n has none), or None."""
        rs = [r for r in recs if r["head_dim"] == self.head_dim and r["dtype"] == self.dtype
              and (not self.device or not r.get("device") or r["device"] == self.device)]
        if not exact and rs and not any(r["n"] == n for r in rs):
            n = min({r["n"] for r in rs}, key=lambda m: abs(np.log(m / n)))
        rs = [r for r in rs if r["n"] == n]
        if not rs:
            return None
        x = np.array([float(r[x_key]) for r in rs])
        y = np.array([float(r["ms"]) for r in rs])
        if len(rs) == 1 or np.ptp(x) == 0:
            return float(y.mean()), 0.0, int(rs[0]["heads"])
        b, a = np.polyfit(x, y, 1)
        return float(max(a, 0.0)), float(max(b, 0.0)), int(rs[0]["heads"])

    def gated_ms(self, n: int, density: float, block: int = 64) -> float:
        """Per-head time of a gated pattern keeping `density` of the causal pairs at n (a
        block gate of `block`), gate and index builder included."""
        nb = -(-n // block)
        kept = density * nb * (nb + 1) / 2
        line = self._gate_line(n, block, exact=False)
        if line is not None:
            a, b, heads = line
            return a / heads + b * kept
        k = self.coeffs
        s = block * block / (self.block_m * self.block_n)
        return 2 * k["q_block"] * s * nb + k["full"] * s * kept

    def _dynamic_line(self, family: str, n: int, exact: bool = True
                      ) -> tuple[float, float, int] | None:
        """(a, b, heads) of ms = a + b * kept pairs over the dynamic records of (family, n)
        (with exact=False those of the nearest recorded n when n has none)."""
        key = (family, n, exact)
        if key not in self._dlines:
            self._dlines[key] = self._fit_line(
                [r for r in self.dynamic_records if r["family"] == family], n, exact,
                "kept_pairs")
        return self._dlines[key]

    def dynamic_ms(self, n: int, density: float, family: str | None = None) -> float:
        """Per-head time of a dynamic pattern (vertical-slash, block top-k) keeping `density`
        of the causal pairs at n: from the family's records (measured end to end, index
        builder included) as a line in the kept pairs of n, or of the nearest recorded n
        (pairs scale with n squared, so the line is read at this n's pairs); without
        records, the builder as one more pass over the query blocks and the kept pairs as
        partial blocks of the schedule (gathered columns and diagonal edges need the
        predicate), from the block model."""
        kept_pairs = density * n * (n + 1) / 2
        line = self._dynamic_line(family, n, exact=False) if family else None
        if line is not None:
            a, b, heads = line
            return a / heads + b * kept_pairs
        k = self.coeffs
        nq = -(-n // self.block_m)
        kept = density * n * (n + 1) / 2 / (self.block_m * self.block_n)
        return 2 * k["q_block"] * nq + k["partial"] * kept

    def input_ms(self, c: Candidate, n: int, density: float) -> float:
        """Per-head time of an input-dependent candidate at the density it keeps."""
        if c.gated:
            return self.gated_ms(n, density, int(dict(c.args)["block"]))
        return self.dynamic_ms(n, density, c.family)

    def source(self, c: Candidate, n: int) -> str:
        if c.dynamic:
            if self._dynamic_line(c.family, n):
                return "dynamic-measured"
            return "dynamic-nearest-n" if self._dynamic_line(c.family, n, exact=False) \
                else "dynamic-modelled"
        if c.gated:
            block = int(dict(c.args)["block"])
            if self._gate_line(n, block):
                return "gate-measured"
            return "gate-nearest-n" if self._gate_line(n, block, exact=False) \
                else "gate-modelled"
        if self.measured(c, n) is not None:
            return "measured"
        return "fitted" if self.fitted else "default"


def fit(records: list[Record]) -> dict[str, float]:
    """Non-negative least squares of ms = c0 + c_q * q_blocks + c_full * full + c_partial *
    partial over the records (c0 is a per-launch constant, not charged to heads); rows are
    weighted by 1 / ms so that short and long kernels count alike (relative error)."""
    from scipy.optimize import nnls

    X, y = [], []
    for r in records:
        qb = r.heads * -(-r.n // r.block_m)
        X.append([1.0, qb, r.full_blocks, r.partial_blocks])
        y.append(r.ms)
    Xa, ya = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    w = 1.0 / np.maximum(ya, 1e-9)
    coef, _ = nnls(Xa * w[:, None], ya * w)
    return {"q_block": float(coef[1]), "full": float(coef[2]), "partial": float(coef[3]),
            "launch": float(coef[0])}


__all__ = ["DEFAULT_COEFFS", "SHIPPED", "Blocks", "LatencyModel", "Record", "blocks", "fit",
           "load_dynamic_records", "load_gate_records", "load_records", "pattern_key",
           "records_path", "shipped_records"]
