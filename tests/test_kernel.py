"""Generated forward kernels against a float64 dense masked reference (TRITON_INTERPRET=1 on the
CPU; the same tests run on a GPU where one is present).

Error bound: relative (Frobenius) error no more than 2x that of the same computation in the
input precision through PyTorch (plus a small floor for float32), never NaN; rows that keep
nothing give output 0 and LSE -inf; outputs are poisoned with NaN before each run.
"""

from __future__ import annotations

import os

import pytest
import torch
from attnc.compiler.blockmask import Schedule, build
from attnc.compiler.lower import lower
from conftest import assert_within_torch_error
from conftest import masked_reference as _ref

import attnc
from attnc import reference

os.environ.setdefault("TRITON_INTERPRET", "1")
kernel = pytest.importorskip("attnc.codegen.kernel")

LIB = attnc.loads("")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" \
    else "cpu"

# (pattern, args, n, q_len, H, Hkv, D, block_m, block_n): odd lengths, q_len < n, GQA.
CASES = [
    ("causal", {}, 45, 45, 2, 1, 16, 16, 16),
    ("streaming", {"sink": 3, "window": 20}, 77, 77, 4, 2, 16, 16, 16),
    ("a_shape", {"sink": 5, "local": 17}, 70, 33, 2, 2, 16, 16, 32),
    ("window", {"size": 9}, 50, 50, 2, 1, 16, 32, 16),
    ("band", {"before": 6, "after": 4}, 40, 40, 1, 1, 16, 16, 16),
    ("sink", {"size": 4}, 40, 40, 1, 1, 16, 16, 16),
    ("dilated", {"window": 5, "dilation": 3}, 70, 50, 2, 1, 32, 16, 32),
    ("shards", {"stride": 3, "block": 8, "local": 10}, 64, 64, 3, 3, 16, 16, 16),
    ("radial", {"block": 8, "dense": 2}, 90, 90, 2, 2, 16, 32, 16),
    ("power", {"block": 8}, 70, 70, 1, 1, 16, 16, 16),
    ("fixed_documents", {"length": 20}, 60, 60, 2, 1, 16, 16, 16),
    ("prefix_lm", {"prefix": 13}, 50, 50, 1, 1, 16, 16, 16),
    ("dense", {}, 33, 20, 2, 2, 16, 16, 16),
    ("alibi", {"heads": 4}, 40, 40, 4, 4, 16, 16, 16),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _fresh_seed() -> int:
    """Fresh random inputs for every check (the seed is in the failure message)."""
    return int.from_bytes(os.urandom(4), "little")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_forward_matches_reference(case, dtype):
    _check_case(case, dtype)


# Launch options that change the code: TMA descriptors for K and V (1) or Q, K, V and O (2),
# and the one-loop schedule (full and partial blocks in one loop), with and without TMA. Same
# results as the default, with index lists and arithmetic ranges, partial last blocks
# (zero-filled copies), GQA, q_len < n.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in (
    "streaming", "a_shape", "shards", "radial", "alibi", "dense")], ids=lambda c: c[0])
@pytest.mark.parametrize(("tma", "one_loop"), [(1, False), (2, False), (1, True), (0, True)],
                         ids=["tma-kv", "tma-qkvo", "tma-one-loop", "one-loop"])
def test_launch_options_match_reference(case, dtype, tma, one_loop):
    _check_case(case, dtype, kernel.Config(4, 2, tma=tma, one_loop=one_loop))


def test_tma_refuses_layouts():
    from attnc.compiler import layout as L

    pat = lower(LIB, "dilated", {"window": 5, "dilation": 3})
    lay = next(c for c in L.candidates(pat.mask, 70, 16, 16) if c.kind == "diagonal")
    bm = build(pat, n=70, heads=2, schedule=Schedule(16, 16), layout=lay)
    q, k, v = (torch.randn(1, 2, 70, 16, device=DEVICE) for _ in range(3))
    with pytest.raises(ValueError, match="natural layout"):
        kernel.attention(q, k, v, bm, config=kernel.Config(4, 2, tma=1))


def test_bad_launches_say_what_is_wrong():
    """Shapes, dtypes and tile sizes the kernel cannot run are named before any launch (not a
    Triton error from inside the kernel, nor a silent result from mixed dtypes)."""
    bm = build(lower(LIB, "causal", {}), n=40, heads=4, schedule=Schedule(16, 16))
    q, k, v = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        kernel.launch_args(q[:, :3], k, v, bm)
    with pytest.raises(ValueError, match="one dtype"):
        kernel.launch_args(q.half(), k, v, bm)
    with pytest.raises(ValueError, match="one dtype"):
        kernel.launch_args(q.long(), k.long(), v.long(), bm)
    with pytest.raises(ValueError, match="head dim 24 .* power of two"):
        kernel.launch_args(*(torch.randn(1, h, 40, 24) for h in (4, 2, 2)), bm)
    odd = build(lower(LIB, "causal", {}), n=40, heads=4, schedule=Schedule(24, 16))
    with pytest.raises(ValueError, match="block_m 24 .* power of two"):
        kernel.launch_args(q, k, v, odd)


def test_float_power_of_a_negative_base_matches_reference():
    """float ** in a bias: a negative base with an integral exponent is not NaN (torch.pow)."""
    prog = attnc.loads("pattern p {\n    mask window(6)\n"
                       "    bias 0.1 * float(k - q) ** 2.0 - 0.01 * float(k - q) ** 3.0 "
                       "+ float(q - k) ** 0.5 + float(k - q) ** 0.0\n}\n")
    n, H, D = 30, 2, 16
    bm = build(lower(prog, "p", {}), n=n, heads=H, schedule=Schedule(16, 16))
    q, k, v = (torch.randn(1, H, n, D, device=DEVICE) for _ in range(3))
    out = kernel.attention(q, k, v, bm).out.cpu().double()
    ev = reference.evaluate(prog, "p", n=n, heads=H)
    (o64, _), _ = _ref(q.cpu(), k.cpu(), v.cpu(), ev.mask, ev.bias, D**-0.5, torch.float32)
    assert torch.allclose(out, o64, atol=1e-5), (out - o64).abs().max()


def test_plan_layer_checks_elastic_arguments_at_n():
    """A plan argument out of its range at this n is an error, as in the reference and the CLI,
    not a kernel for an empty window."""
    prog = attnc.loads("plan p(layers = 1, heads = 2) {\n"
                       "    default: window(size = n // 200)\n}\n")
    assert kernel.plan_layer(prog.plan("p"), 0, n=400) is not None
    with pytest.raises(attnc.AttncError, match="'size' of 'window' is 0 at n = 100"):
        kernel.plan_layer(prog.plan("p"), 0, n=100)


def _check_case(case, dtype, config=None):
    name, args, n, q_len, H, Hkv, D, BM, BN = case
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, q_len, D, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(2, Hkv, n, D, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(2, Hkv, n, D, generator=g).to(dtype).to(DEVICE)
    bm = build(lower(LIB, name, args), n=n, heads=H, q_len=q_len, schedule=Schedule(BM, BN))
    res = kernel.attention(q, k, v, bm, poison=True, config=config)
    ev = reference.evaluate(LIB, name, n=n, heads=H, q_len=q_len, args=args)
    (o64, lse64), (o_dt, _) = _ref(q.cpu(), k.cpu(), v.cpu(), ev.mask, ev.bias, D**-0.5, dtype)
    out = res.out.cpu().double()
    assert not torch.isnan(out).any() and not torch.isnan(res.lse).any()
    # Relative Frobenius error (a max over a few elements is dominated by one rounding).
    assert_within_torch_error(out, o64, o_dt, dtype, f"(seed {seed})")
    empty = ~ev.mask.any(-1)  # [H, q_len]
    lse = res.lse.cpu().double()
    assert torch.isinf(lse[:, empty]).all() and (lse[:, empty] < 0).all()
    assert (out[:, empty] == 0).all()
    ok = ~empty.expand_as(lse)
    assert torch.allclose(lse[ok], lse64[ok], atol=2e-3, rtol=1e-3)


def test_rows_with_nothing_kept_give_zero_and_minus_inf():
    n, H, D = 40, 2, 16
    bm = build(lower(LIB, "sink", {"size": 0}), n=n, heads=H, schedule=Schedule(16, 16))
    q, k, v = (torch.randn(1, H, n, D, device=DEVICE) for _ in range(3))
    res = kernel.attention(q, k, v, bm, poison=True)
    assert (res.out == 0).all()
    assert torch.isinf(res.lse).all() and (res.lse < 0).all()


def test_generated_source_is_deterministic_and_parses():
    import ast

    bm = build(lower(LIB, "streaming", {"sink": 4, "window": 64}), n=256, heads=2)
    a = kernel.kernel_source(bm)
    b = kernel.kernel_source(build(lower(LIB, "streaming", {"sink": 4, "window": 64}), n=256,
                                   heads=2))
    assert a == b
    ast.parse(a)
    assert a.startswith('"""attnc generated kernel. pattern: streaming; key ')


@pytest.mark.parametrize("arithmetic", [True, False], ids=["ranges", "index-lists"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in (
    "causal", "streaming", "a_shape", "window", "band", "sink", "fixed_documents", "prefix_lm",
    "dense", "alibi")], ids=lambda c: c[0])
def test_arithmetic_ranges_and_index_lists_agree(case, arithmetic):
    """Both schedules of the same kernel give the reference result (float32)."""
    name, args, n, q_len, H, Hkv, D, BM, BN = case
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, q_len, D, generator=g).to(DEVICE)
    k = torch.randn(1, Hkv, n, D, generator=g).to(DEVICE)
    v = torch.randn(1, Hkv, n, D, generator=g).to(DEVICE)
    bm = build(lower(LIB, name, args), n=n, heads=H, q_len=q_len, schedule=Schedule(BM, BN))
    src = kernel.kernel_source(bm, arithmetic)
    assert ("schedule: arithmetic ranges" in src) == arithmetic
    assert ("KV_IDX + " in src) != arithmetic  # no index loads with arithmetic ranges
    res = kernel.attention(q, k, v, bm, poison=True, arithmetic=arithmetic)
    ev = reference.evaluate(LIB, name, n=n, heads=H, q_len=q_len, args=args)
    (o64, _), _ = _ref(q.cpu(), k.cpu(), v.cpu(), ev.mask, ev.bias, D**-0.5, torch.float32)
    err = (res.out.cpu().double() - o64).norm().item() / (o64.norm().item() or 1.0)
    assert err < 1e-5, f"{err} (seed {seed})"


# Permuted layouts (dilated: diagonal; shards: key classes) and strided / per-head arithmetic
# ranges, against the reference, in float32 and bf16.
LAYOUT_CASES = [
    ("dilated", {"window": 5, "dilation": 3}, 70, 2, 1, 32, 16, 16, "diagonal"),
    ("dilated", {"window": 4, "dilation": 4}, 99, 2, 2, 16, 32, 16, "diagonal"),
    ("shards", {"stride": 3, "block": 16, "local": 10}, 100, 3, 1, 16, 16, 16, "key_classes"),
    ("shards", {"stride": 3, "block": 8, "local": 10}, 77, 3, 3, 16, 16, 32, "key_classes"),
]


def _check(q, k, v, res, name, args, n, q_len, H, dtype, seed):
    ev = reference.evaluate(LIB, name, n=n, heads=H, q_len=q_len, args=args)
    (o64, lse64), (o_dt, _) = _ref(q.cpu(), k.cpu(), v.cpu(), ev.mask, ev.bias,
                                   q.shape[-1] ** -0.5, dtype)
    out = res.out.cpu().double()
    assert not torch.isnan(out).any() and not torch.isnan(res.lse).any(), f"seed {seed}"
    assert_within_torch_error(out, o64, o_dt, dtype, f"(seed {seed})")
    ok = ev.mask.any(-1).expand_as(res.lse)
    assert torch.allclose(res.lse.cpu().double()[ok], lse64[ok], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: f"{c[0]}-{c[-1]}-{c[2]}")
def test_permuted_layouts(case, dtype):
    from attnc.compiler import layout as L

    name, args, n, H, Hkv, D, BM, BN, kind = case
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    q_len = n if kind == "diagonal" else n - 7
    pat = lower(LIB, name, args)
    lay = next(c for c in L.candidates(pat.mask, n, BM, BN) if c.kind == kind)
    bm = build(pat, n=n, heads=H, q_len=q_len, schedule=Schedule(BM, BN), layout=lay)
    q = torch.randn(1, H, q_len, D, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(1, Hkv, n, D, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(1, Hkv, n, D, generator=g).to(dtype).to(DEVICE)
    res = kernel.attention(q, k, v, bm, poison=True)
    _check(q, k, v, res, name, args, n, q_len, H, dtype, seed)


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("one_loop", [False, True], ids=["two-loops", "one-loop"])
def test_strided_per_head_rules_run_as_ranges(block, one_loop):
    """shards: a strided rule whose residue depends on h, computed in the kernel per head;
    block 16 joins the merged loops, block 32 (two key blocks per pattern block) runs nested
    loops after them."""
    name, args = "shards", {"stride": 3, "step": 1, "block": block, "local": 10}
    n, H, D = 90, 3, 16
    bm = build(lower(LIB, name, args), n=n, heads=H, schedule=Schedule(16, 16))
    assert len(bm.classes) == 3  # one class per residue, one kernel for all of them
    src = kernel.kernel_source(bm)
    assert "schedule: arithmetic ranges" in src and "KV_IDX + " not in src
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, n, D, generator=g).to(DEVICE) for _ in range(3))
    res = kernel.attention(q, k, v, bm, poison=True, config=kernel.Config(one_loop=one_loop))
    _check(q, k, v, res, name, args, n, n, H, torch.float32, seed)


def test_int32_predicates_only_where_values_fit():
    lib = attnc.loads("pattern p() { mask q * k < 5 }")
    assert kernel.fits_int32(build(lower(lib, "p", {}), n=1000))
    assert not kernel.fits_int32(build(lower(lib, "p", {}), n=100_000))
    assert kernel.fits_int32(build(lower(LIB, "radial", {}), n=1 << 20, heads=16))


PLAN = """
plan mixed(layers = 2, heads = 6, kv_heads = 3) {
    layers 0 kv_heads 0: streaming(sink = 3, window = 20)
    layers 0 heads 2: radial(block = 8, dense = 2)
    layers 0 heads 3: shards(stride = 3, block = 16, local = 10)
    layers 0 heads 4: alibi(heads = 6)
    default: causal
}
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", [None, kernel.Config(4, 2, tma=1, one_loop=True)],
                         ids=["default", "tma-one-loop"])
def test_plan_layer_runs_in_one_launch(dtype, config):
    """Heads of one layer with different patterns (bias included, GQA, q_len < n): one kernel,
    each head against the reference of its own pattern."""
    prog = attnc.loads(PLAN)
    plan = prog.plan("mixed")
    n, q_len, D = 83, 70, 16
    pm = kernel.plan_layer(plan, 0, n=n, q_len=q_len, schedule=Schedule(16, 16))
    assert isinstance(pm, kernel.PlanMask) and len(pm.variants) == 5
    src = kernel.kernel_source(pm)
    assert src.count("def attnc_block_") == 5 and "pat = tl.load(PAT + h)" in src
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 6, q_len, D, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(2, 3, n, D, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(2, 3, n, D, generator=g).to(dtype).to(DEVICE)
    res = kernel.attention(q, k, v, pm, poison=True, config=config)
    ev = reference.evaluate_plan(plan, layer=0, n=n, q_len=q_len)
    (o64, lse64), (o_dt, _) = _ref(q.cpu(), k.cpu(), v.cpu(), ev.mask, ev.bias, D ** -0.5, dtype)
    out = res.out.cpu().double()
    assert not torch.isnan(out).any() and not torch.isnan(res.lse).any()
    for h in range(6):
        assert_within_torch_error(out[:, h], o64[:, h], o_dt[:, h], dtype,
                                  f"(head {h}, seed {seed})")
    # A layer with one pattern is a plain kernel.
    assert not isinstance(kernel.plan_layer(plan, 1, n=n), kernel.PlanMask)


@pytest.mark.parametrize("D", [64, 128])
def test_head_dims_64_and_128(D):
    name, args, n, H, Hkv = "streaming", {"sink": 3, "window": 20}, 45, 2, 1
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, n, D, generator=g).to(torch.bfloat16).to(DEVICE)
    k = torch.randn(1, Hkv, n, D, generator=g).to(torch.bfloat16).to(DEVICE)
    v = torch.randn(1, Hkv, n, D, generator=g).to(torch.bfloat16).to(DEVICE)
    bm = build(lower(LIB, name, args), n=n, heads=H, schedule=Schedule(16, 16))
    res = kernel.attention(q, k, v, bm, poison=True)
    _check(q, k, v, res, name, args, n, n, H, torch.bfloat16, seed)


@pytest.mark.gpu
def test_offsets_beyond_int32():
    """B * H * n * D > 2**31 elements: every offset must be 64-bit (n = 1M, 16 heads)."""
    if DEVICE != "cuda":
        pytest.skip("needs a GPU (4 GiB per tensor)")
    n, H, D = 1 << 20, 16, 128
    q = torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    bm = build(lower(LIB, "window", {"size": 64}), n=n, heads=H)
    res = kernel.attention(q, k, v, bm)
    # Check the last head's last rows (the largest offsets) against dense attention there.
    rows = torch.arange(n - 64, n, device="cuda")
    qq, kk, vv = q[0, -1, rows].float(), k[0, -1, n - 127:].float(), v[0, -1, n - 127:].float()
    s = (qq @ kk.T) * D ** -0.5
    pos = torch.arange(n - 127, n, device="cuda")
    d = rows[:, None] - pos[None, :]
    s = s.masked_fill(~((d >= 0) & (d < 64)), float("-inf"))
    ref = torch.softmax(s, -1) @ vv
    err = (res.out[0, -1, rows].float() - ref).norm() / ref.norm()
    assert err < 2e-2, err
    assert torch.isfinite(res.lse).all()


@pytest.mark.parametrize("arithmetic", [True, False], ids=["ranges", "index-lists"])
@pytest.mark.parametrize(("name", "args"), [
    ("streaming", {"sink": 3, "window": 20}),
    ("a_shape", {"sink": 5, "local": 17}),
    ("shards", {"stride": 3, "block": 16, "local": 10}),
    ("radial", {"block": 16, "dense": 1}),
    ("band", {"before": 6, "after": 4}),
])
def test_empty_blocks_are_never_touched(name, args, arithmetic):
    """One query block (the last rows): K and V are NaN in every key block its block mask does
    not visit, so touching any of them would poison the output."""
    n, H, D, B = 150, 2, 16, 16
    bm = build(lower(LIB, name, args), n=n, heads=H, q_len=B, schedule=Schedule(B, B))
    if arithmetic and kernel.arithmetic_rules(bm) is None:
        pytest.skip("this pattern runs on index lists")
    csr = bm.materialize()
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, B, D, generator=g)
    k = torch.randn(1, H, n, D, generator=g)
    v = torch.randn(1, H, n, D, generator=g)
    visited = set()
    for h in range(H):
        hh = h if csr.kv_num_blocks.shape[0] > 1 else 0
        visited |= set(csr.kv_indices[hh, 0, : csr.kv_num_blocks[hh, 0]].tolist())
        visited |= set(csr.full_kv_indices[hh, 0, : csr.full_kv_num_blocks[hh, 0]].tolist())
    empty = [kb for kb in range(-(-n // B)) if kb not in visited]
    assert empty, "the case must leave some key block empty"
    for kb in empty:
        k[:, :, kb * B:(kb + 1) * B] = float("nan")
        v[:, :, kb * B:(kb + 1) * B] = float("nan")
    res = kernel.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), bm, poison=True,
                           arithmetic=arithmetic)
    assert torch.isfinite(res.out).all(), f"an empty key block was read (seed {seed})"
    ev = reference.evaluate(LIB, name, n=n, heads=H, q_len=B, args=args)
    kk, vv = k.nan_to_num(0.0).double(), v.nan_to_num(0.0).double()
    s = (q.double() @ kk.transpose(-1, -2)) * D ** -0.5
    o64 = torch.softmax(s.masked_fill(~ev.mask, float("-inf")), -1).nan_to_num(0.0) @ vv
    err = (res.out.cpu().double() - o64).norm() / o64.norm()
    assert err < 1e-5, f"{err} (seed {seed})"
