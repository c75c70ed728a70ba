"""Shared pytest configuration: the gpu marker skips where no CUDA device is present."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch means no GPU
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The reference evaluates many small tensors: one intra-op thread is several times
    faster (much more on a busy 2-core machine). Use with pytestmark = usefixtures(...)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def masked_reference(q, k, v, mask, bias, scale, dtype):
    """Dense masked attention in float64 (the truth) and in `dtype` (what PyTorch gets): two
    (output as float64, natural-log LSE) pairs; k and v are repeated over GQA groups."""
    import torch

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


def block_truth(ref, rows: int, cols: int, bm: int, bn: int):
    """Per block of a [H, rows, cols] boolean mask: (some pair kept, some valid pair masked,
    block holds padding), each [H, QB, KB] (padding: [1, QB, KB])."""
    import numpy as np

    H = ref.shape[0]
    QB, KB = -(-rows // bm), -(-cols // bn)
    pad = np.zeros((H, QB * bm, KB * bn), dtype=bool)
    pad[:, :rows, :cols] = ref
    valid = np.zeros((QB * bm, KB * bn), dtype=bool)
    valid[:rows, :cols] = True
    r = pad.reshape(H, QB, bm, KB, bn)
    v = valid.reshape(QB, bm, KB, bn)
    kept = r.any(axis=(2, 4))
    masked = (~r & v).any(axis=(2, 4))
    padded = (~v).any(axis=(1, 3))[None]
    return kept, masked, padded


def assert_within_torch_error(out, o64, o_dt, dtype, note: str = "") -> None:
    """The kernels' accuracy bar: relative Frobenius error against the float64 truth o64 at
    most 2x that of the same computation in the input precision through PyTorch (o_dt), plus
    a small floor for float32."""
    import torch

    scale = o64.norm().item() or 1.0
    ours = (out - o64).norm().item() / scale
    torch_err = (o_dt - o64).norm().item() / scale
    floor = 1e-6 if dtype == torch.float32 else 0.0
    assert ours <= 2 * torch_err + floor, f"error {ours:.3e} vs PyTorch {torch_err:.3e} {note}"


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama (2 layers, 4 heads, 2 KV heads) for the head tuner's tests."""
    from attnc.autotune.model import tiny_llama

    return tiny_llama(layers=2, heads=4, kv_heads=2, hidden=64, vocab=256, seed=0)


@pytest.fixture(scope="module")
def ids():
    """80 random token ids for `tiny`."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (1, 80), generator=g)
