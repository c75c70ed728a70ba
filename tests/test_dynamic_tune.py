"""Dynamic candidates in the head tuner: vertical-slash and block top-k selections on captured
Q and K (against attnc.reference given the same scores), their signals and densities, apply()
with dynamic cells, and a tuning run that chooses them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnc.autotune import apply as ap  # noqa: E402
from attnc.autotune import dynamic as dyn  # noqa: E402
from attnc.autotune import latency, signals  # noqa: E402
from attnc.autotune.candidates import Candidate, candidate, valid_at  # noqa: E402
from attnc.autotune.capture import capture  # noqa: E402
from attnc.compiler.numeric import NumericError  # noqa: E402
from attnc.compiler.numeric import evaluate as num_eval  # noqa: E402
from attnc.dsl.check import loads  # noqa: E402
from attnc.dsl.parser import parse_expr  # noqa: E402

from attnc import reference  # noqa: E402

# Per-head budgets, selections that are not all forced (n = 300: 30 first columns and the 100
# nearest diagonals always kept), and block top-k with a partial last block.
CASES = [
    candidate("vertical_slash", vertical="33 + h", slash="100 + 3 * h", last_q="9"),
    candidate("vertical_slash", vertical="n // 8", slash="n // 2", last_q="64"),
    candidate("block_topk", topk="1 + h", block="16"),
    candidate("block_topk", topk="3", block="7"),
]


def _ref(c: Candidate, scores: torch.Tensor, n: int, q_len: int) -> torch.Tensor:
    """The reference mask [H, q_len, n] given logits, intersected with causal."""
    ev = reference.evaluate(loads(""), c.family, n=n, heads=scores.shape[0], q_len=q_len,
                            scores=scores, args={k: parse_expr(v) for k, v in c.args})
    return ev.mask & (torch.arange(n).view(1, -1) <= ev.q_positions.view(-1, 1))


@pytest.mark.parametrize("q_len", [300, 211])
def test_dynamic_selection_matches_reference(q_len):
    """Fresh random Q and K, GQA, queries at the end of the keys: every head's mask and its
    kept pairs (closed forms, and row chunks for block top-k after a cache) equal the
    reference's given the same logits."""
    H, G, n, D = 4, 2, 300, 16
    q = torch.randn(H, q_len, D)
    k = torch.randn(G, n, D)
    scale = D ** -0.5
    logits = (q.double() @ k.double().repeat_interleave(H // G, 0).transpose(-1, -2)) * scale
    rows = np.arange(n - q_len, n)
    for c in CASES:
        assert c.dynamic and c.input_dependent and not c.gated
        sel = dyn.Selection(q, k, scale)
        ref = _ref(c, logits, n, q_len)
        for h in range(H):
            m = dyn.mask_rows(c.ir(), sel, rows, h)
            assert (m == ref[h].numpy()).all(), (c, h)
            causal = (n * (n + 1) - (n - q_len) * (n - q_len + 1)) / 2
            assert dyn.pair_density(c.ir(), sel, h) == pytest.approx(
                float(ref[h].sum()) / causal, abs=1e-12), (c, h)
        # The selection is not trivial: some causal pair is dropped on every head.
        assert all(bool((~ref[h] & (torch.arange(n).view(1, -1)
                                     <= torch.from_numpy(rows).view(-1, 1))).any())
                   for h in range(H))


def test_dynamic_selection_of_other_forms():
    """A pattern outside the two library forms (columns only, or'ed with a static term) goes
    through the numeric evaluator's selector hook, and agrees with the reference too."""
    from attnc.compiler.ir import PatternIR
    from attnc.compiler.lower import lower_pattern
    from attnc.compiler.rules import rewrite

    prog = loads("pattern cols(c: int = 35) {\n    mask causal & (k in top_columns(c, 16) | "
                 "q - k < 3)\n}\n")
    low = lower_pattern(prog.pattern("cols"), {})
    ir = PatternIR(low.name, rewrite(low.mask))
    H, G, n, D = 2, 1, 200, 8
    q, k = torch.randn(H, n, D), torch.randn(G, n, D)
    logits = (q.double() @ k.double().repeat_interleave(H, 0).transpose(-1, -2)) * D ** -0.5
    ref = reference.evaluate(prog, "cols", n=n, heads=H, scores=logits).mask
    ref = ref & (torch.arange(n).view(1, -1) <= torch.arange(n).view(-1, 1))
    sel = dyn.Selection(q, k, D ** -0.5)
    assert dyn._form(ir) is None
    for h in range(H):
        assert (dyn.mask_rows(ir, sel, np.arange(n), h) == ref[h].numpy()).all()
        assert dyn.pair_density(ir, sel, h) == pytest.approx(
            float(ref[h].sum()) / (n * (n + 1) / 2), abs=1e-12)


def test_selector_hook_of_the_numeric_evaluator():
    c = CASES[0]
    with pytest.raises(NumericError, match="needs run-time data"):
        num_eval(c.ir().mask, {"q": np.zeros((1, 1)), "k": np.zeros((1, 1)), "h": 0, "n": 4})
    assert dyn.supported(c.ir()) and not dyn.supported(candidate("streaming").ir())
    assert [s.kind for s in dyn.selectors(c.ir())] == ["in_columns", "in_diagonals"]


def test_dynamic_candidates_are_valid_by_their_arguments():
    assert valid_at(candidate("vertical_slash", vertical="n // 64", slash=8, last_q=64), 4096)
    assert not valid_at(candidate("block_topk", topk="n // 4096 - 1", block=64), 2048)


def test_dynamic_signals_match_brute_force(tiny, ids):
    """Signals and per-layer densities of dynamic candidates are those of the reference's
    mask given the captured layer's own logits."""
    cap = capture(tiny, ids)
    n = 80
    cands = [Candidate("causal"),
             candidate("vertical_slash", vertical=3, slash=5, last_q=8),
             candidate("block_topk", topk=2, block=16)]
    # Budgets under the forced columns and diagonals would select nothing: use the builtins'
    # defaults shrunk through the language instead.
    cands[1] = Candidate("vertical_slash", (("vertical", "31"), ("slash", "2"), ("last_q", "8")))
    sig = signals.compute([cap], cands, rows=n, chunk=16)
    assert np.isnan(sig.layer_density[..., 0]).all()
    for layer in range(2):
        lc = cap.layers[layer]
        logits = torch.stack([(lc.q[h] @ lc.k[h // 2].T).double() * cap.scaling
                              for h in range(4)])
        for ci in (1, 2):
            ref = _ref(cands[ci], logits, n, n)
            for h in range(4):
                A = torch.softmax(logits[h].masked_fill(
                    ~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf")), -1)
                M = ref[h]
                mass = (A * M).sum(-1)
                V = lc.v[h // 2].double()
                oc = ((A * M) @ V) / mass.unsqueeze(-1)
                err = float((oc - A @ V).norm() / (A @ V).norm())
                assert sig.mass[0, layer, h, ci] == pytest.approx(float(mass.mean()), abs=1e-4)
                assert sig.error[0, layer, h, ci] == pytest.approx(err, rel=1e-3, abs=1e-5)
                want = float(M.sum()) / (n * (n + 1) / 2)
                assert sig.cell_density(0, layer, h, ci) == pytest.approx(want, abs=1e-12)
    assert (sig.error[..., 1:] > 0).any()


def test_dynamic_latency_from_records(tmp_path):
    """Without records: the block model, growing with density. With dynamic records: the
    family's line in kept pairs at its n, the nearest recorded n's line elsewhere."""
    import json

    m = latency.LatencyModel(head_dim=64)
    c = CASES[1]
    assert m.source(c, 4096) == "dynamic-modelled"
    assert 0 < m.input_ms(c, 4096, 0.1) < m.input_ms(c, 4096, 0.3) == m.dynamic_ms(4096, 0.3)
    recs = [{"kind": "dynamic", "family": "vertical_slash", "n": 4096, "heads": 9,
             "head_dim": 64, "dtype": "float16", "device": "GPU X", "kept_pairs": kp,
             "ms": 0.3 + 2e-8 * kp} for kp in (1e6, 4e6, 9e6)]
    (tmp_path / "dynamic.json").write_text(json.dumps(recs))
    m = latency.LatencyModel.from_records(tmp_path, head_dim=64, dtype="float16")
    assert m.records == [] and len(m.dynamic_records) == 3
    assert m.source(c, 4096) == "dynamic-measured" and m.source(c, 8192) == "dynamic-nearest-n"
    assert m.source(CASES[2], 4096) == "dynamic-modelled"  # block top-k has no records
    pairs = 0.2 * 4096 * 4097 / 2
    assert m.input_ms(c, 4096, 0.2) == pytest.approx(0.3 / 9 + 2e-8 * pairs, rel=1e-6)
    pairs8 = 0.2 * 8192 * 8193 / 2
    assert m.input_ms(c, 8192, 0.2) == pytest.approx(0.3 / 9 + 2e-8 * pairs8, rel=1e-6)
    with pytest.raises(ValueError, match="dynamic record lacks"):
        (tmp_path / "bad.json").write_text(json.dumps({"kind": "dynamic", "n": 1}))
        latency.load_dynamic_records(tmp_path)


def _plan(last: str, layers: int = 2) -> str:
    return (f"plan p(layers = {layers}, heads = 4, kv_heads = 2) {{\n"
            f"    layers {layers - 1}: {last}\n    default: causal\n}}\n")


def test_apply_with_dynamic_cells(tiny, ids):
    """apply() runs the selectors on each layer's own Q and K: with dense layers before it,
    the last layer's kept pairs are the reference's on the captured logits; budgets that keep
    everything give dense perplexity; a small budget changes it."""
    from attnc import gate_api

    n = ids.shape[1]
    dense = ap.perplexity(tiny, ids)
    cap = capture(tiny, ids)
    lc = cap.layers[1]
    logits = torch.stack([(lc.q[h] @ lc.k[h // 2].T).double() * cap.scaling for h in range(4)])
    for c in (Candidate("vertical_slash", (("vertical", "31"), ("slash", "2"),
                                           ("last_q", "8"))),
              candidate("block_topk", topk=2, block=16)):
        masks = gate_api.apply(tiny, _plan(c.call_text()), stats=True)
        try:
            ppl = ap.perplexity(tiny, ids)
        finally:
            ap.remove(tiny)
        ref = _ref(c, logits, n, n)
        for h in range(4):
            kept = masks.stats[(1, h)][0]
            assert kept == float(ref[h].sum()), (c, h)
        assert masks.stats[(0, 0)][0] == n * (n + 1) / 2
        assert ppl != pytest.approx(dense, rel=1e-6)
    everything = "vertical_slash(vertical = n, slash = n, last_q = 8)"
    gate_api.apply(tiny, _plan(everything))  # no stats, no gates: still the dynamic path
    try:
        assert ap.perplexity(tiny, ids) == pytest.approx(dense, rel=1e-5)
    finally:
        ap.remove(tiny)
    with pytest.raises(ValueError, match="segment ids"):
        gate_api.apply(tiny, _plan("document"))


def test_autotune_chooses_dynamic_candidates(tiny, tmp_path):
    """Only dense and dynamic candidates under a latency budget dense cannot meet: the plan
    has dynamic cells, round-trips, and its perplexity is what apply() gives."""
    from attnc.autotune import planio

    import attnc

    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 256, (1200,), generator=g)
    held = torch.randint(0, 256, (600,), generator=g)
    # Lengths where the grid's budgets (30 + n // 64 columns, 100 + n // 32 diagonals, ...)
    # drop pairs.
    res = attnc.autotune(tiny, calib, heldout_ids=held, lengths=(256, 384), validation_length=512,
                         trials=3, rows=32, block=16, workdir=tmp_path, name="tiny",
                         families=["vertical_slash", "block_topk"], max_ppl_increase=None,
                         latency_budget=0.7)
    rep = res.report
    assert rep["latency_model"]["sources"] == {"default": 1, "dynamic-modelled": 9}
    fams = {c.family for c in res.cells.values()}
    assert fams & {"vertical_slash", "block_topk"} and rep["chosen"]["latency"] <= 0.7 + 1e-9
    cells = [r for r in rep["cells"] if r["family"] != "causal"]
    assert cells and all(0 < r["density"] < 1 for r in cells)
    assert planio.cells(attnc.loads(res.plan_text).plan("tiny")) == \
        {c: x.call_text() for c, x in res.cells.items()}
    masks = attnc.apply(tiny, res.plan_text, stats=True)
    try:
        ppl = ap.perplexity(tiny, held[:512])
    finally:
        ap.remove(tiny)
    assert ppl == pytest.approx(rep["chosen"]["heldout_ppl"], rel=1e-5)
    assert masks.density()[0] == pytest.approx(rep["chosen"]["heldout_density"], rel=1e-9)
