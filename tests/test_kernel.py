"""Generated forward kernels against a float64 dense masked reference (TRITON_INTERPRET=1 on the
CPU; the same tests run on a GPU where one is present).

Error bound: relative (Frobenius) error no more than 2x that of the same computation in the
input precision through PyTorch (plus a small floor for float32), never NaN; rows that keep
nothing give output 0 and LSE -inf; outputs are poisoned with NaN before each run.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from attnc.compiler.blockmask import Schedule, build
from attnc.compiler.lower import lower

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


def _ref(q, k, v, mask, bias, scale, dtype):
    """Dense masked attention in float64 (the truth) and in `dtype` (what PyTorch gets)."""
    H, Hkv = q.shape[1], k.shape[1]
    out = []
    for dt in (torch.float64, dtype):
        kk = k.repeat_interleave(H // Hkv, 1).to(dt)
        vv = v.repeat_interleave(H // Hkv, 1).to(dt)
        s = (q.to(dt) @ kk.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias.to(dt)
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s.double(), -1)
        p = torch.softmax(s.float() if dt != torch.float64 else s, -1).nan_to_num(0.0).to(dt)
        out.append(((p @ vv).double(), lse))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_forward_matches_reference(case, dtype):
    name, args, n, q_len, H, Hkv, D, BM, BN = case
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}-{dtype}".encode()))
    q = torch.randn(2, H, q_len, D, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(2, Hkv, n, D, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(2, Hkv, n, D, generator=g).to(dtype).to(DEVICE)
    bm = build(lower(LIB, name, args), n=n, heads=H, q_len=q_len, schedule=Schedule(BM, BN))
    res = kernel.attention(q, k, v, bm, poison=True)
    ev = reference.evaluate(LIB, name, n=n, heads=H, q_len=q_len, args=args)
    (o64, lse64), (o_dt, _) = _ref(q.cpu(), k.cpu(), v.cpu(), ev.mask, ev.bias, D**-0.5, dtype)
    out = res.out.cpu().double()
    assert not torch.isnan(out).any() and not torch.isnan(res.lse).any()
    # Relative Frobenius error (a max over a few elements is dominated by one rounding).
    scale = o64.norm().item() or 1.0
    ours = (out - o64).norm().item() / scale
    torch_err = (o_dt - o64).norm().item() / scale
    floor = 1e-6 if dtype == torch.float32 else 0.0
    assert ours <= 2 * torch_err + floor, f"error {ours:.3e} vs PyTorch {torch_err:.3e}"
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
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}-{arithmetic}".encode()))
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
    assert err < 1e-5, err
