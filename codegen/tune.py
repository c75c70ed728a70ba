"""Launch autotuning: time candidate schedules and launch options, keep the fastest as a record.

The pattern (what to compute) stays apart from the schedule (block sizes, warps, stages): a
candidate is a Schedule plus a Config; the block-mask IR is rebuilt for each Schedule (symbolic,
milliseconds). A candidate that fails to compile or to run scores as infinitely slow. The winner
is stored as a JSON tuning record keyed by a structural hash of the workload (pattern key,
layout, shapes, dtype, device, versions), written atomically; autotune/latency reads the same
records.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton
from attnc.compiler.blockmask import BlockMaskIR, Schedule

from attnc.atomic import atomic_path
from attnc.settings import settings

from . import kernel

# (block_m, block_n, num_warps, num_stages): the shapes FlexAttention's and Triton's tuned
# forward kernels use on Ampere and Hopper for head dims 64 and 128.
CANDIDATES: list[tuple] = [
    (128, 128, 8, 3),
    (128, 128, 8, 2),
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (64, 64, 4, 3),
    (64, 128, 4, 2),
]
# On Hopper and newer, the winners of the H200 runs come first: the warp-specialised kernel
# (sm_90 only; elsewhere, and for index lists, layouts and plans, it is refused and scores as
# infinitely slow), then the skeleton with K and V through TMA (a layout-transformed pattern
# fails those too and falls back to the pointer-load candidates).
HOPPER_CANDIDATES: list[tuple] = [
    # The warp-specialised Gluon kernel (codegen.hopper): 2 or 3 stages, with ping-pong.
    (128, 128, 4, 2, 0, False, 1),
    (128, 128, 4, 2, 0, False, 2),
    (128, 128, 4, 3, 0, False, 1),
    (128, 128, 8, 3, 1),
    (128, 128, 8, 3, 1, True),  # one loop: up to 3% faster on streaming and a_shape at 128k
    (64, 64, 4, 3, 1),
    (128, 128, 8, 3),
    (64, 64, 4, 3),
    (128, 64, 8, 3),
]


# Head dim 64 halves a tile's shared memory and registers: narrower tiles with TMA won there
# (H200: shards 64x128/4/3, causal at 128k 128x64/8/3, streaming 64x64/4/3).
HOPPER_CANDIDATES_D64: list[tuple] = [
    (128, 128, 4, 3, 0, False, 1),
    (128, 128, 4, 3, 0, False, 2),
    (128, 64, 4, 3, 0, False, 1),
    (128, 128, 8, 3, 1),
    (64, 128, 4, 3, 1),
    (128, 64, 8, 3, 1),
    (128, 64, 4, 3, 1),
    (64, 64, 4, 3, 1),
    (128, 128, 8, 3),
    (64, 64, 4, 3),
]


def default_candidates(q: torch.Tensor) -> list[tuple]:
    """The launch candidates for q's device and head dim."""
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] >= 9:
        return HOPPER_CANDIDATES_D64 if q.shape[-1] <= 64 else HOPPER_CANDIDATES
    return CANDIDATES


@dataclass
class Trial:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    ms: float  # math.inf when the candidate failed
    error: str = ""
    tma: int = 0
    one_loop: bool = False
    ws: int = 0

    def config(self) -> kernel.Config:
        return kernel.Config(self.num_warps, self.num_stages, self.tma, self.one_loop, self.ws)

    def label(self) -> str:
        return f"{self.block_m}x{self.block_n}/{self.config().label()}"


def _trial(cand: tuple, ms: float = math.inf, error: str = "") -> Trial:
    """The Trial of a candidate tuple (block_m, block_n, warps, stages[, tma[, one_loop[,
    ws]]])."""
    tma, one_loop, ws = (tuple(cand[4:]) + (0, False, 0)[len(cand) - 4:])[:3]
    return Trial(*cand[:4], ms, error, int(tma), bool(one_loop), int(ws))


def parse_candidate(text: str) -> tuple:
    """'128x128x8x3' with optional flags, the benchmarks' spelling: '+tma' (K and V through
    TMA) or '+tma2' (Q and O too), '+one' (full and partial blocks in one loop), '+ws' (the
    warp-specialised Hopper kernel) or '+wspp' (the same with ping-pong) -> a candidate
    tuple (block_m, block_n, warps, stages[, tma level, one loop, ws])."""
    head, *flags = text.strip().split("+")
    try:
        nums = tuple(int(x) for x in head.split("x"))
    except ValueError:
        nums = ()
    levels = {"tma": 1, "tma2": 2}
    wss = {"ws": 1, "wspp": 2}
    tma = [levels[f] for f in flags if f in levels]
    ws = [wss[f] for f in flags if f in wss]
    if len(nums) != 4 or len(tma) > 1 or len(ws) > 1 or \
            any(f not in levels and f not in wss and f != "one" for f in flags):
        raise ValueError(f"launch candidate {text!r}: want BMxBNxWARPSxSTAGES[+tma|+tma2]"
                         "[+one][+ws|+wspp]")
    if not flags:
        return nums
    return nums + ((tma[0] if tma else 0), "one" in flags) + ((ws[0],) if ws else ())


@dataclass
class Record:
    key: str
    pattern: str
    pattern_key: str
    layout: str
    n: int
    q_len: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    device: str
    triton: str
    torch: str
    best: Trial
    visited_blocks: int
    full_blocks: int
    partial_blocks: int
    kept_pairs: int
    trials: list[Trial] = field(default_factory=list)
    created: str = ""

    @property
    def ms(self) -> float:
        return self.best.ms


def _device_name(t: torch.Tensor) -> str:
    if t.device.type == "cuda":
        return torch.cuda.get_device_name(t.device)
    return "cpu (triton interpreter)"


def workload_key(bm: BlockMaskIR, q: torch.Tensor, k: torch.Tensor) -> str:
    """Structural hash of what the timing depends on, from canonical text (never hash())."""
    lay = bm.layout.text() if bm.layout is not None else "(layout identity)"
    text = "\n".join([
        "attnc-tuning-v1", bm.pattern.key, lay, f"n {bm.n_var} q_len {q.shape[2]}",
        f"B {q.shape[0]} H {q.shape[1]} Hkv {k.shape[1]} D {q.shape[3]}", str(q.dtype),
        _device_name(q), f"triton {triton.__version__}", f"torch {torch.__version__}",
    ])
    return hashlib.sha256(text.encode()).hexdigest()


def record_dir() -> Path:
    return settings().cache_dir / "tuning"


def load_record(key: str, directory: Path | None = None) -> Record | None:
    path = (directory or record_dir()) / f"{key}.json"
    try:
        d = json.loads(path.read_text())
        for flat in ("block_m", "block_n", "ms"):
            d.pop(flat, None)
        d["best"] = Trial(**d["best"])
        d["trials"] = [Trial(**t) for t in d["trials"]]
        for t in [d["best"], *d["trials"]]:
            t.ms = math.inf if t.ms is None else t.ms
        rec = Record(**d)
    except (OSError, ValueError, TypeError, KeyError):
        return None  # absent or unreadable: tune again
    return rec if rec.key == key else None


def save_record(rec: Record, directory: Path | None = None) -> Path:
    folder = directory or record_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{rec.key}.json"
    d = asdict(rec)
    for t in [d["best"], *d["trials"]]:
        t["ms"] = None if math.isinf(t["ms"]) else t["ms"]
    # The flat fields autotune.latency reads (one measurement per record).
    d.update(block_m=rec.best.block_m, block_n=rec.best.block_n, ms=d["best"]["ms"])
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
    return path


def _time(fn: Callable[[], object], rep_ms: float) -> float:
    if torch.cuda.is_available() and torch.cuda.current_device() is not None:
        try:
            return float(triton.testing.do_bench(fn, warmup=max(rep_ms / 4, 5), rep=rep_ms,
                                                 return_mode="median"))
        except TypeError:  # older do_bench without return_mode
            return float(triton.testing.do_bench(fn, warmup=max(rep_ms / 4, 5), rep=rep_ms))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def autotune(make_bm: Callable[[Schedule], BlockMaskIR], q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, *, candidates: list[tuple] | None = None,
             rep_ms: float = 50.0, directory: Path | None = None, use_record: bool = True,
             pattern_key: str | None = None,
             ) -> tuple[BlockMaskIR, kernel.Config, Record]:
    """The fastest (block mask, launch config) among the candidates for this workload.

    make_bm(schedule) builds the block-mask IR for a schedule (the caller chooses pattern,
    arguments and layout). A stored record for the same workload is reused unless
    use_record=False. pattern_key: the key the record is filed under for autotune.latency
    (the pattern's own IR key; by default the block mask's, which differs under a layout)."""
    base = make_bm(Schedule())
    key = workload_key(base, q, k)
    wanted = candidates or default_candidates(q)
    if use_record:
        rec = load_record(key, directory)
        # A record answers for the candidates it timed: asked about others, tune again.
        tried = {t.label() for t in rec.trials} if rec is not None else set()
        if rec is not None and math.isfinite(rec.best.ms) and \
                {_trial(c).label() for c in wanted} <= tried:
            b = rec.best
            bm = make_bm(Schedule(b.block_m, b.block_n))
            return bm, b.config(), rec
    trials: list[Trial] = []
    built: dict[tuple[int, int], BlockMaskIR] = {}
    for cand in wanted:
        trial = _trial(cand)
        bm_, bn, cfg = trial.block_m, trial.block_n, trial.config()
        try:
            bm = built.get((bm_, bn)) or make_bm(Schedule(bm_, bn))
            built[(bm_, bn)] = bm
            kernel.attention(q, k, v, bm, config=cfg)  # compile and check it runs
            if q.device.type == "cuda":
                torch.cuda.synchronize()
            ms = _time(lambda bm=bm, cfg=cfg: kernel.attention(q, k, v, bm, config=cfg), rep_ms)
            trials.append(_trial(cand, ms))
        except Exception as e:  # noqa: BLE001 - a failed candidate is infinitely slow
            trials.append(_trial(cand, error=f"{type(e).__name__}: {e}".splitlines()[0][:300]))
    best = min(trials, key=lambda t: t.ms)
    bm = built.get((best.block_m, best.block_n)) or make_bm(Schedule(best.block_m,
                                                                      best.block_n))
    st = bm.stats(q.shape[3]) if math.isfinite(best.ms) else None
    rec = Record(
        key=key, pattern=bm.pattern.name, pattern_key=pattern_key or bm.pattern.key,
        layout=bm.layout.text() if bm.layout is not None else "(layout identity)",
        n=bm.n_var, q_len=q.shape[2], batch=q.shape[0], heads=q.shape[1], kv_heads=k.shape[1],
        head_dim=q.shape[3], dtype=str(q.dtype).replace("torch.", ""), device=_device_name(q),
        triton=triton.__version__, torch=torch.__version__, best=best,
        visited_blocks=st.visited_blocks if st else 0,
        full_blocks=(st.visited_blocks - st.partial_blocks) if st else 0,
        partial_blocks=st.partial_blocks if st else 0, kept_pairs=st.kept_pairs if st else 0,
        trials=trials, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if math.isfinite(best.ms):
        save_record(rec, directory)
    return bm, best.config(), rec


__all__ = ["CANDIDATES", "HOPPER_CANDIDATES", "HOPPER_CANDIDATES_D64", "Record", "Trial",
           "autotune", "default_candidates", "load_record", "parse_candidate", "save_record",
           "workload_key"]
