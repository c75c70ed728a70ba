"""Forward attention kernels: attnc's generated Triton kernels against FlexAttention (same mask,
compiled) and dense SDPA (flash and cuDNN backends), on one GPU, in one run.

    python benchmarks/kernels.py                       # bf16, B=1, H=16, D=128, n = 8k 32k 128k
    python benchmarks/kernels.py --n 8192 --patterns causal,streaming --no-tune

For every case: correctness first (attnc's output against FlexAttention's, relative Frobenius
error, and against a float64 dense reference on a slice of query rows), then times (median of
triton.testing.do_bench), useful TFLOP/s (4 * D * kept pairs, kept pairs counted exactly from the
block-mask IR) and speedups. attnc's launch (block sizes, warps, stages) is autotuned per case
(codegen.tune, records in ATTNC_CACHE_DIR/tuning) unless --no-tune; the row also says which
schedule and layout ran. FlexAttention gets a hand-written mask_mod (as a user would write it,
benchmarks/blockmask.py) and the same BlockMask (built from attnc's CSR at 128 x 128; it equals
create_block_mask's); its block-mask construction is not timed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CASES: list[tuple[str, str, dict]] = [
    ("causal", "causal", {}),
    ("streaming", "streaming", {"sink": 64, "window": 4096}),
    ("a_shape", "a_shape", {"sink": 64, "local": 4096}),
    ("dilated", "dilated", {"window": 4096, "dilation": 4}),
    ("shards", "shards", {"stride": 8, "step": 1, "block": 128, "local": 1024}),
    ("radial", "radial", {"block": 128, "dense": 8, "causal": True}),
]


def _bench(fn, rep=100):
    import triton

    fn()
    if not torch.cuda.is_available():  # CPU smoke run: one timed call
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / (b.norm() + 1e-30)).item()


def _reference_rows(q, k, v, mask_fn, rows: torch.Tensor) -> torch.Tensor:
    """float64 dense masked attention for a few query rows (all keys)."""
    B, H, N, D = q.shape
    g = H // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    qq = q[:, :, rows].double()
    s = (qq @ kk.transpose(-1, -2)) * D ** -0.5
    kpos = torch.arange(N, device=q.device)
    hh = torch.arange(H, device=q.device)[:, None, None]
    m = mask_fn(None, hh, rows[None, :, None].to(q.device), kpos[None, None, :])
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vv


def run_case(label, pattern, args, n, H, Hkv, D, dtype, tune, rep, lib, out_rows,
             candidates=None):
    from attnc.codegen import kernel
    from attnc.codegen.flex import to_flex_block_mask
    from attnc.codegen.tune import autotune
    from attnc.compiler.blockmask import Schedule
    from attnc.compiler.stages import compile_pattern
    from blockmask import make_mask_mod
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    info = lib.pattern(pattern)
    q = torch.randn(1, H, n, D, device=dev, dtype=dtype)
    k = torch.randn(1, Hkv, n, D, device=dev, dtype=dtype)
    v = torch.randn(1, Hkv, n, D, device=dev, dtype=dtype)

    def make_bm(schedule, layout="auto"):
        return compile_pattern(info, args, n=n, heads=H, schedule=schedule,
                               layout=layout).blockmask

    row = {"case": label, "n": n}
    # Natural-order mask at Flex's 128 x 128: kept pairs (exact) and Flex's BlockMask.
    nat = make_bm(Schedule(128, 128), "none")
    # Kept pairs are the same in every layout; the chosen one has the fewest partial blocks,
    # which are what counting costs.
    st = make_bm(Schedule(128, 128)).stats(D)
    useful = 4 * D * st.kept_pairs  # B = 1
    row["density"] = st.density
    if tune:
        bm, cfg, rec = autotune(make_bm, q, k, v, rep_ms=rep, candidates=candidates,
                                pattern_key=nat.pattern.key)
        row["trials"] = "; ".join(
            f"{t.label()}=" + (f"fail ({t.error[:160]})" if math.isinf(t.ms) else f"{t.ms:.3f}")
            for t in rec.trials)
    else:
        bm = make_bm(Schedule(128, 128))
        cfg = kernel.default_config(bm, D)
    src = kernel.kernel_source(bm)
    row["schedule"] = ("ranges" if "arithmetic ranges" in src.split("\n", 1)[0] else "lists") \
        + (f"+{bm.layout.kind}" if bm.layout is not None else "") \
        + f" {bm.schedule.block_m}x{bm.schedule.block_n}/{cfg.label()}"

    def ours():
        return kernel.attention(q, k, v, bm, config=cfg).out

    o = ours()
    mod = make_mask_mod(pattern, args)
    ours_bm = to_flex_block_mask(nat, device=dev)
    fbm = BlockMask.from_kv_blocks(
        ours_bm.kv_num_blocks, ours_bm.kv_indices, ours_bm.full_kv_num_blocks,
        ours_bm.full_kv_indices, BLOCK_SIZE=ours_bm.BLOCK_SIZE, mask_mod=mod,
        seq_lengths=ours_bm.seq_lengths)
    # A fresh compile per case: dynamo's recompile limit would otherwise send later cases to
    # the eager path (which forms n x n scores).
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False) if dev == "cuda" else flex_attention

    def run_flex():
        return flex(q, k, v, block_mask=fbm, enable_gqa=(H != Hkv))

    of = run_flex()
    rows = torch.linspace(0, n - 1, 64, device=dev).long()
    ref = _reference_rows(q, k, v, mod, rows)
    row["err_ref"] = _rel(o[:, :, rows], ref)
    row["err_flex_ref"] = _rel(of[:, :, rows], ref)
    if row["err_flex_ref"] > 10 * max(row["err_ref"], 1e-3):
        # FlexAttention computed something else with the hand-written mask_mod: time it with
        # the mask_mod derived from attnc's IR instead (and say so in the row).
        from attnc.codegen.flex import mask_mod_for

        fbm = BlockMask.from_kv_blocks(
            ours_bm.kv_num_blocks, ours_bm.kv_indices, ours_bm.full_kv_num_blocks,
            ours_bm.full_kv_indices, BLOCK_SIZE=ours_bm.BLOCK_SIZE,
            mask_mod=mask_mod_for(nat), seq_lengths=ours_bm.seq_lengths)
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False) if dev == "cuda" else flex_attention
        of = run_flex()
        row["flex_note"] = (f"hand-written mask_mod gave error {row['err_flex_ref']:.1e}; "
                            "timed with attnc's IR mask_mod")
        row["err_flex_ref"] = _rel(of[:, :, rows], ref)
    row["err_vs_flex"] = _rel(o, of)
    if not torch.isfinite(o).all():
        row["err_ref"] = math.nan
    row["ours_ms"] = _bench(ours, rep)
    row["flex_ms"] = _bench(run_flex, rep)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            kk = k.repeat_interleave(H // Hkv, 1) if H != Hkv else k
            vv = v.repeat_interleave(H // Hkv, 1) if H != Hkv else v

            def sdpa(backend=backend, kk=kk, vv=vv):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q, kk, vv, is_causal=True)

            row[f"{name}_ms"] = _bench(sdpa, rep)
        except Exception as e:  # noqa: BLE001 - a backend missing here is a table cell
            row[f"{name}_ms"] = math.nan
            row[f"{name}_err"] = str(e).splitlines()[0][:80]
    row["ours_tflops"] = useful / row["ours_ms"] / 1e9
    row["flex_tflops"] = useful / row["flex_ms"] / 1e9
    row["speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"]
    out_rows.append(row)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="8192,32768,131072")
    ap.add_argument("--patterns", default=",".join(c[0] for c in CASES))
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--candidates", default=None,
                    help="launch candidates BMxBNxWARPSxSTAGES[+tma|+tma2][+one],... (default: "
                         "codegen.tune's for the GPU and head dim)")
    ap.add_argument("--rep", type=float, default=100.0, help="do_bench rep in ms")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--log", default=None, help="append each case's line to this file")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        print("benchmarks/kernels.py needs a CUDA GPU (or TRITON_INTERPRET=1 for a CPU smoke "
              "run at small n)", file=sys.stderr)
        return 1
    import triton

    import attnc

    lib = attnc.loads("")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    wanted = a.patterns.split(",")
    from attnc.codegen.tune import parse_candidate

    cands = [parse_candidate(c) for c in a.candidates.split(",")] if a.candidates else None
    rows: list[dict] = []
    for n in [int(x) for x in a.n.split(",")]:
        for label, pattern, args in CASES:
            if label not in wanted:
                continue
            try:
                r = run_case(label, pattern, args, n, a.heads, a.kv_heads, a.dim, dtype,
                             not a.no_tune, a.rep, lib, rows, cands)
                line = (f"{label:10s} n={n:6d} ours {r['ours_ms']:8.3f} ms flex "
                        f"{r['flex_ms']:8.3f} ms cudnn {r['cudnn_ms']:8.3f} ms "
                        f"x{r['speedup_vs_flex']:.2f} err {r['err_ref']:.1e}/"
                        f"{r['err_flex_ref']:.1e} vs-flex {r['err_vs_flex']:.1e} "
                        f"{r['schedule']}" + (f"\n    trials: {r['trials']}" if "trials" in r
                                               else "")
                        + (f"\n    note: {r['flex_note']}" if "flex_note" in r else ""))
                print(line, flush=True)
                if a.log:
                    with open(a.log, "a") as f:
                        f.write(line + "\n")
            except Exception:  # noqa: BLE001 - one failed case must not stop the run
                traceback.print_exc()
                rows.append({"case": label, "n": n, "failed": True})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (interpreter)"
    head = (f"{dev}, torch {torch.__version__}, triton {triton.__version__}, "
            f"{_dt.date.today().isoformat()}, {platform.python_version()}; {a.dtype}, B = 1, "
            f"H = {a.heads}, Hkv = {a.kv_heads}, D = {a.dim}")
    lines = [head, "",
             "| case | n | density | attnc ms | Flex ms | flash ms | cuDNN ms | attnc TFLOP/s "
             "| Flex TFLOP/s | vs Flex | err attnc / Flex (fp64 rows) | attnc schedule |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['case']} | {r['n']} | failed | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['case']} | {r['n']} | {r['density']:.4f} | {r['ours_ms']:.3f} | "
            f"{r['flex_ms']:.3f} | {r['flash_ms']:.3f} | {r['cudnn_ms']:.3f} | "
            f"{r['ours_tflops']:.0f} | {r['flex_tflops']:.0f} | {r['speedup_vs_flex']:.2f}x | "
            f"{r['err_ref']:.1e} / {r['err_flex_ref']:.1e} | {r['schedule']} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
            for r in rows:
                if "trials" in r:
                    f.write(f"\n{r['case']} n={r['n']} trials: {r['trials']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
