"""The FlexAttention back end (codegen/flex.py) against FlexAttention itself and the reference.

Ground truth for block masks is FlexAttention's own create_block_mask run on a mask_mod that
indexes the reference's dense mask (attnc.reference), so neither our IR interpreter nor the
block-mask compiler takes part in producing the expected values.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
from attnc.codegen import flex
from attnc.codegen.flex import compile_expr, csr_to_tensors, mask_mod_for, to_flex_block_mask
from attnc.compiler import numeric
from attnc.compiler.blockmask import Schedule, build
from attnc.compiler.ir import Const, Var, op, substitute
from attnc.compiler.layout import candidates
from attnc.compiler.lower import lower
from attnc.dsl.parser import parse_expr

import attnc
from attnc.reference import evaluate

fa = pytest.importorskip("torch.nn.attention.flex_attention")
create_block_mask, create_mask = fa.create_block_mask, fa.create_mask

LIB = attnc.loads("")
STATIC = sorted(name for name, p in LIB.patterns.items() if not p.dynamic)
DYNAMIC = sorted(name for name, p in LIB.patterns.items() if p.dynamic)

# Parameters per static pattern: scaled to the small n below, several regimes each (strings are
# expressions of n and h). Every static library pattern must appear here.
ARGS: dict[str, list[dict]] = {
    "a_shape": [{"sink": 16, "local": 100}, {"sink": 0, "local": 1}, {"sink": 70, "local": 33}],
    "alibi": [{"heads": 4}],
    "band": [{"before": 40, "after": 70}, {"before": 0, "after": 0}, {"before": 129, "after": 5}],
    "causal": [{}],
    "dense": [{}],
    "dilated": [{"window": 20, "dilation": 3}, {"window": 1000, "dilation": 7},
                {"window": 5, "dilation": 1}],
    "fixed_documents": [{"length": 100}, {"length": 37}, {"length": 64}],
    "power": [{"block": 16, "local": 2, "sink": 1}, {"block": 20, "local": 1, "sink": 0},
              {"block": 7, "local": 3, "sink": 2}],
    "prefix_lm": [{"prefix": 150}, {"prefix": 0}, {"prefix": 64}],
    "radial": [{"block": 16, "dense": 2}, {"block": 10, "dense": 1, "causal": False},
               {"block": 32, "dense": 1}],
    "shards": [{"stride": 4, "step": 1, "block": 16, "local": 64},
               {"stride": 3, "step": 2, "block": 24, "local": 0},
               {"stride": 2, "step": 0, "block": 50, "local": 10}],
    "sink": [{"size": 4}, {"size": 70}, {"size": 0}],
    "streaming": [{"sink": 4, "window": 100}, {"sink": 33, "window": 17}],
    "window": [{"size": 100}, {"size": 1}, {"size": "n // 8 + 16 * h"}],
}

# (n, q_len, heads, block_m, block_n): n not a multiple of the blocks, q_len < n, 16..128.
SHAPES = [
    (256, 256, 2, 64, 64),
    (300, 300, 1, 32, 64),
    (437, 150, 3, 64, 32),
    (600, 77, 1, 128, 16),
    (333, 333, 1, 16, 128),
    (130, 130, 2, 128, 128),
    (200, 1, 2, 16, 16),
]

# Cases where the compiler (not this test) is known to disagree with FlexAttention:
# {(pattern, args index, shape): reason}, marked xfail(strict=True). Two bugs found this way
# (each only added EMPTY blocks to the visited set) are fixed; test_fixed_* keep their
# reproductions.
_REFINE_BATCH = ("compiler bug: refine() splits a box at the pattern's divisor only when every "
                 "box of the batch is narrow enough, so an empty block batched with a wide one "
                 "stays PARTIAL (radial, causal=false)")
_CONTRADICTION = ("compiler bug: the DNF term k <= q & q - k < 0 (shards with local = 0) is "
                  "unsatisfiable but its diagonal blocks are visited; the interval domain "
                  "cannot refute it (not relational)")
# Both bugs are fixed; their reproductions stay below as regression tests.
KNOWN_BUGS: dict[tuple[str, int, tuple], str] = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(d: dict) -> dict:
    return {k: parse_expr(v) if isinstance(v, str) else v for k, v in d.items()}


def _id(name: str, i: int) -> str:
    return f"{name}[{i}]"


def _cases():
    for name in STATIC:
        for i in range(len(ARGS.get(name, [{}]))):
            for shape in SHAPES:
                marks = []
                if (name, i, shape) in KNOWN_BUGS:
                    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name, i, shape])]
                yield pytest.param(name, i, shape, marks=marks,
                                   id=f"{_id(name, i)}-" + "x".join(map(str, shape)))


@functools.lru_cache(maxsize=64)
def _ref(name: str, i: int, n: int, q_len: int, heads: int) -> torch.Tensor:
    args = _args(ARGS.get(name, [{}])[i])
    return evaluate(LIB, name, n=n, heads=heads, q_len=q_len, args=args).mask


def _bm(name: str, i: int, n: int, q_len: int, heads: int, block_m: int, block_n: int):
    ir = lower(LIB, name, _args(ARGS.get(name, [{}])[i]))
    return build(ir, n=n, heads=heads, q_len=q_len, schedule=Schedule(block_m, block_n))


def _dense_mask_mod(dense: torch.Tensor):
    """A mask_mod that reads the reference's [H, q_len, n] mask (the ground truth)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[h, q_idx, kv_idx]

    return mask_mod


def _theirs(name, i, shape):
    n, q_len, heads, bm, bn = shape
    dense = _ref(name, i, n, q_len, heads)
    return create_block_mask(_dense_mask_mod(dense), B=1, H=heads, Q_LEN=q_len, KV_LEN=n,
                             device="cpu", BLOCK_SIZE=(bm, bn))


def _compare_csr(csr, theirs) -> list[str]:
    """Differences between our CSR and a FlexAttention BlockMask (valid prefixes only)."""
    errs = []
    for kind in ("", "full_"):
        ours_n = np.asarray(getattr(csr, kind + "kv_num_blocks"))
        ours_i = np.asarray(getattr(csr, kind + "kv_indices"))
        th_n = getattr(theirs, kind + "kv_num_blocks")[0].numpy()
        th_i = getattr(theirs, kind + "kv_indices")[0].numpy()
        if ours_n.shape != th_n.shape:
            return [f"{kind}kv_num_blocks shape {ours_n.shape} != {th_n.shape}"]
        if ours_n.dtype != np.int32 or ours_i.dtype != np.int32:
            errs.append(f"{kind} dtypes {ours_n.dtype}, {ours_i.dtype}")
        if ours_i.shape[-1] < max(1, ours_n.max(initial=0)):
            errs.append(f"{kind}kv_indices width {ours_i.shape[-1]} < {ours_n.max()}")
        bad = np.argwhere(ours_n != th_n)
        for h, qb in bad[:5]:
            errs.append(f"{kind}kv_num_blocks[h={h}, qb={qb}] ours {ours_n[h, qb]} "
                        f"theirs {th_n[h, qb]}")
        H, QB = ours_n.shape
        for h in range(H):
            for qb in range(QB):
                a = ours_i[h, qb, : ours_n[h, qb]].tolist()
                b = th_i[h, qb, : th_n[h, qb]].tolist()
                if set(a) != set(b) or a != sorted(b) or len(set(a)) != len(a):
                    errs.append(f"{kind}kv_indices[h={h}, qb={qb}] ours {a} theirs {b}")
    return errs


# ------------------------------------------------------------------ coverage of the library


def test_every_static_pattern_has_parameters():
    assert STATIC, "the library has no static patterns?"
    missing = sorted(set(STATIC) - set(ARGS))
    assert not missing, f"add parameter sets for {missing} to ARGS"
    assert not set(ARGS) - set(STATIC), "ARGS names a pattern that is not static"


# ------------------------------------------------------------------ CSR against FlexAttention


@pytest.mark.parametrize("name, i, shape", list(_cases()))
def test_csr_matches_flex_create_block_mask(name, i, shape):
    n, q_len, heads, bm, bn = shape
    csr = _bm(name, i, *shape).materialize()
    assert (csr.block_m, csr.block_n, csr.q_len, csr.n, csr.q_start) == (bm, bn, q_len, n,
                                                                          n - q_len)
    errs = _compare_csr(csr, _theirs(name, i, shape))
    assert not errs, f"{name}{ARGS[name][i]} {shape}:\n" + "\n".join(errs[:20])


def _visited_but_empty(bmir, ref: torch.Tensor) -> list:
    """(h, qb, kb) of blocks our CSR visits although the reference keeps no pair in them."""
    cls = bmir.block_classes()
    H, QB, KB = cls.shape
    BM, BN = bmir.schedule.block_m, bmir.schedule.block_n
    pad = np.zeros((H, QB * BM, KB * BN), dtype=bool)
    pad[:, : bmir.q_len, : bmir.n] = ref.numpy()
    kept = pad.reshape(H, QB, BM, KB, BN).any(axis=(2, 4))
    return np.argwhere((cls != 0) & ~kept).tolist()


def test_fixed_refine_verdict_does_not_depend_on_batch():
    from attnc.compiler.blockmask import refine

    args = {"block": 10, "dense": 1, "causal": False}
    mask = _bm("radial", 1, 136, 136, 1, 16, 128).classes[0].mask
    assert ARGS["radial"][1] == args
    lo_q, hi_q = np.array([48, 48]), np.array([63, 63])
    alone = refine(mask, lo_q[1:], hi_q[1:], np.array([128]), np.array([135]), 0, 136)
    assert alone.tolist() == [0]  # queries 48..63 x keys 128..135: no kept pair, EMPTY
    batched = refine(mask, lo_q, hi_q, np.array([0, 128]), np.array([127, 135]), 0, 136)
    assert batched.tolist() == [1, 0]  # was [1, 1]: the wide first box disabled the split


def test_fixed_unsatisfiable_term_visits_no_block():
    # head 1: k <= q & ((k // 24 + 2) % 3 == 0 | q - k < 0) keeps nothing for n = 8
    bmir = _bm("shards", 1, 8, 8, 2, 4, 4)
    ref = _ref("shards", 1, 8, 8, 2)
    assert not ref[1].any()
    assert np.array_equal(bmir.to_dense(), ref.numpy())  # results are right
    assert _visited_but_empty(bmir, ref) == []  # was [[1, 0, 0], [1, 1, 1]]


# ------------------------------------------------------------------ the mask_mod interpreter


MOD_SHAPES = [(256, 256, 2), (437, 150, 3)]


@pytest.mark.parametrize("name, i", [(nm, i) for nm in STATIC
                                     for i in range(len(ARGS.get(nm, [{}])))],
                         ids=[_id(nm, i) for nm in STATIC for i in range(len(ARGS.get(nm, [{}])))])
def test_mask_mod_matches_reference(name, i):
    for n, q_len, heads in MOD_SHAPES:
        mm = mask_mod_for(_bm(name, i, n, q_len, heads, 64, 64))
        got = create_mask(mm, 1, heads, q_len, n, "cpu")  # FlexAttention's vmap over b, h, q, k
        ref = _ref(name, i, n, q_len, heads)
        assert got.dtype == torch.bool and got.shape == (1, heads, q_len, n)
        bad = (got[0] != ref).nonzero()
        assert bad.numel() == 0, f"{name} n={n} q_len={q_len}: (h, q_idx, k) {bad[:5].tolist()}"


def _grid(lo=-13, hi=29):
    r = torch.arange(lo, hi, dtype=torch.int64)
    q, k = torch.meshgrid(r, r, indexing="ij")
    return q.reshape(-1), k.reshape(-1)


Q, K, H = Var("q"), Var("k"), Var("h")


def c(v):
    return Const(v)


# Expressions over q, k, h covering every operator, with the corner cases of the integer
# semantics: division and modulo by zero and by negatives, negative powers, log2 of <= 0.
EXPRS = {
    "add_sub_mul": op("sub", op("mul", op("add", Q, c(3)), K), H),
    "fdiv": op("fdiv", Q, K),
    "fdiv_const": op("fdiv", op("neg", Q), c(-4)),
    "mod": op("mod", Q, K),
    "mod_neg": op("mod", Q, c(-5)),
    "mod_zero": op("mod", Q, op("sub", K, K)),
    "div": op("div", Q, op("add", K, c(100))),
    "fdiv_float": op("fdiv", op("float", Q), c(2.5)),
    "mod_float": op("mod", op("float", Q), c(2.5)),
    "pow_int": op("pow", op("mod", Q, c(5)), op("fdiv", K, c(4))),
    "pow_neg_base": op("pow", op("sub", op("mod", Q, c(5)), c(2)), op("mod", K, c(7))),
    "pow_float": op("pow", c(2.0), op("div", K, c(7))),
    "pow_const_exp": op("pow", op("sub", Q, K), c(3)),
    "pow_const_exp_wrap": op("pow", op("add", Q, c(100)), c(11)),
    "pow_two_wrap": op("pow", c(2), op("mul", K, c(3))),
    "pow_wrap": op("pow", op("sub", op("mod", Q, c(7)), c(3)), op("mul", K, c(5))),
    "log2": op("log2", op("mul", Q, op("abs", K))),
    "log2_shift": op("pow", c(2), op("log2", op("abs", Q))),
    "floor_ceil": op("add", op("floor", op("div", Q, c(3))), op("ceil", op("div", K, c(4)))),
    "floor_int": op("floor", Q),
    "exp_log_sqrt": op("add", op("exp", op("div", Q, c(20))),
                       op("mul", op("log", op("float", op("add", op("abs", K), c(1)))),
                          op("sqrt", op("float", op("abs", Q))))),
    "min_max": op("add", op("min", Q, K, c(7)), op("max", op("neg", Q), K, H)),
    "min_float": op("min", Q, op("div", K, c(2))),
    "abs": op("abs", op("sub", Q, K)),
    "where_int": op("where", op("lt", Q, K), Q, op("mul", K, c(2))),
    "where_mixed": op("where", op("le", Q, K), op("div", Q, c(3)), K),
    "cmp_logic": op("or", op("and", op("lt", Q, K), op("ne", Q, c(3))),
                    op("not", op("eq", op("mod", K, c(3)), c(0))), op("le", H, c(0))),
    "consts": op("and", c(True), op("le", op("add", c(2), c(3)), Q)),
    "int_float_cmp": op("lt", op("mul", Q, c(0.5)), K),
}


@pytest.mark.parametrize("key", sorted(EXPRS))
def test_interpreter_matches_numeric(key):
    e = EXPRS[key]
    fn = compile_expr(e, n=50)
    q, k = _grid()
    for h in (0, 1, 3):
        hh = torch.tensor(h)
        # vmap over pairs, as FlexAttention traces a mask_mod
        got = torch.vmap(lambda a, b, hh=hh: fn(a, b, hh))(q, k)
        want = numeric.evaluate(e, {"q": q.numpy(), "k": k.numpy(), "h": np.int64(h),
                                    "n": np.int64(50)})
        want = np.broadcast_to(want, q.shape)
        got = got.numpy()
        if want.dtype.kind == "f":
            assert got.dtype == np.float64, got.dtype
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
        else:
            assert got.dtype == want.dtype, (got.dtype, want.dtype)
            np.testing.assert_array_equal(got, want)


def test_mask_mod_rejects_dynamic_patterns():
    assert DYNAMIC
    bm = build(lower(LIB, DYNAMIC[0]), n=64, heads=1)
    with pytest.raises(ValueError, match="dynamic"):
        mask_mod_for(bm)


def test_missing_flex_attention_is_a_clear_call_time_error(monkeypatch):
    bm = _bm("causal", 0, 64, 64, 1, 16, 16)
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)
    with pytest.raises(RuntimeError, match="flex_attention"):
        flex.to_flex_block_mask(bm)


# ------------------------------------------------------------------ BlockMask objects


def test_csr_to_tensors():
    csr = _bm("radial", 0, 300, 200, 3, 32, 64).materialize()
    t = csr_to_tensors(csr)
    H, QB = csr.kv_num_blocks.shape
    for kind in ("", "full_"):
        num, idx = t[kind + "kv_num_blocks"], t[kind + "kv_indices"]
        assert num.dtype == idx.dtype == torch.int32
        assert num.shape == (1, H, QB)
        assert idx.shape == (1, H, QB, getattr(csr, kind + "kv_indices").shape[-1])
        assert np.array_equal(num[0].numpy(), getattr(csr, kind + "kv_num_blocks"))
        assert np.array_equal(idx[0].numpy(), getattr(csr, kind + "kv_indices"))


BM_CASES = [
    ("causal", 0, (256, 256, 2, 64, 64)),
    ("radial", 1, (300, 300, 2, 32, 64)),
    ("shards", 0, (437, 150, 3, 64, 32)),
    ("power", 2, (333, 333, 1, 16, 128)),
    ("window", 2, (600, 77, 2, 128, 16)),
]


@pytest.mark.parametrize("name, i, shape", BM_CASES, ids=[f"{_id(a, b)}" for a, b, _ in BM_CASES])
def test_to_flex_block_mask_matches_flex(name, i, shape):
    n, q_len, heads, bm, bn = shape
    bmir = _bm(name, i, *shape)
    ours = bmir.to_flex_block_mask()
    assert isinstance(ours, fa.BlockMask)
    theirs = _theirs(name, i, shape)
    assert ours.shape == theirs.shape == (1, heads, q_len, n)
    assert ours.BLOCK_SIZE == theirs.BLOCK_SIZE == (bm, bn)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    # rows widened to every key block, padded as create_block_mask pads them; q-side transposes
    for attr in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        a, b = getattr(ours, attr), getattr(theirs, attr)
        assert a.dtype == b.dtype == torch.int32, attr
        assert torch.equal(a, b), attr
    # the BlockMask's own mask_mod is ours, and it is the reference mask
    dense = create_mask(ours.mask_mod, 1, heads, q_len, n, "cpu")[0]
    assert torch.equal(dense, _ref(name, i, n, q_len, heads))


# ------------------------------------------------------------------ layout transforms

LAYOUT_CASES = [
    ("dilated", 0, (300, 300, 2, 32, 64)),  # diagonal: queries and keys permuted
    ("shards", 0, (300, 200, 3, 32, 64)),  # key classes: keys permuted, q_len < n
]


def _layout_case(name, i, shape):
    n, q_len, heads, bm, bn = shape
    ir = lower(LIB, name, _args(ARGS[name][i]))
    lays = [x for x in candidates(substitute(ir.mask, {"n": Const(n)}), n, bm, bn)
            if x.kind == ("diagonal" if name == "dilated" else "key_classes")]
    assert lays, f"no layout for {name}"
    lay = lays[0]
    moves_q = lay.moves_queries()
    bmir = build(ir, n=n, heads=heads, q_len=n if moves_q else q_len,
                 schedule=Schedule(bm, bn), layout=lay)
    perm = torch.from_numpy(lay.perm())
    ref = _ref(name, i, n, n if moves_q else q_len, heads)  # original order
    qperm = perm if moves_q else torch.arange(q_len)
    dense = ref[:, qperm.clamp(min=0)][:, :, perm.clamp(min=0)]
    dense &= (qperm >= 0)[None, :, None] & (perm >= 0)[None, None, :]
    return bmir, lay, dense, qperm, perm


@pytest.mark.parametrize("name, i, shape", LAYOUT_CASES, ids=[a for a, _, _ in LAYOUT_CASES])
def test_layout_transformed_block_masks(name, i, shape):
    bmir, lay, dense, qperm, perm = _layout_case(name, i, shape)
    heads, bm, bn = shape[2:]
    QL, NG = dense.shape[1:]
    assert (bmir.q_len, bmir.n, bmir.n_var) == (QL, NG, shape[0]) and NG == lay.n_perm
    theirs = create_block_mask(_dense_mask_mod(dense), B=1, H=heads, Q_LEN=QL, KV_LEN=NG,
                               device="cpu", BLOCK_SIZE=(bm, bn))
    errs = _compare_csr(bmir.materialize(), theirs)
    assert not errs, "\n".join(errs[:20])
    got = create_mask(mask_mod_for(bmir), 1, heads, QL, NG, "cpu")[0]
    assert torch.equal(got, dense)
    ours = to_flex_block_mask(bmir)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    why = _flex_attention_runs()
    if why:
        pytest.skip(why)
    # attention over permuted q, k, v, un-permuted, against the float64 reference
    n, q_rows, D = shape[0], (shape[0] if lay.moves_queries() else shape[1]), 16
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, heads, q_rows, D, generator=g)
    k = torch.randn(1, heads, n, D, generator=g)
    v = torch.randn(1, heads, n, D, generator=g)

    def permute(x, idx):
        return torch.where((idx >= 0)[:, None], x[:, :, idx.clamp(min=0)], 0.0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fa.flex_attention(permute(q, qperm), permute(k, perm), permute(v, perm),
                                block_mask=ours)
    out = out[:, :, qperm >= 0][:, :, torch.argsort(qperm[qperm >= 0])]
    mask = _ref(name, i, n, q_rows, heads)
    torch.testing.assert_close(out, _dense_attention(q, k, v, mask), rtol=1e-4, atol=1e-5)


def _dense_attention(q, k, v, mask):
    """float64 masked softmax attention; rows with no key give 0, as in FlexAttention."""
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v.double()).float()


@functools.lru_cache(maxsize=1)
def _flex_attention_runs() -> str:
    """'' when flex_attention runs eagerly on this CPU, else why not."""
    try:
        x = torch.randn(1, 1, 32, 16)
        m = create_block_mask(lambda b, h, q, k: q >= k, 1, 1, 32, 32, "cpu", BLOCK_SIZE=16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fa.flex_attention(x, x, x, block_mask=m)
    except Exception as e:  # noqa: BLE001 - any failure means: cannot run here
        return f"flex_attention does not run eagerly on this CPU: {type(e).__name__}: {e}"
    return ""


FLEX_CASES = [
    ("causal", 0, (128, 128)),
    ("dilated", 0, (128, 128)),
    ("radial", 0, (128, 128)),
    ("shards", 1, (128, 128)),
    ("band", 0, (128, 128)),
    ("window", 2, (128, 48)),
    ("power", 1, (128, 100)),
]


@pytest.mark.parametrize("name, i, sizes", FLEX_CASES,
                         ids=[f"{_id(a, b)}-{s[0]}x{s[1]}" for a, b, s in FLEX_CASES])
def test_flex_attention_output(name, i, sizes):
    why = _flex_attention_runs()
    if why:
        pytest.skip(why)
    n, q_len = sizes
    heads, D = 2, 16
    shape = (n, q_len, heads, 32, 16)
    ours = to_flex_block_mask(_bm(name, i, *shape))
    theirs = _theirs(name, i, shape)
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{i}".encode()))
    q = torch.randn(1, heads, q_len, D, generator=g)
    k = torch.randn(1, heads, n, D, generator=g)
    v = torch.randn(1, heads, n, D, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fa.flex_attention(q, k, v, block_mask=ours)
        out_theirs = fa.flex_attention(q, k, v, block_mask=theirs)
    ref = _dense_attention(q, k, v, _ref(name, i, n, q_len, heads))
    torch.testing.assert_close(out, out_theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


GPU_CASES = [("radial", 0, (1000, 1000)), ("window", 2, (1000, 300)), ("power", 2, (777, 777)),
             ("shards", 1, (640, 640))]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("name, i, sizes", GPU_CASES,
                         ids=[f"{_id(a, b)}-{s[0]}x{s[1]}" for a, b, s in GPU_CASES])
def test_compiled_flex_attention_on_gpu(name, i, sizes):
    """The mask_mod through torch.compile(flex_attention) (Triton kernels), fp16 and fp32."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiled FlexAttention kernels do not run under the Triton interpreter "
                    "(tests/conftest.py sets TRITON_INTERPRET=1 unless told; set it to 0)")
    n, q_len = sizes
    heads, D = 2, 64
    # 128 x 128 sparse blocks: the compiled kernel's tiles must divide them
    bmir = _bm(name, i, n, q_len, heads, 128, 128)
    ours = to_flex_block_mask(bmir, device="cuda")
    compiled = torch.compile(fa.flex_attention, dynamic=False)
    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(f"{name}/{i}".encode()))
    q = torch.randn(1, heads, q_len, D, device="cuda", generator=g)
    k = torch.randn(1, heads, n, D, device="cuda", generator=g)
    v = torch.randn(1, heads, n, D, device="cuda", generator=g)
    ref = _dense_attention(q.cpu(), k.cpu(), v.cpu(), _ref(name, i, n, q_len, heads))
    for dt, tol in ((torch.float32, 2e-3), (torch.float16, 2e-2)):
        out = compiled(q.to(dt), k.to(dt), v.to(dt), block_mask=ours)
        torch.testing.assert_close(out.float().cpu(), ref, rtol=tol, atol=tol)
