"""Launch autotuning (codegen.tune) under the interpreter: failed candidates score infinitely
slow, the winner is stored atomically as a tuning record that autotune.latency can read, and a
stored record is reused without timing again."""

from __future__ import annotations

import json
import math

import pytest
import torch
from attnc.compiler.blockmask import Schedule, build
from attnc.compiler.lower import lower

import attnc

tune = pytest.importorskip("attnc.codegen.tune")
LIB = attnc.loads("")


def _problem():
    ir = lower(LIB, "streaming", {"sink": 2, "window": 12})
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    return ir, (lambda s: build(ir, n=40, heads=2, schedule=s)), q, k, v


def test_failed_candidate_is_infinitely_slow_and_winner_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors: the interpreter, also on a GPU host
    ir, make_bm, q, k, v = _problem()
    times = iter([3.0, 1.0])
    monkeypatch.setattr(tune, "_time", lambda fn, rep: (fn(), next(times))[1])
    # 24 is no power of two: Triton cannot build the tile, so that candidate must fail.
    cands = [(16, 16, 4, 2), (24, 16, 4, 2), (32, 16, 4, 2)]
    bm, cfg, rec = tune.autotune(make_bm, q, k, v, candidates=cands, directory=tmp_path,
                                 pattern_key=ir.key)
    by = {(t.block_m, t.block_n): t for t in rec.trials}
    assert math.isinf(by[(24, 16)].ms) and by[(24, 16)].error
    assert (rec.best.block_m, rec.best.block_n) == (32, 16) and rec.best.ms == 1.0
    assert bm.schedule == Schedule(32, 16) and cfg == tune.kernel.Config(4, 2)
    files = list(tmp_path.glob("*.json"))
    assert [f.stem for f in files] == [rec.key]
    d = json.loads(files[0].read_text())
    assert d["ms"] == 1.0 and d["block_m"] == 32 and d["pattern_key"] == ir.key
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file

    latency = pytest.importorskip("attnc.autotune.latency")
    recs = latency.load_records(tmp_path)
    assert len(recs) == 1 and recs[0].ms == 1.0 and recs[0].visited_blocks == rec.visited_blocks


def test_stored_record_is_reused_without_timing(tmp_path, monkeypatch):
    _, make_bm, q, k, v = _problem()
    monkeypatch.setattr(tune, "_time", lambda fn, rep: 2.0)
    _, _, first = tune.autotune(make_bm, q, k, v, candidates=[(16, 16, 4, 2)],
                                directory=tmp_path)

    def no_timing(fn, rep):
        raise AssertionError("a stored record must be reused")

    monkeypatch.setattr(tune, "_time", no_timing)
    bm, cfg, again = tune.autotune(make_bm, q, k, v, candidates=[(16, 16, 4, 2)],
                                   directory=tmp_path)
    assert again.key == first.key and again.best == first.best
    # Asked about a candidate the record never timed: tuned again.
    monkeypatch.setattr(tune, "_time", lambda fn, rep: 1.5)
    _, _, third = tune.autotune(make_bm, q, k, v, candidates=[(16, 16, 4, 2), (32, 16, 4, 2)],
                                directory=tmp_path)
    assert [t.label() for t in third.trials] == ["16x16/w4/s2", "32x16/w4/s2"]
    # A different workload (another length) is a different key: it is tuned afresh.
    assert tune.workload_key(make_bm(Schedule()), q, k) == first.key
    q2 = torch.randn(1, 2, 40, 16, dtype=torch.float16)
    assert tune.workload_key(make_bm(Schedule()), q2, k) != first.key


def test_unreadable_record_means_tune_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors: the interpreter, also on a GPU host
    _, make_bm, q, k, v = _problem()
    monkeypatch.setattr(tune, "_time", lambda fn, rep: 2.0)
    _, _, rec = tune.autotune(make_bm, q, k, v, candidates=[(16, 16, 4, 2)],
                              directory=tmp_path)
    (tmp_path / f"{rec.key}.json").write_text("{ truncated")
    assert tune.load_record(rec.key, tmp_path) is None
    _, _, again = tune.autotune(make_bm, q, k, v, candidates=[(16, 16, 4, 2)],
                                directory=tmp_path)
    assert tune.load_record(again.key, tmp_path) is not None


def test_launch_options_are_tuned_stored_and_reused(tmp_path, monkeypatch):
    """TMA and one-loop candidates run (the interpreter runs tensor descriptors), the winner's
    options are stored in the record and come back as its Config."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _, make_bm, q, k, v = _problem()
    times = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(tune, "_time", lambda fn, rep: (fn(), next(times))[1])
    cands = [tune.parse_candidate(c) for c in ("16x16x4x2", "16x16x4x2+tma+one",
                                               "16x16x4x2+tma2")]
    _, cfg, rec = tune.autotune(make_bm, q, k, v, candidates=cands, directory=tmp_path)
    assert cfg == tune.kernel.Config(4, 2, tma=1, one_loop=True)
    assert [t.label() for t in rec.trials] == ["16x16/w4/s2", "16x16/w4/s2/tma+one",
                                               "16x16/w4/s2/tma2"]
    assert all(math.isfinite(t.ms) for t in rec.trials)
    monkeypatch.setattr(tune, "_time", lambda fn, rep: pytest.fail("must reuse the record"))
    _, cfg2, again = tune.autotune(make_bm, q, k, v, candidates=cands, directory=tmp_path)
    assert cfg2 == cfg and again.best == rec.best


def test_candidate_spelling():
    assert tune.parse_candidate("128x64x8x3") == (128, 64, 8, 3)
    assert tune.parse_candidate("128x64x8x3+tma") == (128, 64, 8, 3, 1, False)
    assert tune.parse_candidate("64x64x4x3+one") == (64, 64, 4, 3, 0, True)
    for bad in ("128x64x8", "128x64x8x3+tma+tma2", "128x64x8x3+fast", "axbxcxd"):
        with pytest.raises(ValueError, match="want BMxBNxWARPSxSTAGES"):
            tune.parse_candidate(bad)
    # Without a Hopper GPU the TMA candidates are not offered by default.
    assert tune.default_candidates(torch.zeros(1)) == tune.CANDIDATES
