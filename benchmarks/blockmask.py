"""Block-mask construction: attnc's symbolic block-mask IR and CSR against FlexAttention's
``create_block_mask`` (eager and compiled), for every static pattern of the library.

    python benchmarks/blockmask.py --quick
    python benchmarks/blockmask.py --device cuda --out results.md
    python benchmarks/blockmask.py --patterns shards,radial --n 8192 --device cpu

On a 2-core CPU, `--quick --max-dense-gib 0.5` takes about 5 minutes; with the default 8 GiB the
eager create_block_mask at n = 32768 alone takes 30-75 s a pattern (or fails with OOM).

attnc: build time of the block-mask IR (median of several runs), materialisation of the CSR
(median of 3, one run for big cases), the peak of numpy allocations during materialisation
(tracemalloc, in a separate run), visited (partial + full) blocks.

FlexAttention: ``create_block_mask`` with hand-written mask_mods that mirror patterns/*.attn, in a
worker process (so that a timeout, an OOM or a crash costs one table cell, not the run): eager
(``_compile=False``, which forms the n x n mask) and ``_compile=True`` (first call, compilation
included, after ``torch._dynamo.reset()``; then the median of later calls). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over the call; on CPU the peak resident set of the worker over
the call (VmHWM, reset through /proc/self/clear_refs; ru_maxrss delta where that is unavailable).

Check (n <= --check-max-n): the CSR must equal FlexAttention's BlockMask: kv_num_blocks,
full_kv_num_blocks and the valid prefix of every row of kv_indices and full_kv_indices.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import tracemalloc
import warnings

import numpy as np

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_N = (8192, 32768, 131072, 1048576)
QUICK_N = (8192, 32768)

# (case id, library pattern, arguments). Every argument is spelled out, so that attnc and the
# FlexAttention mask_mod see the same values whatever the library's defaults become.
CASES: list[tuple[str, str, dict]] = [
    ("streaming", "streaming", {"sink": 64, "window": 4096}),
    ("a_shape", "a_shape", {"sink": 64, "local": 2048}),
    ("dilated", "dilated", {"window": 4096, "dilation": 4}),
    ("shards", "shards", {"stride": 8, "step": 1, "block": 64, "local": 1024}),
    ("shards_b128", "shards", {"stride": 8, "step": 1, "block": 128, "local": 1024}),
    ("radial", "radial", {"block": 64, "dense": 8, "causal": True}),
    ("power", "power", {"block": 64, "local": 2, "sink": 1}),
    ("window", "window", {"size": 4096}),
    ("sink", "sink", {"size": 64}),
    ("band", "band", {"before": 2048, "after": 2048}),
    ("fixed_documents", "fixed_documents", {"length": 8192}),
    ("prefix_lm", "prefix_lm", {"prefix": 4096}),
    ("causal", "causal", {}),
    ("dense", "dense", {}),
    ("alibi", "alibi", {"heads": 8}),  # the mask is causal; the bias does not enter the mask
]


def case_label(pattern: str, args: dict) -> str:
    if not args:
        return pattern
    return f"{pattern}({', '.join(f'{k}={v}' for k, v in args.items())})"


# --------------------------------------------------------------------------- FlexAttention side


def _exp2_log2(x):
    """2 ** log2(x) with attnc's log2 (floor(log2(x)) for x >= 1, 0 for x <= 1): the largest
    power of two <= max(x, 1). Integer bit smearing: exact, and it fuses in the compiled path
    (a float log2 with torch.pow made inductor materialise an n x n int64 tensor)."""
    import torch

    y = torch.clamp(x, min=1)
    for s in (1, 2, 4, 8, 16, 32):
        y = y | (y >> s)
    return (y >> 1) + 1


def make_mask_mod(pattern: str, p: dict):
    """A FlexAttention mask_mod equal to the library pattern `pattern` with arguments `p`
    (q_idx, kv_idx are 0-based absolute positions; q_len = n). None when there is none."""

    # `causal` in the library is `k <= q`; // is floor division and % takes the divisor's sign in
    # both attnc and torch; every divisor below is a positive constant.
    def causal(q, k):
        return k <= q

    import torch

    if pattern == "dense":
        def mod(b, h, q, k):
            return q.new_ones((), dtype=torch.bool)
    elif pattern in ("causal", "alibi"):
        def mod(b, h, q, k):
            return causal(q, k)
    elif pattern == "sink":
        size = p["size"]

        def mod(b, h, q, k):
            return (k < size) & (k <= q)
    elif pattern == "window":
        size = p["size"]

        def mod(b, h, q, k):
            d = q - k
            return (0 <= d) & (d < size)
    elif pattern == "band":
        before, after = p["before"], p["after"]

        def mod(b, h, q, k):
            d = q - k
            return (-after <= d) & (d <= before)
    elif pattern == "streaming":
        sink, window = p["sink"], p["window"]

        def mod(b, h, q, k):
            d = q - k
            return ((k < sink) & (k <= q)) | ((0 <= d) & (d < window))
    elif pattern == "a_shape":
        sink, local = p["sink"], p["local"]

        def mod(b, h, q, k):
            return causal(q, k) & ((k < sink) | (q - k < local))
    elif pattern == "dilated":
        window, dilation = p["window"], p["dilation"]

        def mod(b, h, q, k):
            d = q - k
            return (0 <= d) & (d < window * dilation) & (d % dilation == 0)
    elif pattern == "shards":
        stride, step, block, local = p["stride"], p["step"], p["block"], p["local"]

        def mod(b, h, q, k):
            return causal(q, k) & (((k // block + h * step) % stride == 0) | (q - k < local))
    elif pattern == "radial":
        block, dense, is_causal = p["block"], p["dense"], p["causal"]

        def mod(b, h, q, k):
            d = (q // block - k // block).abs()
            m = (d < dense) | (d % (2 * _exp2_log2(d // dense)) == 0)  # 2 ** (log2 + 1)
            return causal(q, k) & m if is_causal else m
    elif pattern == "power":
        block, local, sink = p["block"], p["local"], p["sink"]

        def mod(b, h, q, k):
            d = q // block - k // block
            return causal(q, k) & ((d < local) | (d == _exp2_log2(d)) | (k // block < sink))
    elif pattern == "fixed_documents":
        length = p["length"]

        def mod(b, h, q, k):
            return causal(q, k) & (q // length == k // length)
    elif pattern == "prefix_lm":
        prefix = p["prefix"]

        def mod(b, h, q, k):
            return (k <= q) | (k < prefix)
    else:
        return None
    mod.__name__ = f"{pattern}_mask"
    return mod


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _PeakMeter:
    """Peak memory of one call: CUDA allocator peak, or the CPU resident-set peak."""

    def __init__(self, device: str):
        self.device = device

    def start(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.how = "cuda"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _status_kib("VmRSS") * 1024
            self.how = "hwm"
        except (OSError, TypeError):
            import resource

            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.how = "maxrss"

    def stop(self) -> float:
        """MiB above the level at start()."""
        import torch

        if self.how == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / MiB
        if self.how == "hwm":
            return max(0, _status_kib("VmHWM") * 1024 - self.base) / MiB
        import resource

        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base) / MiB


def _oom_text(e: BaseException) -> str | None:
    s = str(e)
    m = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]i?B)", s)
    if m:
        return f"OOM (asked {m.group(1)})"
    m = re.search(r"allocate (\d+) bytes", s)
    if m:
        return f"OOM (asked {int(m.group(1)) / GiB:.1f} GiB)"
    if isinstance(e, MemoryError) or "out of memory" in s.lower():
        return "OOM"
    return None


def _error_text(e: BaseException) -> str:
    oom = _oom_text(e)
    if oom:
        return oom
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    return f"error: {type(e).__name__}: {first[:120]}"


def _sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _bm_arrays(bm):
    """(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices) of batch 0, numpy."""
    def np_(t):
        return None if t is None else t[0].detach().cpu().numpy()

    return (np_(bm.kv_num_blocks), np_(bm.kv_indices), np_(bm.full_kv_num_blocks),
            np_(bm.full_kv_indices))


def _worker_main(conn, device: str, mem_limit_gib: float, warmup: bool):
    """Serve FlexAttention measurements: one request at a time, replies as dicts."""
    warnings.filterwarnings("ignore")
    try:  # die with the parent (Linux), whatever kills it
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if device == "cpu" and mem_limit_gib > 0:
        # An allocation over the limit fails cleanly (an OOM cell) instead of waking the
        # kernel's OOM killer.
        import resource

        vm = (_status_kib("VmSize") or 0) * 1024
        lim = int(vm + mem_limit_gib * GiB)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        except (ValueError, OSError):
            pass
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    if warmup:  # one-time costs (CUDA context, vmap, inductor's own start-up) out of the cases
        try:
            mod = make_mask_mod("causal", {})
            create_block_mask(mod, 1, 1, 512, 512, device=device)
            create_block_mask(mod, 1, 1, 512, 512, device=device, _compile=True)
            _sync(device)
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001 - the cases will report it
            pass
    conn.send({"ready": True})
    while True:
        try:
            req = conn.recv()
        except EOFError:
            return
        if req is None:
            return
        try:
            conn.send(_serve(req, device, create_block_mask))
        except BaseException as e:  # noqa: BLE001 - keep serving
            conn.send({"error": _error_text(e), "trace": traceback.format_exc()})
        finally:
            import gc

            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


def _serve(req: dict, device: str, create_block_mask) -> dict:
    import torch

    mod = make_mask_mod(req["pattern"], req["args"])
    n, H, bs = req["n"], req["heads"], (req["block_m"], req["block_n"])
    repeat, budget = req["repeat"], req["budget_s"]
    meter = _PeakMeter(device)
    out: dict = {}

    def call(compile_: bool):
        bm = create_block_mask(mod, 1, H, n, n, device=device, BLOCK_SIZE=bs, _compile=compile_)
        _sync(device)
        return bm

    if req["mode"] == "eager":
        times = []
        meter.start()
        t = time.perf_counter()
        bm = call(False)
        times.append(time.perf_counter() - t)
        out["peak_mib"] = meter.stop()
        out["arrays"] = _bm_arrays(bm) if req["want_arrays"] else None
        del bm
        while len(times) < repeat and sum(times) < budget:
            t = time.perf_counter()
            call(False)
            times.append(time.perf_counter() - t)
        out["ms"] = statistics.median(times) * 1e3
        out["runs"] = len(times)
        return out

    torch._dynamo.reset()
    t = time.perf_counter()
    bm = call(True)
    out["first_s"] = time.perf_counter() - t
    out["arrays"] = _bm_arrays(bm) if req["want_arrays"] else None
    del bm
    # Tell the parent the first call is done, so a timeout in the later calls keeps it.
    req["conn_partial"]({"first_s": out["first_s"], "partial": True})
    times = []
    meter.start()
    t = time.perf_counter()
    call(True)
    times.append(time.perf_counter() - t)
    out["peak_mib"] = meter.stop()
    while len(times) < repeat and sum(times) < budget:
        t = time.perf_counter()
        call(True)
        times.append(time.perf_counter() - t)
    out["ms"] = statistics.median(times) * 1e3
    out["runs"] = len(times)
    return out


class FlexWorker:
    """A worker process for FlexAttention calls, restarted after a timeout or a crash."""

    def __init__(self, device: str, mem_limit_gib: float, warmup: bool, start_timeout: float):
        self.device, self.mem_limit_gib, self.warmup = device, mem_limit_gib, warmup
        self.start_timeout = start_timeout
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.conn = None

    def _start(self):
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker_entry, daemon=True,
                                     args=(child, self.device, self.mem_limit_gib, self.warmup))
        self.proc.start()
        child.close()
        self.conn = parent
        if not parent.poll(self.start_timeout):
            self.kill()
            raise RuntimeError("FlexAttention worker did not start")
        parent.recv()

    def kill(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(10)
        self.proc = None
        self.conn = None

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(10)
            except (OSError, BrokenPipeError):
                pass
        self.kill()

    def request(self, req: dict, timeout: float) -> dict:
        if self.proc is None or not self.proc.is_alive():
            try:
                self._start()
            except Exception as e:  # noqa: BLE001
                return {"error": _error_text(e)}
        self.conn.send(req)
        deadline = time.monotonic() + timeout
        partial: dict = {}
        while True:
            left = deadline - time.monotonic()
            try:
                ready = left > 0 and self.conn.poll(left)
            except (EOFError, OSError):
                ready = True
            if not ready:
                self.kill()
                return {**partial, "error": f"timeout (> {timeout:.0f} s)"}
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                code = self.proc.exitcode if self.proc is not None else None
                self.kill()
                why = "killed (OOM killer?)" if code == -9 else f"worker died (exit {code})"
                return {**partial, "error": why}
            if msg.get("partial"):
                partial = {k: v for k, v in msg.items() if k != "partial"}
                continue
            return msg


def _worker_entry(conn, device, mem_limit_gib, warmup):
    # requests carry a callback for partial results; pipes do not pickle functions, so the
    # worker adds it here
    class _Conn:
        def __init__(self, c):
            self.c = c

        def send(self, x):
            self.c.send(x)

        def recv(self):
            req = self.c.recv()
            if isinstance(req, dict):
                req["conn_partial"] = self.c.send
            return req

    _worker_main(_Conn(conn), device, mem_limit_gib, warmup)


# --------------------------------------------------------------------------- attnc side


def _to_flex():
    """attnc.codegen.flex.to_flex_block_mask, where this checkout has it."""
    try:
        from attnc.codegen.flex import to_flex_block_mask
    except Exception:  # noqa: BLE001 - optional
        return None
    return to_flex_block_mask


def attnc_measure(ir, n: int, heads: int, schedule, build_repeat: int, mat_repeat: int,
                  big_s: float, measure_mem: bool, device: str):
    from attnc.compiler.blockmask import build

    out: dict = {}
    times = []
    bm = None
    for _ in range(build_repeat):
        t = time.perf_counter()
        bm = build(ir, n=n, heads=heads, schedule=schedule)
        times.append(time.perf_counter() - t)
    out["build_ms"] = statistics.median(times) * 1e3
    times = []
    csr = None
    while len(times) < mat_repeat:
        csr = None
        t = time.perf_counter()
        csr = bm.materialize()
        times.append(time.perf_counter() - t)
        if times[0] > big_s:  # a big case: one run
            break
    out["mat_ms"] = statistics.median(times) * 1e3
    out["mat_runs"] = len(times)
    out["visited"] = int(csr.kv_num_blocks.sum()) + int(csr.full_kv_num_blocks.sum())
    out["csr"] = csr
    if measure_mem:
        keep = csr
        csr = None
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            tmp = bm.materialize()
            out["peak_mib"] = (tracemalloc.get_traced_memory()[1] - base) / MiB
            del tmp
        finally:
            tracemalloc.stop()
        out["csr"] = keep
    to_flex = _to_flex()
    if to_flex is not None:  # IR to a torch BlockMask on the device (materialize included)
        try:
            times = []
            while len(times) < mat_repeat:
                t = time.perf_counter()
                bmk = to_flex(bm, device)
                _sync(device)
                times.append(time.perf_counter() - t)
                del bmk
                if times[0] > big_s:
                    break
            out["to_flex_ms"] = statistics.median(times) * 1e3
        except Exception as e:  # noqa: BLE001
            out["to_flex_error"] = _error_text(e)
    return out


# --------------------------------------------------------------------------- check


def compare(csr, arrays, heads: int) -> tuple[str, str]:
    """("OK" | "MISMATCH" | ..., detail)."""
    kvn, kvi, fkvn, fkvi = arrays
    if fkvn is None:
        fkvn = np.zeros_like(kvn)
        fkvi = np.zeros(kvn.shape + (1,), dtype=np.int32)
    details = []
    for what, on, oi, tn, ti in (("kv", csr.kv_num_blocks, csr.kv_indices, kvn, kvi),
                                 ("full_kv", csr.full_kv_num_blocks, csr.full_kv_indices,
                                  fkvn, fkvi)):
        if on.shape != tn.shape:
            details.append(f"{what}_num_blocks shape ours {on.shape} flex {tn.shape}")
            continue
        bad = np.argwhere(on != tn)
        if bad.size:
            h, qb = bad[0]
            details.append(f"{what}_num_blocks differs in {len(bad)} rows, first h={h} qb={qb}: "
                           f"ours {on[h, qb]} flex {tn[h, qb]}")
            continue
        w = min(oi.shape[-1], ti.shape[-1])
        if on.max(initial=0) > w:
            details.append(f"{what}_indices too narrow")
            continue
        valid = np.arange(w)[None, None, :] < on[..., None]
        diff = (oi[..., :w] != ti[..., :w]) & valid
        if diff.any():
            h, qb, _ = np.argwhere(diff)[0]
            c = on[h, qb]
            details.append(f"{what}_indices differ in {int(diff.any(-1).sum())} rows, first "
                           f"h={h} qb={qb}: ours {oi[h, qb, :c].tolist()[:12]} flex "
                           f"{ti[h, qb, :c].tolist()[:12]}")
    return ("OK", "") if not details else ("MISMATCH", "; ".join(details))


# --------------------------------------------------------------------------- report


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def format_row(r: dict) -> str:
    if "attnc_error" in r:
        a_cells = [r["attnc_error"], "-", "-", "-", "-"]
    else:
        a_cells = [fmt_num(r["build_ms"]),
                   fmt_num(r["mat_ms"]) + ("" if r["mat_runs"] > 1 else " (1 run)"),
                   fmt_num(r.get("peak_mib")), f"{r['visited']:,}",
                   r.get("to_flex_error") or fmt_num(r.get("to_flex_ms"))]
    e, c = r["eager"], r["compiled"]
    e_cell = e["error"] if "error" in e else f"{fmt_num(e['ms'])} / {fmt_num(e['peak_mib'])}"
    first = fmt_num(c.get("first_s")) if "first_s" in c else c.get("error", "-")
    if "error" in c:
        c_ms, c_peak = (c["error"] if "first_s" in c else "-"), "-"
    else:
        c_ms, c_peak = fmt_num(c["ms"]), fmt_num(c["peak_mib"])
    cells = [r["label"], str(r["n"]), *a_cells, e_cell, first, c_ms, c_peak, r["check"]]
    return "| " + " | ".join(x.replace("|", "/") for x in cells) + " |"


def device_text(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def versions() -> tuple[str, str]:
    import torch

    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "not installed"
    return torch.__version__, tv


def parse_args(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")],
                    help="comma-separated key lengths (q_len = n); default "
                         + ",".join(map(str, DEFAULT_N)))
    ap.add_argument("--quick", action="store_true", help="n = " + ",".join(map(str, QUICK_N)))
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--block", type=lambda s: tuple(int(x) for x in s.split("x")),
                    default=(128, 128), help="block_m x block_n, e.g. 128x128 (default)")
    ap.add_argument("--patterns", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                    help="comma-separated case ids or pattern names (default: all static)")
    ap.add_argument("--max-dense-gib", type=float, default=8.0,
                    help="skip eager create_block_mask when n*n bytes exceed this (default 8)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds per FlexAttention measurement (eager, compiled) (default 300)")
    ap.add_argument("--no-eager", action="store_true", help="skip eager create_block_mask")
    ap.add_argument("--no-compile", action="store_true", help="skip compiled create_block_mask")
    ap.add_argument("--check-max-n", type=int, default=32768,
                    help="compare with FlexAttention's BlockMask up to this n (default 32768)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="at most this many timed FlexAttention calls per measurement")
    ap.add_argument("--budget", type=float, default=1.0,
                    help="stop repeating a FlexAttention measurement after this many seconds")
    ap.add_argument("--build-repeat", type=int, default=9)
    ap.add_argument("--big-s", type=float, default=2.0,
                    help="materialize once when the first run takes longer (default 2 s)")
    ap.add_argument("--no-attnc-mem", action="store_true",
                    help="skip the tracemalloc run of materialize")
    ap.add_argument("--cpu-mem-limit-gib", type=float, default=None,
                    help="address-space headroom of the CPU worker, so big allocations fail as "
                         "OOM (default: 90%% of available memory; 0: no limit)")
    ap.add_argument("--keep-inductor-cache", action="store_true",
                    help="use the usual inductor cache (default: a fresh one per run, so first "
                         "calls include compilation)")
    ap.add_argument("--out", help="append the table to this Markdown file")
    args = ap.parse_args(argv)
    if args.n is None:
        args.n = list(QUICK_N if args.quick else DEFAULT_N)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    return args


def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    return 0.0


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)  # so that `finally` stops the worker
    from attnc.compiler.blockmask import Schedule
    from attnc.compiler.lower import lower

    import attnc

    t_start = time.perf_counter()
    prog = attnc.loads("")
    schedule = Schedule(block_m=args.block[0], block_n=args.block[1])
    cases = []
    known = {pat for _, pat, _ in CASES}
    for cid, pat, a in CASES:
        if pat in prog.patterns and not prog.pattern(pat).dynamic:
            cases.append((cid, pat, a))
    for pat in sorted(prog.patterns):  # static library patterns this script does not know
        if pat not in known and not prog.pattern(pat).dynamic:
            cases.append((pat, pat, {}))
    if args.patterns:
        cases = [c for c in cases if c[0] in args.patterns or c[1] in args.patterns]
        if not cases:
            print(f"no static pattern matches {args.patterns}", file=sys.stderr)
            return 2

    cache_dir = None
    if not args.keep_inductor_cache:
        cache_dir = tempfile.mkdtemp(prefix="attnc-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    mem_limit = args.cpu_mem_limit_gib
    if mem_limit is None:
        mem_limit = 0.9 * _available_gib()
    worker = FlexWorker(args.device, mem_limit, warmup=True, start_timeout=max(600, args.timeout))
    torch_v, triton_v = versions()
    dev_text = device_text(args.device)
    mem_how = ("torch.cuda.max_memory_allocated" if args.device == "cuda" else
               "peak RSS of the worker over the call (VmHWM delta)")
    if args.device == "cpu" and mem_limit > 0:
        mem_how += f"; worker address space capped at +{mem_limit:.0f} GiB (OOM beyond)"

    rows = []
    mismatches = []
    try:
        for cid, pat, a in cases:
            ir = lower(prog, pat, a)
            label = case_label(pat, a)
            has_flex = make_mask_mod(pat, a) is not None
            for n in args.n:
                print(f"[{time.perf_counter() - t_start:7.1f}s] {label} n={n}", file=sys.stderr,
                      flush=True)
                row = {"label": label, "n": n}
                try:
                    r = attnc_measure(ir, n, args.heads, schedule, args.build_repeat, 3,
                                      args.big_s, not args.no_attnc_mem, args.device)
                    row.update(r)
                except BaseException as e:  # noqa: BLE001
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    row["attnc_error"] = _error_text(e)
                want = n <= args.check_max_n and "csr" in row
                base = {"pattern": pat, "args": a, "n": n, "heads": args.heads,
                        "block_m": args.block[0], "block_n": args.block[1],
                        "repeat": args.repeat, "budget_s": args.budget}
                arrays, source = None, None
                if not has_flex:
                    row["eager"] = row["compiled"] = {"error": "no mask_mod in this script"}
                else:
                    need = n * n * args.heads
                    if args.no_eager:
                        row["eager"] = {"error": "not run"}
                    elif need > args.max_dense_gib * GiB:
                        row["eager"] = {"error": f"skipped: needs n^2 = {fmt_num(need / GiB)} GiB"}
                    else:
                        row["eager"] = worker.request({**base, "mode": "eager",
                                                       "want_arrays": want}, args.timeout)
                        arrays = row["eager"].pop("arrays", None)
                        source = "eager"
                    if args.no_compile:
                        row["compiled"] = {"error": "not run"}
                    else:
                        row["compiled"] = worker.request(
                            {**base, "mode": "compiled", "want_arrays": want and arrays is None},
                            args.timeout)
                        arr2 = row["compiled"].pop("arrays", None)
                        if arrays is None and arr2 is not None:
                            arrays, source = arr2, "compiled"
                if not want:
                    row["check"] = "-" if "csr" in row else "n/a"
                elif arrays is None:
                    row["check"] = "n/a (no flex mask)"
                else:
                    verdict, detail = compare(row["csr"], arrays, args.heads)
                    row["check"] = f"{verdict} (vs {source})"
                    if detail:
                        mismatches.append((cid, label, n, source, detail))
                row.pop("csr", None)
                rows.append(row)
                print("    " + format_row(row), file=sys.stderr, flush=True)
    finally:
        worker.close()
        if cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)

    elapsed = time.perf_counter() - t_start
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"**Block-mask construction** ({date}): device {dev_text}; torch {torch_v}; "
        f"triton {triton_v}; H = {args.heads}, block {args.block[0]}x{args.block[1]}, "
        f"q_len = n. attnc peak: tracemalloc (numpy) during materialize; attnc to BlockMask: "
        f"attnc.codegen.flex.to_flex_block_mask (materialize included; '-' where absent); "
        f"flex peak: {mem_how}. "
        f"Run took {elapsed:.0f} s.",
        "",
        "| pattern | n | attnc build ms | attnc materialize ms | attnc peak MiB | visited blocks "
        "| attnc to BlockMask ms | flex eager ms / peak MiB | flex compiled first-call s "
        "| flex compiled ms | flex compiled peak MiB | check |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(format_row(r))
    if mismatches:
        lines += ["", "Mismatches:"]
        for cid, label, n, source, detail in mismatches:
            lines.append(f"- {label}, n = {n}, against the {source} BlockMask: {detail}. Repro: "
                         f"`python benchmarks/blockmask.py --device {args.device} --patterns "
                         f"{cid} --n {n} --heads {args.heads}`")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
