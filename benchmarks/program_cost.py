"""Per-program cost of the forward kernels: streaming attention with windows of 1 to 128 key
blocks, time against key blocks per program, and a least-squares line per launch (slope: time
per key block; intercept: fixed cost per program, i.e. Q load, range arithmetic, pipeline
fills and O store) next to FlexAttention's on the same GPU in the same run.

    python benchmarks/program_cost.py --n 32768 --windows 128,1024,2048,4096,8192,16384

Short programs (streaming, a_shape, shards) are where attnc's margin over FlexAttention is
smallest (docs/BENCHMARKS.md); this measures why.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through (xs, ys)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--windows", default="128,1024,2048,4096,8192,16384")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--candidates", default="128x128x8x3+tma,128x128x8x3+tma+one,64x64x4x3+tma",
                    help="attnc launches (codegen.tune.parse_candidate syntax)")
    ap.add_argument("--rep", type=float, default=100.0)
    a = ap.parse_args(argv)

    import triton
    from attnc.codegen import kernel
    from attnc.codegen.flex import to_flex_block_mask
    from attnc.codegen.tune import _trial, parse_candidate
    from attnc.compiler.blockmask import Schedule
    from attnc.compiler.stages import compile_pattern
    from blockmask import make_mask_mod
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    import attnc

    if not torch.cuda.is_available():
        print("program_cost: needs a GPU", file=sys.stderr)
        return 1
    lib = attnc.loads("")  # the shipped library
    info = lib.pattern("streaming")
    n, H, D = a.n, a.heads, a.dim
    q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cands = [parse_candidate(c) for c in a.candidates.split(",")]
    names = a.candidates.split(",") + ["flex"]
    pts: dict[str, list[tuple[float, float]]] = {m: [] for m in names}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton "
          f"{triton.__version__}, n = {n}, H = {H}, D = {D}, bf16, {sms} SMs")
    print("| window | blocks / program | " + " | ".join(f"{m} ms" for m in names) + " |")
    print("|---" * (2 + len(names)) + "|")
    for w in (int(x) for x in a.windows.split(",")):
        args = {"sink": a.sink, "window": w}
        nat = compile_pattern(info, args, n=n, heads=H, schedule=Schedule(128, 128),
                              layout="none").blockmask
        fb = to_flex_block_mask(nat, device="cuda")
        per = float((fb.kv_num_blocks + fb.full_kv_num_blocks).float().mean())
        times, pers = [], []
        for c in cands:
            bm = compile_pattern(info, args, n=n, heads=H, schedule=Schedule(c[0], c[1]),
                                 layout="none").blockmask
            own = to_flex_block_mask(bm, device="cuda")
            pers.append(float((own.kv_num_blocks + own.full_kv_num_blocks).float().mean()))
            cfg = _trial(c).config()
            kernel.attention(q, k, v, bm, config=cfg)
            times.append(triton.testing.do_bench(
                lambda bm=bm, cfg=cfg: kernel.attention(q, k, v, bm, config=cfg),
                warmup=25, rep=a.rep, return_mode="median"))
        fbm = BlockMask.from_kv_blocks(fb.kv_num_blocks, fb.kv_indices, fb.full_kv_num_blocks,
                                       fb.full_kv_indices, BLOCK_SIZE=fb.BLOCK_SIZE,
                                       mask_mod=make_mask_mod("streaming", args),
                                       seq_lengths=fb.seq_lengths)
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)
        flex(q, k, v, block_mask=fbm)
        times.append(triton.testing.do_bench(lambda f=flex, m=fbm: f(q, k, v, block_mask=m),
                                             warmup=25, rep=a.rep, return_mode="median"))
        for m, p, t in zip(names, pers + [per], times, strict=True):
            pts[m].append((p, t))
        print(f"| {w} | {per:.1f} | " + " | ".join(f"{t:.3f}" for t in times) + " |",
              flush=True)
    # Programs run in waves of one per multiprocessor (one 128-row program fits an SM), so
    # the time per program is the time / (programs / SMs).
    # Key blocks per program in each launch's own tiles (64 x 64 tiles: about twice as many).
    print("\n| launch | us per key block | us fixed per program | fixed in key blocks |")
    print("|---|---|---|---|")
    for m in names:
        bm_rows = 128 if m == "flex" else int(m.split("x")[0])
        waves = H * -(-n // bm_rows) / sms
        slope, icpt = _fit([p for p, _ in pts[m]], [t * 1e3 / waves for _, t in pts[m]])
        print(f"| {m} | {slope:.3f} | {icpt:.2f} | {icpt / slope:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
