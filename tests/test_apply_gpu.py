"""attnc.apply's generated-kernel path on a CUDA device, against the reference path."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnc.autotune import apply as ap  # noqa: E402
from attnc.autotune.model import tiny_llama  # noqa: E402
from attnc.dsl.check import loads  # noqa: E402

PLAN = """
plan mixed(layers = 2, heads = 4, kv_heads = 2) {
    layers 0 kv_heads 1: shards(stride = 4, step = 1, block = 8, local = 8)
    layers 1 heads 0: dilated(window = 8, dilation = 2)
    default: streaming(sink = 4, window = 16)
}
"""


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_apply_runs_the_kernels_on_the_gpu(dtype, monkeypatch):
    """On CUDA, apply() runs each layer in one compiled kernel (no interpreter); the logits
    match the reference path's within the dtype's rounding."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny_llama(layers=2, heads=4, kv_heads=2, hidden=64, vocab=256, seed=0)
    model = model.to(device="cuda", dtype=dtype)
    plan = loads(PLAN).plan("mixed")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 203), generator=g).cuda()  # not a block multiple
    with torch.no_grad():
        ap.apply(model, plan, kernels=False)
        try:
            want = model(ids).logits.float()
        finally:
            ap.remove(model)
        pm = ap.apply(model, plan, kernels=True)
        try:
            got = model(ids).logits.float()
        finally:
            ap.remove(model)
    assert sorted(pm._launch) == [(0, 203, 203), (1, 203, 203)]  # both layers ran kernels
    assert torch.isfinite(got).all()
    tol = 1e-3 if dtype == torch.float32 else 6e-2
    assert (got - want).abs().max().item() <= tol * max(want.abs().max().item(), 1.0)
