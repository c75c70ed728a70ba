"""The warp-specialised Hopper kernel (codegen.hopper, Gluon): generated source, what it refuses,
an sm_90 build on any machine, and (on a Hopper GPU) numerics against the float64 reference.

Gluon is never interpreted, so the numerical tests need an sm_90 GPU; the build test compiles
the generated kernel to an sm_90 binary on the CPU (Triton needs no GPU to compile).
"""

from __future__ import annotations

import ast
import os

import pytest
import torch
from attnc.compiler.blockmask import Schedule, build
from attnc.compiler.lower import lower
from conftest import assert_within_torch_error, masked_reference

import attnc
from attnc import reference

kernel = pytest.importorskip("attnc.codegen.kernel")
hopper = pytest.importorskip("attnc.codegen.hopper")

LIB = attnc.loads("")
BIG = Schedule(128, 128)


def _hopper_gpu() -> bool:
    return (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability()[0] == 9)


def _bm(name, args, n=1000, heads=4, q_len=None, schedule=BIG):
    return build(lower(LIB, name, args), n=n, heads=heads, q_len=q_len or n, schedule=schedule)


def test_source_is_deterministic_parses_and_names_its_origin():
    a = hopper.kernel_source(_bm("streaming", {"sink": 64, "window": 512}), source="x.attn")
    b = hopper.kernel_source(_bm("streaming", {"sink": 64, "window": 512}), source="x.attn")
    assert a == b
    ast.parse(a)
    assert a.startswith('"""attnc generated kernel (Gluon, warp-specialised, sm_90). pattern: '
                        "streaming; key ")
    assert "source: x.attn" in a
    # The predicate and the bias are the pattern's, inlined.
    assert "BIASED = gl.constexpr(False)" in a
    alibi = hopper.kernel_source(_bm("alibi", {"heads": 4}))
    assert "BIASED = gl.constexpr(True)" in alibi and "LOG2E" in alibi


@pytest.mark.parametrize(("name", "args", "dtype", "D", "schedule", "why"), [
    ("streaming", {}, torch.float32, 128, BIG, "float16 and bfloat16"),
    ("streaming", {}, torch.bfloat16, 256, BIG, "head dims 64 and 128"),
    ("streaming", {}, torch.bfloat16, 128, Schedule(64, 64), "128-row query blocks"),
    ("radial", {"block": 128, "dense": 2}, torch.bfloat16, 128, BIG, "index lists"),
    ("dilated", {"window": 64, "dilation": 4}, torch.bfloat16, 128, BIG, "index lists"),
])
def test_unsupported_launches_say_why(name, args, dtype, D, schedule, why):
    bm = _bm(name, args, n=2048, schedule=schedule)
    assert why in hopper.supported(bm, dtype, D)
    if dtype == torch.bfloat16 and D == 128:
        with pytest.raises(ValueError, match="does not run"):
            hopper.kernel_source(bm)


def test_tritons_before_3_6_are_refused(monkeypatch):
    import triton

    bm = _bm("causal", {}, n=1024)
    if hopper.supported(bm, torch.bfloat16, 128) is not None:
        pytest.skip(f"this Triton ({triton.__version__}) is refused already")
    monkeypatch.setattr(triton, "__version__", "3.5.1")
    assert "Triton 3.6 or newer" in hopper.supported(bm, torch.bfloat16, 128)


def test_bad_ws_launches_are_refused_before_compiling():
    bm = _bm("causal", {}, n=256)
    q = torch.zeros(1, 4, 256, 128, dtype=torch.bfloat16)
    for cfg, msg in [(kernel.Config(4, 2, ws=1), "TRITON_INTERPRET|CUDA"),
                     (kernel.Config(8, 2, ws=1), "num_warps 4|TRITON_INTERPRET|CUDA")]:
        with pytest.raises(ValueError, match=msg):
            kernel.attention(q, q, q, bm, config=cfg)
    with pytest.raises(ValueError, match="num_warps 4"):
        kernel.launch_args(q, q, q, bm, config=kernel.Config(8, 2, ws=1))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernel.launch_args(q, q, q, bm, config=kernel.Config(4, 2, ws=1), interpret=True)


def test_candidates_and_labels():
    from attnc.codegen import tune

    assert tune.parse_candidate("128x128x4x2+ws") == (128, 128, 4, 2, 0, False, 1)
    assert tune.parse_candidate("128x128x4x3+wspp") == (128, 128, 4, 3, 0, False, 2)
    assert tune._trial((128, 128, 4, 2, 0, False, 2)).label() == "128x128/w4/s2/wspp"
    assert kernel.Config(4, 2, ws=1).text() == "(launch :num_warps 4 :num_stages 2 :ws 1)"
    with pytest.raises(ValueError):
        tune.parse_candidate("128x128x4x2+ws+wspp")


BUILD = """
import json, sys, torch
import attnc
from attnc.codegen import hopper
from attnc.compiler.blockmask import Schedule, build
from attnc.compiler.lower import lower
name, args, D, dtype = json.loads(sys.argv[1])
bm = build(lower(attnc.loads(""), name, args), n=32768, heads=16, schedule=Schedule(128, 128))
asm = hopper.compile_here(bm, D, getattr(torch, dtype), stages=2, pingpong=True)
ptx = asm["ptx"]
print(json.dumps({"wgmma": "wgmma.mma_async" in ptx, "tma": "cp.async.bulk.tensor" in ptx,
                  "mbarrier": "mbarrier.try_wait" in ptx, "setmaxnreg": "setmaxnreg" in ptx,
                  "elf": asm["cubin"][:4] == b"\\x7fELF"}))
"""


@pytest.mark.parametrize(("name", "args", "D", "dtype"), [
    ("streaming", {"sink": 64, "window": 4096}, 128, "bfloat16"),
    ("shards", {"stride": 8, "step": 1, "block": 128, "local": 1024}, 128, "float16"),
    ("alibi", {"heads": 16}, 64, "bfloat16"),
])
def test_builds_for_sm90_without_a_gpu(name, args, D, dtype):
    """The whole Gluon pipeline down to an sm_90 cubin: warpgroup MMAs, TMA, mbarriers (in a
    child process: Gluon's library must be imported without TRITON_INTERPRET)."""
    import json
    import subprocess
    import sys

    from attnc.settings import subprocess_env

    pytest.importorskip("triton.experimental.gluon")
    r = subprocess.run([sys.executable, "-c", BUILD, json.dumps([name, args, D, dtype])],
                       capture_output=True, text=True, env=subprocess_env(interpret=False),
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"wgmma": True, "tma": True, "mbarrier": True, "setmaxnreg": True,
                   "elf": True}


# ---------------------------------------------------------------- numerics (Hopper GPU)

# (pattern, args, n, q_len, H, Hkv): lengths that are not block multiples, q_len < n, GQA,
# rows that keep nothing (sink of size 0), a bias, strided pieces.
GPU_CASES = [
    ("causal", {}, 1000, 1000, 4, 2),
    ("streaming", {"sink": 5, "window": 300}, 1000, 1000, 4, 1),
    ("a_shape", {"sink": 64, "local": 200}, 1100, 333, 4, 4),
    ("window", {"size": 129}, 777, 777, 2, 1),
    ("shards", {"stride": 3, "step": 1, "block": 128, "local": 100}, 1200, 1200, 6, 3),
    ("dense", {}, 700, 300, 2, 2),
    ("alibi", {"heads": 4}, 600, 600, 4, 4),
    ("fixed_documents", {"length": 200}, 900, 900, 2, 1),
    ("prefix_lm", {"prefix": 130}, 500, 500, 2, 2),
    ("lagged", {"lag": 300, "width": 200}, 1000, 1000, 2, 1),
]
# A pattern of the user's (not in the library) whose first 300 rows keep nothing.
USER = attnc.loads("""
pattern lagged(lag: int in 0.. = 300, width: int in 1.. = 100) {
    mask q - k >= lag & q - k < lag + width
}
""")


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "D", "ws", "BN"), [
    (torch.bfloat16, 128, 1, 128), (torch.bfloat16, 128, 2, 128), (torch.float16, 64, 1, 128),
    (torch.bfloat16, 64, 2, 128), (torch.bfloat16, 128, 1, 64), (torch.float16, 64, 2, 64)],
    ids=["bf16-128", "bf16-128-pingpong", "fp16-64", "bf16-64-pp", "bf16-128-bn64",
         "fp16-64-bn64-pp"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c[0])
def test_matches_reference_on_hopper(case, dtype, D, ws, BN):
    if not _hopper_gpu():
        pytest.skip("needs an sm_90 GPU (Gluon's warpgroup kernels are not interpreted)")
    name, args, n, q_len, H, Hkv = case
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, q_len, D, generator=g).to(dtype)
    k = torch.randn(2, Hkv, n, D, generator=g).to(dtype)
    v = torch.randn(2, Hkv, n, D, generator=g).to(dtype)
    lib = USER if name == "lagged" else LIB
    bm = build(lower(lib, name, args), n=n, heads=H, q_len=q_len, schedule=Schedule(128, BN))
    stages = 3 if D == 64 else 2
    if name == "shards" and BN == 64:
        # 128-key pattern blocks over 64-key blocks need nested loops: refused, with the reason.
        with pytest.raises(ValueError, match="nested loops"):
            kernel.attention(q.cuda(), k.cuda(), v.cuda(), bm, config=kernel.Config(4, 2, ws=ws))
        return
    res = kernel.attention(q.cuda(), k.cuda(), v.cuda(), bm, poison=True,
                           config=kernel.Config(4, stages, ws=ws))
    ev = reference.evaluate(lib, name, n=n, heads=H, q_len=q_len, args=args)
    (o64, lse64), (o_dt, _) = masked_reference(q, k, v, ev.mask, ev.bias, D**-0.5, dtype)
    out = res.out.cpu().double()
    assert not torch.isnan(out).any() and not torch.isnan(res.lse).any(), f"seed {seed}"
    assert_within_torch_error(out, o64, o_dt, dtype, f"(seed {seed})")
    empty = ~ev.mask.any(-1)
    lse = res.lse.cpu().double()
    assert torch.isinf(lse[:, empty]).all() and (lse[:, empty] < 0).all()
    assert (out[:, empty] == 0).all()
    if name == "lagged":
        assert empty.sum() == 2 * 300  # the check above is not vacuous
    ok = ~empty.expand_as(lse)
    assert torch.allclose(lse[ok], lse64[ok], atol=2e-3, rtol=1e-3), f"seed {seed}"


@pytest.mark.gpu
def test_autotune_times_the_warp_specialised_candidates():
    """On a Hopper GPU the tuner times ws candidates like any other; one that cannot run
    (a pattern it does not take) scores as infinitely slow with the reason recorded."""
    if not _hopper_gpu():
        pytest.skip("needs an sm_90 GPU")
    from attnc.codegen import tune

    q = torch.randn(1, 4, 2048, 128, device="cuda", dtype=torch.bfloat16)
    cands = [(128, 128, 8, 3, 1), (128, 128, 4, 2, 0, False, 1)]
    for name, args, ok in [("streaming", {"sink": 64, "window": 512}, True),
                           ("radial", {"block": 128, "dense": 2}, False)]:
        _, _, rec = tune.autotune(lambda s, name=name, args=args: _bm(name, args, n=2048,
                                                                      schedule=s),
                                  q, q, q, candidates=cands, use_record=False, rep_ms=5)
        ws = [t for t in rec.trials if t.ws]
        assert len(ws) == 1
        assert (ws[0].ms < float("inf")) == ok, ws[0].error
        if not ok:
            assert "index lists" in ws[0].error


@pytest.mark.gpu
def test_default_launch_takes_it_from_16k_keys_at_head_dim_128():
    if not _hopper_gpu():
        pytest.skip("needs an sm_90 GPU")
    for n, D, ws in [(16384, 128, True), (8192, 128, False), (16384, 64, False)]:
        q = torch.zeros(1, 2, n, D, device="cuda", dtype=torch.bfloat16)
        L = kernel.launch_args(q, q, q, _bm("causal", {}, n=n, heads=2))
        assert ("warp-specialised" in L.source) == ws, (n, D)
    # A base that TMA cannot address (not 16-byte aligned) gets neither TMA launch, and the
    # pointer loads read the right rows (against a float32 matmul: SDPA misreads such views).
    n, D = 16384, 128
    buf = torch.randn(2 * n * D + 1, device="cuda", dtype=torch.bfloat16)
    q = buf[1:].view(1, 2, n, D)
    bm = _bm("causal", {}, n=n, heads=2)
    L = kernel.launch_args(q, q, q, bm)
    assert "warp-specialised" not in L.source and L.kwargs["TMA"] == 0
    out = kernel.attention(q, q, q, bm).out
    rows = torch.arange(0, n, 256, device="cuda")
    s = (q[0, :, rows].float() @ q[0].float().transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(torch.arange(n, device="cuda")[None, None, :] > rows[None, :, None],
                      float("-inf"))
    ref = torch.softmax(s, -1) @ q[0].float()
    assert ((out[0, :, rows].float() - ref).norm() / ref.norm()).item() < 5e-3


def test_tma_only_for_16_byte_aligned_bases():
    buf = torch.zeros(4 * 64 + 8, dtype=torch.bfloat16)
    ok = buf[8:].view(1, 1, 4, 64)  # 16 bytes in
    bad = buf[1:257].view(1, 1, 4, 64)  # 2 bytes in
    assert kernel._tma_aligned(ok, ok, ok)
    assert not kernel._tma_aligned(ok, bad, ok)
    # A non-contiguous view is copied before the launch, and the copy is aligned.
    assert kernel._tma_aligned(buf[1:257].view(4, 64).t())
