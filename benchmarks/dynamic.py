"""Dynamic patterns on one GPU: attnc's builders + kernels vs FlexAttention (same sets) and SDPA.

    python benchmarks/dynamic.py                  # bf16, B=1, H=16, D=128, n = 32k and 128k
    python benchmarks/dynamic.py --n 32768 --quick

Patterns: vertical_slash(vertical = 1000, slash = 6096, last_q = 64) through the vertical-slash
kernel (diagonal ranges, gathered columns), and block_topk(topk = 16, block = 64) through the
generated block kernel on the builder's block lists. Inputs are synthetic but structured as in
long-context models: rotary positional components give logits ~ 12 exp(-|q - k| / 4096), so
attention concentrates near the diagonal, plus ~800 "sink" keys every query attends to (vertical
lines); with unstructured random inputs the top diagonals scatter, their key ranges merge, and
vertical-slash costs as much as dense attention.

Every time includes the builder: attnc = index builders + attention; FlexAttention = the same
builders + BlockMask.from_kv_blocks + compiled flex_attention with a mask_mod reading the same
selections. SDPA is dense causal attention (cuDNN and flash backends). Correctness: attnc's output
against FlexAttention's on the same sets (relative Frobenius error). Useful TFLOP/s count only
kept pairs (4 * D per pair).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

BAD = float("nan")


def bench(fn, reps: int) -> float:
    """Median milliseconds of fn() over reps runs (CUDA events), after two warm-up runs."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def inputs(n: int, H: int, D: int, seed: int = 0, device: str = "cuda"):
    """Structured q, k, v [1, H, n, D] in bf16 (see the module docstring).

    The first D - 16 dims are rotary pairs: q_i = R(i) u, k_j = R(j) u, so q_i . k_j =
    sum_p c_p cos(theta_p (i - j)) depends on i - j only; evenly spaced theta_p (period 2n) with
    Lorentzian weights make it ~ 12 exp(-|i - j| / 4096) logits. The last 16 dims carry a sink
    direction (+5 logits for ~800 random keys and keys 0..3) and small noise everywhere."""
    g = torch.Generator(device=device).manual_seed(seed)
    F = (D - 16) // 2
    L = 4096.0
    theta = torch.arange(F, device=device, dtype=torch.float64) * (math.pi / n)
    c = 1.0 / (1.0 + (theta * L) ** 2)
    c = c / c.sum() * 12.0 * math.sqrt(D)
    pos = torch.arange(n, device=device, dtype=torch.float64).view(-1, 1)
    ang = pos * theta.view(1, -1)
    rot = torch.stack([torch.cos(ang), torch.sin(ang)], -1) * c.sqrt().view(1, -1, 1)
    rot = rot.reshape(n, 2 * F).float()  # [n, 2F]: R(i) u with u = (sqrt(c_p), 0) per pair
    sink = torch.zeros(n, device=device)
    idx = torch.cat([torch.arange(4, device=device),
                     torch.randperm(n, generator=g, device=device)[:800]])
    sink[idx] = 1.0
    tail = D - 2 * F
    e = torch.zeros(tail, device=device)
    e[0] = 1.0
    q = torch.cat([rot, torch.ones(n, 1, device=device) * e * 5.0 ** 0.5 * D ** 0.25], -1)
    k = torch.cat([rot, sink.view(-1, 1) * e * 5.0 ** 0.5 * D ** 0.25], -1)
    q = q.unsqueeze(0) + 0.2 * torch.randn(H, n, D, generator=g, device=device)
    k = k.unsqueeze(0) + 0.2 * torch.randn(H, n, D, generator=g, device=device)
    v = torch.randn(H, n, D, generator=g, device=device)
    return tuple(t.unsqueeze(0).to(torch.bfloat16).contiguous() for t in (q, k, v))


def kept_pairs_vs(cols: torch.Tensor, diags: torch.Tensor, n: int) -> int:
    """Exact causal pairs with k in cols or q - k in diags, all n queries."""
    c, d = cols.double(), diags.double()
    cc = c.cumsum(-1)  # columns <= q
    dc = d.cumsum(-1)  # offsets 0..q
    m = 2 * n
    both = torch.fft.irfft(torch.fft.rfft(c, m) * torch.fft.rfft(d, m), m)[..., :n].round()
    return int((cc + dc - both).sum().item())


def kept_pairs_blocks(flags: torch.Tensor, n: int, block: int) -> int:
    nb = flags.shape[-1]
    size = torch.full((nb,), block, dtype=torch.float64, device=flags.device)
    size[-1] = n - (nb - 1) * block
    pairs = size.view(-1, 1) * size.view(1, -1)
    pairs.diagonal().copy_(size * (size + 1) / 2)
    pairs = torch.tril(pairs)
    return int((flags.double() * pairs).sum().item())


def flex_block_mask(lists: dict, mask_mod, block: int, n: int):
    from torch.nn.attention.flex_attention import BlockMask

    t = {x: v.unsqueeze(0) for x, v in lists.items()}
    return BlockMask.from_kv_blocks(t["kv_num_blocks"], t["kv_indices"],
                                    t["full_kv_num_blocks"], t["full_kv_indices"],
                                    BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(n, n))


def run_case(kind: str, n: int, H: int, D: int, reps: int, flex_fn, rows: list, dense: dict,
             launches: list) -> None:
    from attnc.codegen import dynamic as dyn
    from attnc.compiler.blockmask import Schedule, build
    from attnc.compiler.lower import lower

    import attnc

    lib = attnc.loads("")
    q, k, v = inputs(n, H, D)
    if kind == "vertical_slash":
        args, block = {"vertical": 1000, "slash": 6096, "last_q": 64}, 128
    else:
        args, block = {"topk": 16, "block": 64}, 64
    ir = lower(lib, kind, args)
    best = None
    for BM, BN, warps, stages, *rest in (launches if kind == "vertical_slash"
                                         else [(64, 64, 4, 2)]):
        bm = build(ir, n=n, heads=H, schedule=Schedule(BM, BN))
        launch = {"num_warps": warps, "num_stages": stages}
        if rest:  # a fifth field: the VS kernel's BRANCH switch (1: predicate in a branch)
            launch["BRANCH"] = bool(rest[0])
        if len(rest) > 1:  # a sixth: TMA loads for the diagonal ranges' tiles (Hopper)
            launch["TMA"] = int(rest[1])
        try:
            t = bench(lambda bm=bm, launch=launch: dyn.dynamic_attention(q, k, v, bm,
                                                                         launch=launch), reps)
        except Exception as e:  # noqa: BLE001 - a launch that does not fit is skipped
            print(f"  {kind} n={n} launch {BM}x{BN} w{warps} s{stages} failed: {e!s:.120}")
            continue
        print(f"  {kind} n={n} launch {BM}x{BN} w{warps} s{stages} {launch}: {t:.2f} ms")
        if best is None or t < best[0]:
            best = (t, bm, launch, (BM, BN, warps, stages, *rest))
    if best is None:
        return
    total, bm, launch, cfg = best
    if kind == "vertical_slash" and len(launches) > 1:
        launches[:] = [cfg]  # keep the winner for the next n

    def builder():  # what dynamic_attention runs before its kernel
        vs = kind == "vertical_slash"
        ix = dyn.build_index(q[0], k[0], bm, lists=False, side=not vs)
        if kind == "vertical_slash":
            dyn.vs_plan(ix.of("in_columns"), ix.of("in_diagonals"), bm,
                        max_cols=dyn.vs_max_columns(bm, H))
        return ix

    t_build = bench(builder, reps)
    res, sets = dyn.dynamic_attention(q, k, v, bm, launch=launch, return_index=True)
    ix = sets[0]
    if kind == "vertical_slash":
        cols, diags = ix.of("in_columns"), ix.of("in_diagonals")
        pairs = kept_pairs_vs(cols, diags, n)

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & (cols[h, ki] | diags[h, (qi - ki).clamp(min=0)])
    else:
        flags = ix.of("top_blocks")
        pairs = kept_pairs_blocks(flags, n, 64)

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & flags[h, qi // 64, ki // 64]
    flops = 4 * D * pairs
    rows.append((kind, n, "attnc", total, t_build, flops))
    # FlexAttention on the same selections, builder and BlockMask construction included.
    # FlexAttention's lists at its own block size (128, or the selector's 64).
    fsched = Schedule(block, block)
    bmf = build(ir, n=n, heads=H, schedule=fsched)
    opts = {"BLOCK_M": 64, "BLOCK_N": 64} if block == 64 else None
    try:
        fbm = flex_block_mask(dyn.build_index(q[0], k[0], bmf).flex, mask_mod, block, n)
        out_f = flex_fn(q, k, v, block_mask=fbm, kernel_options=opts)
        err = ((res.out.float() - out_f.float()).norm() / out_f.float().norm()).item()
        print(f"  {kind} n={n}: relative error vs FlexAttention (same sets) {err:.2e}, "
              f"density {pairs / (H * n * (n + 1) / 2):.4f}")

        def flex_total():
            ix2 = dyn.build_index(q[0], k[0], bmf, lists=True)
            m2 = flex_block_mask(ix2.flex, mask_mod, block, n)
            return flex_fn(q, k, v, block_mask=m2, kernel_options=opts)

        t_flex = bench(flex_total, reps)
        t_flex_build = bench(lambda: flex_block_mask(
            dyn.build_index(q[0], k[0], bmf, lists=True).flex, mask_mod, block, n), reps)
        rows.append((kind, n, "flex", t_flex, t_flex_build, flops))
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"  FlexAttention failed for {kind} n={n}: {e!s:.200}")
    # The same calls captured as one CUDA graph each (no host launch work per call).
    try:
        g = dyn.Graphed(q, k, v, bm, launch=launch)
        gerr = ((g().out.float() - res.out.float()).norm() / res.out.float().norm()).item()
        t_graph = bench(g, reps)
        print(f"  {kind} n={n}: graphed {t_graph:.2f} ms, relative difference to eager "
              f"{gerr:.1e}")
        rows.append((kind, n, "attnc-graph", t_graph, 0.0, flops))
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"  graphed attnc failed for {kind} n={n}: {e!s:.200}")
    try:
        flex_total()  # compiled and warm
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            flex_total()
        torch.cuda.current_stream().wait_stream(side)
        fg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(fg):
            flex_total()
        rows.append((kind, n, "flex-graph", bench(fg.replay, reps), 0.0, flops))
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"  graphed FlexAttention failed for {kind} n={n}: {e!s:.200}")
    for name in ("cudnn", "flash"):
        if (n, name) not in dense:
            continue
        rows.append((kind, n, f"sdpa-{name}", dense[(n, name)], 0.0, 4 * D * H * n * (n + 1) // 2))
    torch.cuda.empty_cache()


def dense_times(n: int, H: int, D: int, reps: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = {}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(be):
                out[(n, name)] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True), reps)
        except Exception as e:  # noqa: BLE001
            print(f"  SDPA {name} failed at n={n}: {e!s:.120}")
    return out


def profile_vs(n: int, H: int, D: int) -> None:
    """Where vertical-slash's time goes: torch.profiler's CUDA time per kernel over three
    calls, and the plan's size (diagonal groups, band width, gathered columns per query
    block, key tiles visited against causal)."""
    from attnc.codegen import dynamic as dyn
    from attnc.compiler.blockmask import Schedule, build
    from attnc.compiler.lower import lower
    from torch.profiler import ProfilerActivity, profile

    import attnc

    ir = lower(attnc.loads(""), "vertical_slash", {"vertical": 1000, "slash": 6096,
                                                   "last_q": 64})
    q, k, v = inputs(n, H, D)
    bm = build(ir, n=n, heads=H, schedule=Schedule(64, 64))
    launch = {"num_warps": 4, "num_stages": 3}
    for _ in range(2):  # compile and warm up
        dyn.dynamic_attention(q, k, v, bm, launch=launch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            dyn.dynamic_attention(q, k, v, bm, launch=launch)
        torch.cuda.synchronize()
    print(f"== vertical_slash n={n}: per-kernel time over 3 calls")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22,
                                    max_name_column_width=60))
    t_all = bench(lambda: dyn.dynamic_attention(q, k, v, bm, launch=launch), 5)
    ix = dyn.build_index(q[0], k[0], bm, lists=False, side=False)
    t_ix = bench(lambda: dyn.build_index(q[0], k[0], bm, lists=False, side=False), 5)
    cols, diags = ix.of("in_columns"), ix.of("in_diagonals")
    mc = dyn.vs_max_columns(bm, H)
    t_plan = bench(lambda: dyn.vs_plan(cols, diags, bm, max_cols=mc), 5)
    plan = dyn.vs_plan(cols, diags, bm, max_cols=mc)
    band = (plan["ghi"].long() - plan["glo"].long() + 1).clamp(min=0)
    ng = plan["ngroups"]
    valid = torch.arange(band.shape[1], device=band.device).view(1, -1) < ng.view(-1, 1)
    band = (band * valid).sum(-1)
    qb = plan["ncols"].shape[1]
    tiles = (band.double().mean() / 64 + 2 * plan["ngroups"].double().mean()
             + plan["ncols"].double().mean() / 64)
    causal_tiles = (n / 64) / 2
    print(f"total {t_all:.2f} ms; build_index {t_ix:.2f} ms; vs_plan {t_plan:.2f} ms; "
          f"groups/head mean {ng.float().mean():.1f} max {int(ng.max())};"
          f" band width/head mean {band.double().mean():.0f}; gathered columns per query block "
          f"mean {plan['ncols'].double().mean():.0f} ({qb} blocks); ~key tiles per query block "
          f"{tiles:.0f} vs causal {causal_tiles:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--patterns", default="vertical_slash,block_topk")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, one launch")
    ap.add_argument("--launches", default=None,
                    help="vertical-slash kernel launches to try, "
                         "BMxBNxWARPSxSTAGES[xBRANCH[xTMA]],...")
    ap.add_argument("--profile", action="store_true",
                    help="vertical-slash only: per-kernel CUDA times and the plan's shape")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/dynamic.py needs a CUDA device")
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET to benchmark compiled kernels")
    from torch.nn.attention.flex_attention import flex_attention

    t0 = time.time()
    if a.profile:
        for n in a.n:
            profile_vs(n, a.heads, a.dim)
        return
    flex_fn = torch.compile(flex_attention, dynamic=False)
    reps = 3 if a.quick else 10
    if a.launches:
        launches = [tuple(int(x) for x in c.split("x")) for c in a.launches.split(",")]
    else:
        # 64 x 64 tiles with the predicate behind a branch won on an H200 (docs/BENCHMARKS.md)
        launches = [(64, 64, 4, 3, 1)] if a.quick else [(64, 64, 4, 3, 1), (128, 64, 8, 3, 1),
                                                        (64, 64, 4, 2, 1)]
    rows: list = []
    for n in a.n:
        dense = dense_times(n, a.heads, a.dim, reps)
        for kind in a.patterns.split(","):
            run_case(kind, n, a.heads, a.dim, reps, flex_fn, rows, dense, launches)
    print(f"\n{torch.cuda.get_device_name()}, bf16, B=1, H={a.heads}, D={a.dim}; times in ms "
          "(median), builder included; TFLOP/s over kept pairs only")
    head = (f"{'pattern':<15}{'n':>8}  {'method':<12}{'total':>9}{'builder':>9}{'share':>7}"
            f"{'TFLOP/s':>9}{'vs cuDNN':>10}{'vs flex':>9}")
    print(head)
    print("-" * len(head))
    for kind, n, method, t, tb, flops in rows:
        ref = {m: x[3] for x in rows if x[0] == kind and x[1] == n for m in [x[2]]}
        cud = ref.get("sdpa-cudnn", BAD)
        flx = ref.get("flex", BAD)
        share = f"{100 * tb / t:5.1f}%" if tb else "     -"
        print(f"{kind:<15}{n:>8}  {method:<12}{t:9.2f}{tb:9.2f}{share:>7}"
              f"{flops / t / 1e9:9.1f}{cud / t:9.2f}x{flx / t:8.2f}x")
    print(f"\n(ran in {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
