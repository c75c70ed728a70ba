"""Layout transforms (compiler.layout): permuting token positions keeps exactly the same pairs.

For dilated windows (diagonal layouts: queries and keys move) and strided shards (key-class
layouts: keys move, pattern blocks smaller than the kernel's key block included), every
candidate layout is compiled on the permuted grid; its dense mask, mapped back through
Layout.perm(), must equal the reference mask, padding slots are never kept, the block classes of
the permuted grid are sound, and perm / inverse are inverse bijections. At n = 8192 the diagonal
layout of a dilated window visits far fewer blocks than the identity, mostly FULL ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from attnc.compiler import layout as L
from attnc.compiler.blockmask import Schedule, build
from attnc.compiler.ir import PatternIR, Var
from attnc.compiler.lower import lower
from attnc.compiler.numeric import evaluate as num_eval
from attnc.compiler.rules import rewrite
from conftest import block_truth

import attnc
from attnc.reference import evaluate

LIB = attnc.loads("")
EMPTY, PARTIAL, FULL = 0, 1, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _simplified(name, args) -> PatternIR:
    ir = lower(LIB, name, args)
    return PatternIR(ir.name, rewrite(ir.mask))


def _layouts(ir, n, bm, bn, kind):
    lays = L.candidates(ir.mask, n, bm, bn)
    assert lays, f"no layout candidate for {ir.name} at n = {n}"
    assert all(lay.kind == kind for lay in lays), [lay.text() for lay in lays]
    return lays


def _check_bijection(lay: L.Layout) -> None:
    perm, inv = lay.perm(), lay.inverse()
    assert perm.shape == (lay.n_perm,) and inv.shape == (lay.n,)
    valid = perm >= 0
    assert valid.sum() == lay.n
    assert np.array_equal(np.sort(perm[valid]), np.arange(lay.n))
    assert np.array_equal(perm[inv], np.arange(lay.n))  # perm . inverse = id on positions
    slots = np.nonzero(valid)[0]
    assert np.array_equal(inv[perm[slots]], slots)  # inverse . perm = id on valid slots
    # The IR form of the permutation (used inside transformed masks) agrees with perm().
    orig = np.broadcast_to(num_eval(lay.original(Var("p")), {"p": np.arange(lay.n_perm)}),
                           perm.shape)
    assert np.array_equal(orig[valid], perm[valid])
    assert (orig[~valid] >= lay.n).all()


def _block_truth_unsound(ref_perm, cls, bm, bn):
    """Unsound blocks of a permuted grid (every grid slot is a real slot; padding slots are
    masked pairs, and the grid's own padding is beyond n_perm)."""
    H, rows, cols = ref_perm.shape
    kept, masked, padded = block_truth(ref_perm, rows, cols, bm, bn)
    return ((cls == EMPTY) & kept) | ((cls == FULL) & (masked | padded))


def _check_layout(name, args, lay, *, n, heads, q_len, bm, bn):
    ir = _simplified(name, args)
    ref = evaluate(LIB, name, n=n, heads=heads, q_len=q_len, args=args).mask.numpy()
    bmir = build(ir, n=n, heads=heads, q_len=q_len, schedule=Schedule(bm, bn), layout=lay)
    dense = bmir.to_dense()
    perm = lay.perm()
    valid = perm >= 0
    back = np.zeros((heads, n, n), dtype=bool)  # over all n queries, then the last q_len
    if lay.moves_queries():
        assert dense.shape == (heads, lay.n_perm, lay.n_perm)
        assert not dense[:, ~valid, :].any() and not dense[:, :, ~valid].any()
        slots = np.nonzero(valid)[0]
        orig = perm[slots]
        back[:, orig[:, None], orig[None, :]] = dense[:, slots[:, None], slots[None, :]]
        ref_perm = np.zeros_like(dense)
        ref_perm[:, slots[:, None], slots[None, :]] = ref[:, orig[:, None], orig[None, :]]
    else:
        assert dense.shape == (heads, q_len, lay.n_perm)
        assert not dense[:, :, ~valid].any()
        back[:, n - q_len:, perm[valid]] = dense[:, :, valid]
        ref_perm = np.zeros_like(dense)
        ref_perm[:, :, valid] = ref[:, :, perm[valid]]
    back = back[:, n - q_len:]
    diff = np.argwhere(back != ref)
    assert diff.size == 0, f"{lay.text()}: pairs differ at (h, row, k) {diff[:6].tolist()}"
    assert np.array_equal(dense, ref_perm)
    cls = bmir.block_classes()
    assert not _block_truth_unsound(ref_perm, cls, bm, bn).any()
    assert bmir.stats().kept_pairs == int(ref.sum())
    return bmir


DILATED = [
    # (window, dilation, n, (block_m, block_n))
    (5, 3, 97, (16, 16)),
    (16, 2, 256, (32, 32)),
    (64, 4, 300, (32, 64)),
    (7, 4, 513, (64, 32)),
    (40, 5, 250, (16, 64)),
    (3, 2, 10, (16, 16)),  # n below one block
]


@pytest.mark.parametrize("window,dilation,n,blocks", DILATED)
def test_dilated_layouts_keep_pairs(window, dilation, n, blocks):
    bm, bn = blocks
    args = {"window": window, "dilation": dilation}
    for lay in _layouts(_simplified("dilated", args), n, bm, bn, "diagonal"):
        assert lay.d == dilation and lay.n == n
        assert lay.seg % bm == 0 and lay.seg % bn == 0 and lay.seg * lay.d >= n
        _check_bijection(lay)
        _check_layout("dilated", args, lay, n=n, heads=1, q_len=n, bm=bm, bn=bn)


SHARDS = [
    # (args, n, q_len, (block_m, block_n)); the shard block is smaller than block_n
    ({"stride": 4, "block": 16, "local": 20}, 300, 300, (32, 64)),
    ({"stride": 3, "block": 8, "local": 0}, 257, 100, (16, 32)),
    ({"stride": 8, "step": 1, "block": 16, "local": 50}, 200, 200, (64, 32)),
    ({"stride": 2, "step": 3, "block": 32, "local": 10}, 130, 64, (16, 64)),
    ({"stride": 4, "block": 64, "local": 30}, 300, 300, (64, 64)),  # block == block_n
]


@pytest.mark.parametrize("args,n,q_len,blocks", SHARDS)
def test_shard_layouts_keep_pairs(args, n, q_len, blocks):
    bm, bn = blocks
    for lay in _layouts(_simplified("shards", args), n, bm, bn, "key_classes"):
        assert lay.d == args["stride"] and lay.block == args["block"]
        assert lay.seg % bn == 0
        _check_bijection(lay)
        _check_layout("shards", args, lay, n=n, heads=3, q_len=q_len, bm=bm, bn=bn)


@pytest.mark.parametrize("kind,d,block,n", [
    ("diagonal", 4, 1, 1000), ("diagonal", 3, 1, 1), ("diagonal", 7, 1, 129),
    ("key_classes", 8, 16, 1000), ("key_classes", 3, 64, 65), ("key_classes", 5, 8, 7),
])
def test_perm_and_inverse_are_bijections(kind, d, block, n):
    if kind == "diagonal":
        lay = L.Layout("diagonal", d, L._segment(-(-n // d), 64), n)
    else:
        pattern_blocks = -(-n // block)
        per_class = -(-pattern_blocks // d) * block
        lay = L.Layout("key_classes", d, L._segment(per_class, 64), n, block)
    _check_bijection(lay)
    other = L.for_length(lay, 2 * n + 3, 64, 64)
    assert (other.kind, other.d, other.block, other.n) == (kind, d, block, 2 * n + 3)
    _check_bijection(other)


def _dilated_kept(n, window, dilation):
    q = np.arange(n)
    return int(np.minimum(window, q // dilation + 1).sum())


def test_dilated_layout_visits_fewer_mostly_full_blocks():
    n, window, dilation = 8192, 512, 4
    args = {"window": window, "dilation": dilation}
    ir = _simplified("dilated", args)
    sched = Schedule(128, 128)
    (lay,) = _layouts(ir, n, 128, 128, "diagonal")
    ident = build(ir, n=n, heads=1, schedule=sched).materialize()
    perm = build(ir, n=n, heads=1, schedule=sched, layout=lay)
    csr = perm.materialize()
    ident_partial, ident_full = int(ident.kv_num_blocks.sum()), int(ident.full_kv_num_blocks.sum())
    partial, full = int(csr.kv_num_blocks.sum()), int(csr.full_kv_num_blocks.sum())
    # Measured: identity 952 blocks, all partial; layout 280 blocks, 168 of them full.
    assert ident_full == 0 and ident_partial > 900
    assert partial + full <= 0.35 * (ident_partial + ident_full)
    assert full >= 0.55 * (partial + full)
    assert perm.stats().kept_pairs == _dilated_kept(n, window, dilation)
    # The auto layout stage picks it.
    from attnc.compiler.stages import compile_pattern

    c = compile_pattern(LIB.pattern("dilated"), args, n=n, heads=1, schedule=sched)
    assert c.layout is not None and c.layout.kind == "diagonal" and c.layout.d == dilation
