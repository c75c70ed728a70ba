"""Tuning records for the head tuner's latency model: every candidate of the autotune grid timed
with its generated kernel at a model's shapes, plus gated patterns and one plan kernel (GPU).

    python benchmarks/latency_records.py --out autotune/data/records/h200 \
        --n 2048,4096,8192 --heads 9 --kv-heads 3 --dim 64 --dtype float16

Each static candidate goes through codegen.tune.autotune (the launch configs below; a config
that fails to compile scores as infinitely slow) and its record is written to --out, filed under
the candidate's pattern key, as autotune.latency reads it (`attnc tune --records DIR`). Gated
candidates are timed end to end (the gate on q and k, the index builder and the block kernel)
at several block budgets and written as gate records (`gates.json`, kind "gate"): the latency
model charges a gated head the measured gate time plus its kept blocks. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="record directory")
    ap.add_argument("--n", default="2048,4096,8192")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--configs", default="64x64x4x3,128x64x4x3,128x128x8x3")
    ap.add_argument("--rep", type=float, default=25.0, help="do_bench rep in ms")
    ap.add_argument("--gate-topk", default="2,4,8,16,32", help="gated budgets (blocks per row)")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; stops cleanly after")
    ap.add_argument("--gated-only", action="store_true",
                    help="only the gated patterns and dense causal (long contexts)")
    ap.add_argument("--dynamic-only", action="store_true",
                    help="only the dynamic candidates (vertical-slash, block top-k)")
    a = ap.parse_args()
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("needs a CUDA device and compiled kernels (TRITON_INTERPRET unset)")
    from attnc.autotune.candidates import GRIDS, grid, valid_at
    from attnc.codegen import tune as ktune
    from attnc.compiler.blockmask import Schedule, build

    t_start = time.monotonic()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dt = getattr(torch, a.dtype)
    H, G, D = a.heads, a.kv_heads, a.dim
    configs = [tuple(int(x) for x in c.split("x")) for c in a.configs.split(",")]
    dev = torch.cuda.get_device_name()
    print(f"{dev}, torch {torch.__version__}, {a.dtype}, H={H}, KV={G}, D={D}")
    cands = grid(list(GRIDS)) if not a.gated_only else grid([])
    if a.dynamic_only:
        cands = []
    rows = []
    for n in (int(x) for x in a.n.split(",")):
        q = torch.randn(1, H, n, D, device="cuda", dtype=dt)
        k = torch.randn(1, G, n, D, device="cuda", dtype=dt)
        v = torch.randn(1, G, n, D, device="cuda", dtype=dt)
        for c in cands:
            if time.monotonic() - t_start > a.budget:
                print("time budget spent; stopping")
                break
            if c.dynamic or not valid_at(c, n):
                continue  # dynamic candidates: dynamic_records below
            ir = c.ir()

            def make_bm(s: Schedule, ir=ir, n=n):
                return build(ir, n=n, heads=H, schedule=s)

            try:
                _, cfg, rec = ktune.autotune(make_bm, q, k, v, candidates=configs,
                                             rep_ms=a.rep, directory=out, pattern_key=ir.key)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{c} n={n}: failed: {e!s:.160}")
                continue
            b = rec.best
            rows.append((str(c), n, rec.ms, f"{b.block_m}x{b.block_n}/w{b.num_warps}"
                         f"/s{b.num_stages}", rec.visited_blocks))
            print(f"{c!s:<58} n={n:<6} {rec.ms:8.4f} ms  {rows[-1][3]}  "
                  f"{rec.visited_blocks} blocks", flush=True)
        if a.dynamic_only:
            dynamic_records(q, k, v, n, a, dev, out, t_start)
            continue
        gated_records(q, k, v, n, a, dev, out, t_start)
        if not a.gated_only:
            dynamic_records(q, k, v, n, a, dev, out, t_start)
            plan_kernel(q, k, v, n, a.rep)
    print(f"{len(rows)} records in {out} ({time.monotonic() - t_start:.0f} s)")


def gated_records(q, k, v, n: int, a, dev: str, out: Path, t_start: float) -> None:
    """Gated patterns end to end (gate, index builder, block kernel) and the gate module
    alone, at several block budgets; appended to OUT/gates.json (kind "gate")."""
    from attnc.codegen import dynamic as dyn
    from attnc.codegen import tune as ktune
    from attnc.codegen.gate import BlockGate
    from attnc.compiler.blockmask import Schedule, build
    from attnc.compiler.lower import lower

    import attnc

    H, G, D = q.shape[1], k.shape[1], q.shape[3]
    # A gate as train_gate makes it: 32 block-rotary dims, the model's RoPE undone (Llama's
    # default frequencies for this head dim), so its cost is timed in full.
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    gate = BlockGate(H, G, D, 64, rope=32).set_model_rope(inv).to("cuda")
    gate_recs = []
    for topk in (int(x) for x in a.gate_topk.split(",")):
        if time.monotonic() - t_start > a.budget:
            break
        bm = build(lower(attnc.loads(""), "gated", {"block": 64, "topk": topk}), n=n,
                   heads=H, schedule=Schedule(64, 64))
        try:
            fn = lambda bm=bm: dyn.dynamic_attention(q, k, v, bm, gates=gate)  # noqa: E731
            fn()
            ms = ktune._time(fn, a.rep)
            g_ms = ktune._time(lambda: gate(q[0], k[0]), a.rep)
            # The same call as one CUDA graph (codegen.dynamic.Graphed): without the host's
            # launch work, which dominates at these sizes.
            gr = dyn.Graphed(q, k, v, bm, gates=gate)
            graph_ms = ktune._time(gr, a.rep)
            ix = dyn.build_index(q[0], k[0], bm, gates=gate)
            kept = int(ix.of("gate").sum())  # gate-selected blocks (own blocks aside)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"gated topk={topk} n={n}: failed: {e!s:.200}")
            continue
        nb = -(-n // 64)
        causal_blocks = H * nb * (nb + 1) // 2
        gate_recs.append({"kind": "gate", "n": n, "heads": H, "kv_heads": G,
                          "head_dim": D, "dtype": a.dtype, "device": dev, "block": 64,
                          "topk": topk, "kept_blocks": kept,
                          "causal_blocks": causal_blocks, "ms": graph_ms, "eager_ms": ms,
                          "gate_eager_ms": g_ms,
                          "torch": torch.__version__})
        print(f"gated(block = 64, topk = {topk}) n={n}: graphed {graph_ms:.4f} ms, eager "
              f"{ms:.4f} ms (gate module {g_ms:.4f} ms), kept blocks {kept} of "
              f"{causal_blocks}", flush=True)
    _replace_records(out / "gates.json", gate_recs, n, dev)


def dynamic_records(q, k, v, n: int, a, dev: str, out: Path, t_start: float) -> None:
    """The dynamic candidates of the grid (vertical-slash, block top-k) end to end: index
    builder and kernel replayed as one CUDA graph (codegen.dynamic.Graphed), with the pairs
    they keep on these inputs counted by autotune.dynamic; appended to OUT/dynamic.json
    (kind "dynamic")."""
    import numpy as np
    from attnc.autotune import dynamic as adyn
    from attnc.autotune.candidates import GRIDS, grid, valid_at
    from attnc.codegen import dynamic as dyn
    from attnc.codegen import tune as ktune
    from attnc.compiler.blockmask import Schedule, build

    H, G, D = q.shape[1], k.shape[1], q.shape[3]
    sel = adyn.Selection(q[0].float().cpu(), k[0].float().cpu(), D ** -0.5)
    recs = []
    for c in grid(list(GRIDS)):
        if not c.dynamic or not valid_at(c, n) or time.monotonic() - t_start > a.budget:
            continue
        ir = c.ir()
        bm = build(ir, n=n, heads=H, schedule=Schedule(64, 64))
        try:
            eager = ktune._time(lambda bm=bm: dyn.dynamic_attention(q, k, v, bm), a.rep)
            graph_ms = ktune._time(dyn.Graphed(q, k, v, bm), a.rep)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{c} n={n}: failed: {e!s:.200}")
            continue
        kept = float(np.sum([adyn.pair_density(ir, sel, h) for h in range(H)])) \
            * n * (n + 1) / 2
        recs.append({"kind": "dynamic", "family": c.family, "pattern": c.call_text(), "n": n,
                     "heads": H, "kv_heads": G, "head_dim": D, "dtype": a.dtype, "device": dev,
                     "kept_pairs": kept, "causal_pairs": H * n * (n + 1) / 2, "ms": graph_ms,
                     "eager_ms": eager, "torch": torch.__version__})
        print(f"{c!s:<58} n={n:<6} graphed {graph_ms:.4f} ms, eager {eager:.4f} ms, density "
              f"{kept / (H * n * (n + 1) / 2):.3f}", flush=True)
    _replace_records(out / "dynamic.json", recs, n, dev)


def _replace_records(path: Path, recs: list[dict], n: int, dev: str) -> None:
    """Write recs into the JSON list at path in place of its records of (n, device)."""
    if not recs:
        return
    from attnc import atomic

    old = json.loads(path.read_text()) if path.exists() else []
    old = [r for r in old if not (r["n"] == n and r["device"] == dev)]
    atomic.write_text(path, json.dumps(old + recs, indent=1) + "\n")


def plan_kernel(q, k, v, n: int, rep: float) -> None:
    """One plan kernel: three patterns over the KV heads of one layer (and their query heads)
    in one launch, against each pattern launched on its own heads."""
    from attnc.codegen import kernel
    from attnc.codegen import tune as ktune
    from attnc.compiler.blockmask import build
    from attnc.compiler.lower import lower

    import attnc

    H, G = q.shape[1], k.shape[1]
    try:
        lib = attnc.loads("")
        irs3 = [lower(lib, "causal", {}), lower(lib, "streaming", {"window": n // 8}),
                lower(lib, "a_shape", {"local": n // 16})]
        group = H // G
        irs = [irs3[(h // group) % 3] for h in range(H)]
        pm = kernel.heads_kernel(irs, n=n)
        t_plan = ktune._time(lambda: kernel.attention(q, k, v, pm), rep)
        t_apart = 0.0
        for j, ir in enumerate(irs3):
            kvs = [g for g in range(G) if g % 3 == j]
            if not kvs:
                continue
            qs = [h for g in kvs for h in range(g * group, (g + 1) * group)]
            qj = q[:, qs].contiguous()
            kj, vj = k[:, kvs].contiguous(), v[:, kvs].contiguous()
            bm1 = build(ir, n=n, heads=len(qs))
            t_apart += ktune._time(lambda bm1=bm1, qj=qj, kj=kj, vj=vj:
                                   kernel.attention(qj, kj, vj, bm1), rep)
        print(f"plan kernel (causal / streaming / a_shape by KV head, {H} heads) n={n}: "
              f"{t_plan:.4f} ms in one launch; {t_apart:.4f} ms as three launches",
              flush=True)
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"plan kernel n={n}: failed: {e!s:.200}")


if __name__ == "__main__":
    main()
