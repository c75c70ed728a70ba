"""Dynamic selectors: device index builders against attnc.reference (same q, k; ties), block lists,
and attention through both kernels against a float64 dense masked reference (interpreter on the
CPU; the gpu-marked tests, and every test with TRITON_INTERPRET=0, on a CUDA device)."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch
from attnc.compiler.blockmask import Schedule, build
from attnc.compiler.lower import lower

import attnc
from attnc import reference

os.environ.setdefault("TRITON_INTERPRET", "1")
dyn = pytest.importorskip("attnc.codegen.dynamic")
from attnc.codegen import builders  # noqa: E402
from conftest import assert_within_torch_error, block_truth  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SRC = """
pattern vs2(v: int = 5, s: int = 7, l: int = 8, f: int = 2, near: int = 3) {
    mask causal & (k in top_columns(v, l, f) | q - k in top_diagonals(s, l, near))
}
pattern mixed(c: int = 2, b: int = 16) {
    mask causal & (top_blocks(c, b) | k in top_columns(3, 8, 1) | q - k < 4)
}
pattern cols_only(v: int = 5, l: int = 8, f: int = 2) { mask k in top_columns(v, l, f) }
pattern diags_only(s: int = 7, l: int = 8, near: int = 3) {
    mask q - k in top_diagonals(s, l, near)
}
pattern blocks_only(c: int = 2, b: int = 16, cz: bool = true) { mask top_blocks(c, b, cz) }
"""
PROG = attnc.loads(SRC)
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" \
    else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(seed: str, H: int, Hkv: int, q_len: int, n: int, D: int, dtype=torch.float32,
            device: str = DEVICE):
    g = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
    q = torch.randn(1, H, q_len, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, n, D, generator=g).to(dtype)
    v = torch.randn(1, Hkv, n, D, generator=g).to(dtype)
    return q.to(device), k.to(device), v.to(device)


def _scores(q, k, scale):
    """[H, Lq, n] float64 logits of the first batch element (what the reference ranks)."""
    H, Hkv = q.shape[1], k.shape[1]
    kk = k[0].double().cpu().repeat_interleave(H // Hkv, 0)
    return (q[0].double().cpu() @ kk.transpose(-1, -2)) * scale


def _bm(name, args, n, H, q_len, BM=16, BN=16):
    return build(lower(PROG, name, args), n=n, heads=H, q_len=q_len, schedule=Schedule(BM, BN))


def _ref_flags(name, args, n, H, q_len, s):
    m = reference.evaluate(PROG, name, n=n, heads=H, q_len=q_len, args=args, scores=s).mask
    return m


def _same_up_to_near_ties(ours: torch.Tensor, ref: torch.Tensor, score: torch.Tensor,
                          rel: float = 1e-5) -> None:
    """Sets equal, except swaps between entries whose float64 scores are within `rel` of each
    other (float32 accumulation cannot order those; exact ties are tested separately)."""
    diff = ours != ref
    if not diff.any():
        return
    for h in range(ours.shape[0]):
        d = diff[h].nonzero().flatten()
        if d.numel() == 0:
            continue
        vals = score[h, d]
        assert (vals.max() - vals.min()).abs() <= rel * vals.abs().max(), (h, d, vals)


# ---------------------------------------------------------------- selections

SEL_CASES = [  # (n, q_len, H, Hkv, D, last_q)
    (97, 97, 2, 1, 16, 8),
    (130, 61, 4, 2, 32, 16),
    (45, 45, 1, 1, 16, 64),  # last_q > q_len: every row
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", SEL_CASES, ids=lambda c: f"n{c[0]}-q{c[1]}")
def test_columns_and_diagonals_match_reference(case, dtype):
    n, q_len, H, Hkv, D, lq = case
    q, k, _ = _inputs(f"sel-{case}-{dtype}", H, Hkv, q_len, n, D, dtype)
    args = {"v": 9, "s": 11, "l": lq, "f": 2, "near": 3}
    bm = _bm("vs2", args, n, H, q_len)
    ix = dyn.build_index(q[0], k[0], bm)
    s = _scores(q, k, D ** -0.5)
    cols = _ref_flags("cols_only", {"v": 9, "l": lq, "f": 2}, n, H, q_len, s)[:, -1, :]
    diag_mask = _ref_flags("diags_only", {"s": 11, "l": lq, "near": 3}, n, H, q_len, s)
    diags = diag_mask[:, -1, :].flip(-1)  # the last query is n - 1: offset d at key n - 1 - d
    ours_c, ours_d = ix.of("in_columns").cpu(), ix.of("in_diagonals").cpu()
    assert (ours_c.sum(-1) == 9).all() and (ours_d.sum(-1) == 11).all()
    _same_up_to_near_ties(ours_c, cols, ix.extra["score0"].double().cpu())
    _same_up_to_near_ties(ours_d, diags, ix.extra["score1"].double().cpu())


def test_column_and_diagonal_scores_are_the_reference_sums():
    n, q_len, H, D = 70, 50, 2, 16
    q, k, _ = _inputs("sums", H, H, q_len, n, D)
    col, diag = builders.last_rows_scores(q[0], k[0], torch.tensor([5, 50]), n - q_len,
                                          D ** -0.5)
    s = _scores(q, k, D ** -0.5)
    qpos = torch.arange(n - q_len, n).view(-1, 1)
    kpos = torch.arange(n).view(1, -1)
    p = torch.softmax(s.masked_fill(kpos > qpos, float("-inf")), -1)
    rows = torch.arange(q_len).view(1, -1, 1) >= q_len - torch.tensor([5, 50]).view(-1, 1, 1)
    p = p * rows
    assert torch.allclose(col.double().cpu(), p.sum(1), atol=1e-6)
    d = (qpos - kpos).clamp(min=0).view(-1)
    ref = torch.zeros(H, n, dtype=torch.float64)
    ref.scatter_add_(1, d.expand(H, -1), (p * (qpos >= kpos)).reshape(H, -1))
    assert torch.allclose(diag.double().cpu(), ref, atol=1e-6)


def test_exact_ties_resolve_to_lower_index():
    """Zero queries make every causal row uniform: many columns and all near diagonals tie
    exactly; both sides keep the lower indices (and keep_first / keep_near rank first)."""
    n, H, D = 60, 2, 16
    q = torch.zeros(1, H, n, D, device=DEVICE)
    _, k, _ = _inputs("ties", H, H, n, n, D)
    args = {"v": 7, "s": 9, "l": 6, "f": 2, "near": 3}
    ix = dyn.build_index(q[0], k[0], _bm("vs2", args, n, H, n))
    s = _scores(q, k, D ** -0.5)
    cols = _ref_flags("cols_only", {"v": 7, "l": 6, "f": 2}, n, H, n, s)[:, -1, :]
    diags = _ref_flags("diags_only", {"s": 9, "l": 6, "near": 3}, n, H, n, s)[:, -1, :].flip(-1)
    assert torch.equal(ix.of("in_columns").cpu(), cols)
    assert torch.equal(ix.of("in_diagonals").cpu(), diags)
    assert cols[:, :7].all() and torch.equal(diags[:, :9], torch.ones(H, 9, dtype=torch.bool))


def test_rank_keys_order():
    score = torch.tensor([[1.0, float("inf"), -0.0, 0.0, 2.0, 2.0, -1.0, float("-inf")]])
    kept = builders.keep_top(builders.rank_keys(score), torch.tensor([5]))
    assert kept.tolist() == [[True, True, True, False, True, True, False, False]]


def test_forced_keys_equal_rank_keys_of_forced_scores():
    """The fused kernel forces each head's first keep[h] entries to +inf and ranks as
    rank_keys does (-0.0 as 0.0, ties to the lower index), over more than one program."""
    g = torch.Generator().manual_seed(5)
    n = 2500
    score = torch.randint(-3, 4, (3, n), generator=g).float() / 2  # many ties
    score[0, 7] = -0.0
    score[1, 100:110] = float("-inf")
    keep = torch.tensor([0, 3, 1200])
    want = torch.where(torch.arange(n).view(1, -1) < keep.view(-1, 1), float("inf"), score)
    score, keep, want = score.to(DEVICE), keep.to(DEVICE), want.to(DEVICE)
    forced, keys = builders.forced_keys(score, keep)
    assert torch.equal(forced, want)
    assert torch.equal(keys, builders.rank_keys(want))


@pytest.mark.parametrize("case", [(100, 100, 2, 1, 16, 16, True), (150, 77, 3, 3, 32, 32, True),
                                  (90, 90, 2, 2, 16, 24, False)],
                         ids=["n100", "q77", "noncausal-b24"])
def test_top_blocks_match_reference(case):
    n, q_len, H, Hkv, D, blk, causal = case
    q, k, _ = _inputs(f"blocks-{case}", H, Hkv, q_len, n, D)
    args = {"c": 2, "b": blk, "cz": causal}
    bm = _bm("blocks_only", args, n, H, q_len)
    ix = dyn.build_index(q[0], k[0], bm)
    ref = _ref_flags("blocks_only", args, n, H, q_len, _scores(q, k, D ** -0.5))
    flags = ix.of("top_blocks").cpu()
    qb = (torch.arange(n - q_len, n) // blk).view(-1, 1)
    kb = (torch.arange(n) // blk).view(1, -1)
    assert torch.equal(flags[:, qb, kb], ref)


def test_top_blocks_ties_keep_lower_blocks():
    n, H, D, blk = 80, 2, 16, 16
    q, k, _ = _inputs("blockties", H, H, n, n, D)
    k = k[:, :, :blk].repeat(1, 1, n // blk, 1)  # every key block the same: all tie
    args = {"c": 2, "b": blk, "cz": True}
    ix = dyn.build_index(q[0], k[0], _bm("blocks_only", args, n, H, n))
    ref = _ref_flags("blocks_only", args, n, H, n, _scores(q, k, D ** -0.5))
    idx = torch.arange(n) // blk
    flags = ix.of("top_blocks").cpu()
    assert torch.equal(flags[:, idx.view(-1, 1), idx.view(1, -1)], ref)
    assert flags[:, 4, :2].all() and not flags[:, 4, 2:].any()


def test_block_lists_are_sound_and_tight():
    """Every kept pair lies in a listed block; full blocks keep every valid pair; a block the
    selection makes empty is not listed (static part applied statically)."""
    n, q_len, H, D, BM, BN = 120, 90, 2, 16, 16, 32
    q, k, _ = _inputs("lists", H, 1, q_len, n, D)
    for name in ("vs2", "mixed"):
        bm = _bm(name, {}, n, H, q_len, BM, BN)
        ix = dyn.build_index(q[0], k[0], bm)
        mask = reference.evaluate(PROG, name, n=n, heads=H, q_len=q_len,
                                  scores=_scores(q, k, D ** -0.5)).mask
        kept, masked, _ = block_truth(mask.numpy(), q_len, n, BM, BN)
        lists = {x: t.cpu() for x, t in ix.flex.items()}
        QB, KB = kept.shape[1:]
        listed = torch.zeros(H, QB, KB, dtype=torch.bool)
        full = torch.zeros(H, QB, KB, dtype=torch.bool)
        for h in range(H):
            for i in range(QB):
                listed[h, i, lists["kv_indices"][h, i, :lists["kv_num_blocks"][h, i]].long()] = 1
                f = lists["full_kv_indices"][h, i, :lists["full_kv_num_blocks"][h, i]].long()
                full[h, i, f] = True
        assert not (listed & full).any()
        assert ((listed | full) >= torch.as_tensor(kept)).all(), name
        assert not (full & torch.as_tensor(masked)).any(), name
        assert ((listed | full) <= torch.as_tensor(kept | masked)).all()


# ---------------------------------------------------------------- attention


def _dense(q, k, v, mask, scale, dtype):
    """Dense masked attention in float64 (the truth) and in `dtype` (what PyTorch gets)."""
    H, Hkv = q.shape[1], k.shape[1]
    out = []
    for dt in (torch.float64, dtype):
        kk = k.cpu().repeat_interleave(H // Hkv, 1).to(dt)
        vv = v.cpu().repeat_interleave(H // Hkv, 1).to(dt)
        s = ((q.cpu().to(dt) @ kk.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s.double(), -1)
        p = torch.softmax(s.float() if dt != torch.float64 else s, -1).nan_to_num(0.0).to(dt)
        out.append(((p @ vv).double(), lse))
    return out


ATT_CASES = [  # (pattern, args, n, q_len, H, Hkv, D, BM, BN, fast)
    ("vs2", {"v": 6, "s": 9, "l": 8}, 131, 131, 2, 1, 16, 16, 16, True),
    ("vs2", {"v": 6, "s": 40, "l": 8}, 150, 67, 4, 2, 32, 16, 32, True),
    ("vs2", {"v": 6, "s": 9, "l": 8}, 131, 131, 2, 1, 16, 16, 16, False),
    ("vs2", {"v": 4, "s": 90, "l": 8, "near": 80}, 200, 200, 2, 2, 16, 16, 16, True),  # full
    ("vs2", {"v": 5, "s": 70, "l": 8}, 301, 250, 2, 1, 16, 64, 64, True),  # 3 packed words
    ("vs2", {"v": 5, "s": 70, "l": 8}, 290, 290, 2, 2, 16, 128, 128, True),  # 5 packed words
    ("block_topk", {"topk": 2, "block": 16}, 123, 123, 2, 1, 16, 16, 16, False),
    # decode and a one-row last query block: the ragged last key block is never full
    ("block_topk", {"topk": 1, "block": 10}, 70, 1, 2, 1, 16, 16, 16, False),
    ("block_topk", {"topk": 3, "block": 10}, 70, 33, 2, 2, 16, 16, 16, False),
    ("mixed", {}, 100, 70, 2, 2, 16, 32, 16, False),
]


def _check_attention(case, dtype, device=DEVICE, launch=None):
    name, args, n, q_len, H, Hkv, D, BM, BN, fast = case
    prog = PROG if name in ("vs2", "mixed") else attnc.loads("")
    q, k, v = _inputs(f"att-{case}-{dtype}", H, Hkv, q_len, n, D, dtype, device)
    bm = build(lower(prog, name, args), n=n, heads=H, q_len=q_len, schedule=Schedule(BM, BN))
    res = dyn.dynamic_attention(q, k, v, bm, poison=True, fast=fast, launch=launch)
    ev = reference.evaluate(prog, name, n=n, heads=H, q_len=q_len, args=args,
                            scores=_scores(q, k, D ** -0.5))
    (o64, lse64), (o_dt, _) = _dense(q, k, v, ev.mask, D ** -0.5, dtype)
    out = res.out.cpu().double()
    assert not torch.isnan(out).any() and not torch.isnan(res.lse).any()
    assert_within_torch_error(out, o64, o_dt, dtype)
    lse = res.lse.cpu().double()
    ok = ev.mask.any(-1).expand_as(lse)
    assert torch.allclose(lse[ok], lse64[ok], atol=2e-3, rtol=1e-3)
    assert torch.isinf(lse[~ok]).all() and (out[~ok] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ATT_CASES, ids=lambda c: f"{c[0]}-n{c[2]}-q{c[3]}-{c[9]}")
def test_attention_matches_dense_reference(case, dtype):
    if dtype != torch.float32 and case[0] == "mixed":
        pytest.skip("one precision is enough for the mixed selector case")
    _check_attention(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("case", [c for c in ATT_CASES if c[0] == "vs2" and c[9]],
                         ids=lambda c: f"n{c[2]}-q{c[3]}-{c[7]}x{c[8]}")
def test_vertical_slash_tma_loads_match_reference(case, dtype):
    """The diagonal ranges' tiles through TMA descriptors (tiles start at any key, not at a
    block boundary; rows past the range are real keys the predicate drops)."""
    _check_attention(case, dtype, launch={"TMA": 1})


def test_vertical_slash_kernel_is_chosen_for_the_library_pattern():
    bm = build(lower(attnc.loads(""), "vertical_slash", {}), n=256, heads=2)
    assert dyn.vertical_slash_form(bm.pattern) is not None
    assert dyn.vertical_slash_form(_bm("mixed", {}, 64, 1, 64).pattern) is None
    src = dyn.vs_kernel_source(bm.pattern)
    assert bm.pattern.key in src and "DBITS" in src
    with pytest.raises(ValueError, match="not causal"):
        dyn.vs_kernel_source(_bm("mixed", {}, 64, 1, 64).pattern)


def test_rows_with_nothing_kept_give_zero_and_minus_inf():
    n, H, D = 50, 2, 16
    q, k, v = _inputs("empty", H, H, n, n, D)
    for fast in (True, False):
        bm = _bm("vs2", {"v": 0, "s": 0, "f": 0, "near": 0}, n, H, n)
        res = dyn.dynamic_attention(q, k, v, bm, poison=True, fast=fast)
        assert (res.out == 0).all()
        assert torch.isinf(res.lse).all() and (res.lse < 0).all()


def test_segments_and_batches():
    """segment(): ids per position through the side tensor; two batch elements select apart."""
    n, H, D = 70, 2, 16
    lib = attnc.loads("")
    seg = torch.tensor([0] * 23 + [1] * 30 + [2] * 17)
    q, k, v = (torch.cat([x, x.flip(2)]) for x in _inputs("seg", H, H, n, n, D))
    bm = build(lower(lib, "document", {}), n=n, heads=H, schedule=Schedule(16, 16))
    res = dyn.dynamic_attention(q, k, v, bm, segments=seg.to(DEVICE), poison=True)
    mask = reference.evaluate(lib, "document", n=n, heads=H, segments=seg).mask
    for b in range(2):
        (o64, _), _ = _dense(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask, D ** -0.5, torch.float32)
        assert (res.out[b:b + 1].cpu().double() - o64).abs().max() < 1e-5
    vs = build(lower(PROG, "vs2", {}), n=n, heads=H, schedule=Schedule(16, 16))
    res, sets = dyn.dynamic_attention(q, k, v, vs, return_index=True)
    assert not torch.equal(sets[0].of("in_columns"), sets[1].of("in_columns"))


def test_gate_without_scores_is_refused_clearly():
    """gate() runs from the learned gate's scores (tests/test_gate.py); without them the call
    says what to pass."""
    bm = build(lower(attnc.loads(""), "gated", {}), n=128, heads=1)
    q = torch.zeros(1, 1, 128, 16)
    with pytest.raises(ValueError, match="gate's block scores"):
        dyn.dynamic_attention(q, q, q, bm)


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [True, False], ids=["vs-kernel", "block-kernel"])
def test_gpu_vertical_slash_bf16(fast):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("set TRITON_INTERPRET=0 to compile for the GPU")
    case = ("vs2", {"v": 60, "s": 300, "l": 64, "f": 30, "near": 100}, 2000, 1500, 4, 2, 128,
            128, 64, fast)
    _check_attention(case, torch.bfloat16, "cuda")
    if fast:
        _check_attention(case, torch.bfloat16, "cuda", launch={"TMA": 1})
        case = case[:7] + (128, 128, True)
        _check_attention(case, torch.bfloat16, "cuda", launch={"TMA": 1, "num_warps": 8})


@pytest.mark.gpu
def test_gpu_block_topk_bf16():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("set TRITON_INTERPRET=0 to compile for the GPU")
    case = ("block_topk", {"topk": 8, "block": 64}, 2048, 2048, 4, 4, 128, 64, 64, False)
    _check_attention(case, torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vs2", "block_topk", "gated"])
def test_gpu_graphed_equals_eager(name):
    """One CUDA graph per call (builders, the learned gate and the kernel): replays equal
    eager calls, on the captured inputs and on new inputs copied in."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("set TRITON_INTERPRET=0 to compile for the GPU")
    from attnc.codegen.gate import BlockGate

    prog = PROG if name == "vs2" else attnc.loads("")
    args = {"vs2": {"v": 60, "s": 300, "l": 64, "f": 30, "near": 100},
            "block_topk": {"topk": 8, "block": 64},
            "gated": {"block": 64, "topk": 0, "threshold": 0.05}}[name]
    n, H = 2000, 4
    # A gate as train_gate makes it: the model's RoPE undone (Llama's default frequencies)
    # and a block-level rotary embedding of its own, all inside the captured graph.
    inv = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    gate = BlockGate(H, 2, 128, 64, rope=32).set_model_rope(inv).to("cuda")
    opts = {"gates": gate} if name == "gated" else {}
    bm = build(lower(prog, name, args), n=n, heads=H, schedule=Schedule(64, 64))
    q, k, v = _inputs(f"graph-{name}", H, 2, n, n, 128, torch.bfloat16, "cuda")
    g = dyn.Graphed(q, k, v, bm, **opts)
    for x in (None, _inputs(f"graph2-{name}", H, 2, n, n, 128, torch.bfloat16, "cuda")):
        res = g() if x is None else g(*x)
        want = dyn.dynamic_attention(*((q, k, v) if x is None else x), bm, **opts)
        assert torch.equal(res.out, want.out) and torch.equal(res.lse, want.lse)
    with pytest.raises(ValueError, match="captured"):
        g(q[:, :, :100], k, v)


def _plan_spec(cols, diags, BM, C, q_start, q_len):
    """The vertical-slash plan from its definition, one head at a time in plain Python."""
    H, n = diags.shape
    G = max(-(-n // (BM + 1)), 1)
    out = {k: [] for k in ("glo", "ghi", "ng", "bits", "qcols")}
    for h in range(H):
        d = [bool(x) for x in diags[h]]
        sel = [i for i in range(n) if d[i]]
        starts = [i for i in sel if not any(d[max(i - BM, 0):i])]
        ends = [i for i in sel if not any(d[i + 1:i + BM + 1])]
        assert len(starts) == len(ends) <= G
        out["glo"].append(starts + [n] * (G - len(starts)))
        out["ghi"].append(ends + [n] * (G - len(ends)))
        out["ng"].append(len(starts))
        ahi = []
        for x in range(n):
            g = [e for s_, e in zip(starts, ends, strict=True) if s_ <= x]
            ahi.append(g[-1] if g else -1)
        cl = [i for i in range(n) if cols[h, i]][:C]
        out["bits"].append([False] * dyn.VS_PAD + d)
        qcols = []
        for qb in range(-(-q_len // BM)):
            q0 = q_start + qb * BM
            q1 = min(q0 + BM - 1, q_start + q_len - 1)
            # A column is gathered where no group's key range covers it for this block.
            qcols.append([c for c in cl if c <= q1 and ahi[q1 - c] < q0 - c])
        out["qcols"].append(qcols)
    return out


@pytest.mark.parametrize("n,q_len,p", [(5, 5, 0.5), (200, 200, 0.3), (300, 131, 0.02),
                                       (700, 700, 0.6), (1000, 257, 0.9)])
def test_vertical_slash_plan_matches_its_definition(n, q_len, p):
    """The plan kernel (prefix counts, diagonal groups, the group end by offset, compacted and
    per-query-block columns, packed flags) against a plain-Python construction, on random
    flags of lengths that are not chunk or block multiples, several chunks long."""
    ir = lower(attnc.loads(""), "vertical_slash", {"vertical": 40, "slash": 40, "last_q": 8})
    H = 3
    bm = build(ir, n=n, heads=H, q_len=q_len, schedule=Schedule(16, 16))
    g = torch.Generator().manual_seed(n)
    cols = torch.rand(H, n, generator=g) < p
    diags = torch.rand(H, n, generator=g) < p
    diags[1] = torch.rand(n, generator=g) < p / 8  # sparse: several groups
    cols[2] = False
    C = 37
    want = _plan_spec(cols, diags, 16, C, n - q_len, q_len)
    cols, diags = cols.to(DEVICE), diags.to(DEVICE)
    plan = dyn.vs_plan(cols, diags, bm, max_cols=C)
    assert plan["dcount"].tolist() == [[0] + np.cumsum(d.cpu().numpy()).tolist() for d in diags]
    assert plan["glo"].tolist() == want["glo"] and plan["ghi"].tolist() == want["ghi"]
    assert plan["ngroups"].tolist() == want["ng"]
    words = plan["dbits"]
    bits = torch.stack([(words >> i) & 1 for i in range(32)], -1).reshape(H, -1).bool()
    assert bits[:, :dyn.VS_PAD + n].tolist() == want["bits"]
    assert not bits[:, dyn.VS_PAD + n:].any()
    assert plan["cflags"].bool().tolist() == cols.tolist()
    for h in range(H):
        for qb, qc in enumerate(want["qcols"][h]):
            k = int(plan["ncols"][h, qb])
            assert plan["cols"][h, qb, :k].tolist() == qc
    assert torch.equal(dyn.vs_plan(cols, diags, bm)["ncols"],
                       dyn.vs_plan(cols, diags, bm, max_cols=n)["ncols"])


def test_gate_threshold_compares_as_float64():
    """The float32 shortcut for gate thresholds keeps exactly what a float64 comparison keeps,
    for thresholds between float32 values, on them, beyond float32's range and NaN."""
    import numpy as np
    from attnc.codegen.dynamic import _at_least
    from attnc.compiler.ir import Const

    vals = torch.tensor([0.0, 0.1, 1.0 / 3, 1e-45, 3.4e38, float("inf"), float("-inf"),
                         float("nan"), -0.0, 0.25], dtype=torch.float32)
    g = torch.cat([vals, torch.nextafter(vals, torch.tensor(float("inf"))),
                   torch.nextafter(vals, torch.tensor(float("-inf")))]).view(1, 1, -1)
    for t in (0.1, 1.0 / 3, 0.25, float(np.float32(0.1)), 1e39, -1e39, 1e-46, 0.0,
              float("nan"), float("inf")):
        got = _at_least(g, Const(t), 4096, 1)
        want = g.double() >= t
        assert torch.equal(got, want), t
        assert torch.equal(_at_least(g.double(), Const(t), 4096, 1), want)
