"""Learned gates: pooling, the gate module, selection against attnc.reference, distillation on a
tiny Llama, safetensors weights and their checks, apply(), and the kernel path (interpreter)."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from attnc.codegen.gate import BlockGate, block_keep, eligible, pool3
from attnc.compiler.blockmask import Schedule, build
from attnc.compiler.lower import lower

import attnc
from attnc import reference

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from attnc.autotune import gate_train as gt  # noqa: E402
from attnc.autotune.model import tiny_llama  # noqa: E402

from attnc import gate_api as ga  # noqa: E402

LIB = attnc.loads("")
SRC = """
pattern gate_only(b: int = 16, t: int = 3, thr: float = 0.0) { mask gate(b, t, thr) }
pattern gate_nc(b: int = 16, t: int = 3) { mask gate(b, t, 0.0, false) }
"""
PROG = attnc.loads(SRC)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- pooling and the module


@pytest.mark.parametrize("start,L,block", [(0, 37, 8), (5, 30, 8), (16, 16, 16), (3, 1, 4)])
def test_pool3_is_avg_max_min_over_absolute_blocks(start, L, block):
    x = torch.randn(2, L, 5, generator=_gen(L))
    nb = -(-(start + L) // block)
    p = pool3(x, block, start=start)
    assert p.shape == (2, nb, 15)
    for b in range(nb):
        lo, hi = max(b * block, start) - start, min((b + 1) * block, start + L) - start
        if hi <= lo:
            assert (p[:, b] == 0).all()
            continue
        seg = x[:, lo:hi]
        torch.testing.assert_close(p[:, b], torch.cat([seg.mean(1), seg.amax(1), seg.amin(1)],
                                                      -1))


def test_gate_scores_are_a_distribution_over_eligible_blocks():
    H, G, D, n, blk = 4, 2, 8, 70, 16
    g = BlockGate(H, G, D, blk, d_gate=12, init="random", seed=3)
    q = torch.randn(H, n, D, generator=_gen(1))
    k = torch.randn(G, n, D, generator=_gen(2))
    s = g(q, k)
    nb = -(-n // blk)
    assert s.shape == (H, nb, nb)
    el = eligible(nb, blk, 0, n)
    assert (s[:, ~el] == 0).all() and (s[:, el] > 0).all()
    torch.testing.assert_close(s.sum(-1), torch.ones(H, nb))
    # Decode-style queries (the last 20 of 70): rows without queries select nothing.
    s2 = g(q[:, -20:], k)
    assert (s2[:, : (n - 20) // blk] == 0).all()
    torch.testing.assert_close(s2[:, -1], s[:, -1])  # the last block holds the same queries
    # GQA: query heads share their KV head's pooled keys (same weights give the same scores).
    with torch.no_grad():
        g.wq[1] = g.wq[0]
        g.wk[1] = g.wk[0]
        g.wq[2] = g.wq[0]
        g.wk[2] = g.wk[0]
    q2 = q.clone()
    q2[1] = q2[0]
    q2[2] = q2[0]
    s3 = g(q2, k)
    torch.testing.assert_close(s3[0], s3[1])
    assert not torch.allclose(s3[0], s3[2])  # head 2 reads KV head 1


def test_pooled_init_is_the_mean_pooled_block_score():
    H, D, n, blk = 2, 8, 64, 16
    g = BlockGate(H, H, D, blk, d_gate=D, init="pooled")
    with torch.no_grad():
        g.wq.zero_()
        g.wk.zero_()
        g.wq[:, :D] = torch.eye(D)
        g.wk[:, :D] = torch.eye(D)
    q, k = torch.randn(H, n, D, generator=_gen(4)), torch.randn(H, n, D, generator=_gen(5))
    qm, km = q.view(H, 4, blk, D).mean(2), k.view(H, 4, blk, D).mean(2)
    logits = qm @ km.transpose(1, 2) / D ** 0.5
    want = torch.softmax(logits.masked_fill(~eligible(4, blk, 0, n), float("-inf")), -1)
    torch.testing.assert_close(g(q, k), want)


def test_one_block_gate_is_a_per_head_scalar_for_duo():
    H, D, n = 3, 8, 96
    g = BlockGate(H, H, D, 0, d_gate=8, init="random", seed=1)
    with torch.no_grad():
        g.bias.copy_(torch.tensor([6.0, -6.0, 6.0]))
    q, k = torch.randn(H, n, D, generator=_gen(6)), torch.randn(H, n, D, generator=_gen(7))
    s = g(q, k)
    assert s.shape == (H, 1, 1) and ((s > 0) & (s < 1)).all()
    assert (s.view(-1) >= 0.5).tolist() == [True, False, True]
    ev = reference.evaluate(LIB, "duo", n=n, heads=H, args={"sink": 4, "window": 8},
                            gates={n: s})
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    streaming = reference.evaluate(LIB, "streaming", n=n, args={"sink": 4, "window": 8}).mask[0]
    assert torch.equal(ev.mask[0], causal) and torch.equal(ev.mask[2], causal)
    assert torch.equal(ev.mask[1], streaming & causal)


# ---------------------------------------------------------------- selection = the reference


def _expand(keep: torch.Tensor, n: int, blk: int, q_start: int) -> torch.Tensor:
    qb = torch.arange(q_start, n) // blk
    kb = torch.arange(n) // blk
    return keep[:, qb.view(-1, 1), kb.view(1, -1)]


@pytest.mark.parametrize("n,q_len,blk,topk,thr", [(100, 100, 16, 3, 0.0), (100, 37, 16, 2, 0.0),
                                                  (64, 64, 8, 0, 0.12), (80, 80, 16, 4, 0.1)])
def test_selection_equals_the_reference(n, q_len, blk, topk, thr):
    H = 3
    nb = -(-n // blk)
    s = torch.rand(H, nb, nb, generator=_gen(n + topk))
    s[:, :, 1] = s[:, :, 0]  # exact ties go to the lower key block
    s[0, 3] = 0.5
    ev = reference.evaluate(PROG, "gate_only", n=n, heads=H, q_len=q_len,
                            args={"b": blk, "t": topk, "thr": thr}, gates=s)
    el = eligible(nb, blk, n - q_len, q_len)
    ours = _expand(block_keep(s, el, topk, thr), n, blk, n - q_len)
    assert torch.equal(ours, ev.mask)
    assert ev.mask.any()


def test_selection_without_causality():
    n, H, blk = 64, 2, 16
    s = torch.rand(H, 4, 4, generator=_gen(9))
    ev = reference.evaluate(PROG, "gate_nc", n=n, heads=H, args={"b": blk, "t": 2}, gates=s)
    ours = _expand(block_keep(s, eligible(4, blk, 0, n, causal=False), 2, 0.0), n, blk, 0)
    assert torch.equal(ours, ev.mask)


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama whose attention is peaked (scaled Q/K projections), so block maps carry
    structure a gate can learn, and token ids for it."""
    torch.manual_seed(0)
    m = tiny_llama(layers=2, heads=4, kv_heads=2, hidden=64)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(12)
            layer.self_attn.k_proj.weight.mul_(12)
    ids = torch.randint(0, 256, (1024,), generator=_gen(0))
    return m, ids


@pytest.fixture(scope="module")
def trained(tiny):
    m, ids = tiny
    return gt.train_gate(m, ids[:768], block=16, d_gate=16, length=256, sequences=3, steps=60,
                         lr=1e-2, heldout_ids=ids[768:], early_stop=False)


def test_block_targets_are_max_pooled_and_renormalised():
    H, n, D, blk = 2, 48, 8, 16
    q, k = torch.randn(H, n, D, generator=_gen(11)), torch.randn(1, n, D, generator=_gen(12))
    t = gt.block_targets(q, k, blk, 0.5, rows=16)
    logits = (q @ k[0].T * 0.5).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(),
                                           float("-inf"))
    p = torch.softmax(logits, -1).view(H, 3, blk, 3, blk).amax(dim=(2, 4))
    torch.testing.assert_close(t, p / p.sum(-1, keepdim=True))


def test_training_reduces_kl_and_beats_random(tiny, trained):
    m, ids = tiny
    hist = trained.history
    assert len(hist) == 61 and hist[-1] < hist[0]
    before, after = trained.heldout
    held = gt.collect(m, [ids[768:1024]], 16, gates=trained.gates)
    kl = gt.evaluate_kl(trained.gates, held)
    assert abs(kl - after) < 1e-5
    assert kl < gt.random_kl(trained.gates, held)
    assert trained.gates.cells == [(ly, h) for ly in range(2) for h in range(4)]


def test_early_stopping_keeps_the_best_held_out_step(tiny):
    m, ids = tiny
    r = gt.train_gate(m, ids[:512], block=16, d_gate=16, length=256, sequences=2, steps=50,
                      lr=3e-2, heldout_ids=ids[768:])
    steps = [s for s, _ in r.val_curve]
    assert steps == [0, 25, 50]
    best = min(r.val_curve, key=lambda sv: sv[1])
    assert r.best_step == best[0]
    assert r.heldout[0] == pytest.approx(r.val_curve[0][1], rel=1e-6)
    assert r.heldout[1] == pytest.approx(best[1], rel=1e-5)


def test_cosine_schedule_decays_the_learning_rate_to_zero(tiny, monkeypatch):
    """schedule="cosine": Adam's rate follows lr * (1 + cos(pi * step / steps)) / 2 over the
    steps (constant otherwise); the gate file's metadata records it; others are refused."""
    m, ids = tiny
    seen = []
    step = torch.optim.Adam.step

    def spy(self, *a, **kw):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    r = gt.train_gate(m, ids[:512], block=16, d_gate=16, length=256, sequences=2, steps=8,
                      lr=1e-2, schedule="cosine", early_stop=False)
    want = [1e-2 * (1 + math.cos(math.pi * i / 8)) / 2 for i in range(8)]
    assert seen == pytest.approx(want) and r.gates.meta["train"]
    assert json.loads(r.gates.meta["train"])["schedule"] == "cosine"
    seen.clear()
    gt.train_gate(m, ids[:512], block=16, d_gate=16, length=256, sequences=2, steps=3,
                  lr=1e-2, early_stop=False)
    assert seen == [1e-2] * 3
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        gt.train_gate(m, ids[:512], block=16, length=256, steps=1, schedule="linear")


def test_gradient_weights_are_block_sums_of_the_output_gradient(tiny):
    """collect(grad=True): per layer, head and query block, the sum over the block's rows of
    |dL/do| for the sequence's next-token loss (the gradient capture() records); kl_loss with
    equal weights is the plain mean, and weights move it; train_gate(weighting=) uses them."""
    from attnc.autotune.capture import capture

    m, ids = tiny
    x = ids[:200]
    data = gt.collect(m, [x], 16, grad=True)
    cap = capture(m, x)
    for ly, lc in enumerate(cap.layers):
        r = torch.nn.functional.pad(lc.do.norm(dim=-1), (0, 208 - 200))
        want = r.view(4, 13, 16).sum(-1)
        torch.testing.assert_close(data[ly].weights()[0], want, rtol=1e-4, atol=1e-8)
    assert not any(p.requires_grad is False for p in m.parameters())  # restored
    assert gt.collect(m, [x], 16)[0].weights() is None
    gate = BlockGate(4, 2, 16, 16, 8, seed=0)
    pq, pk, t = data[0].stacked()
    plain = gt.kl_loss(gate, pq, pk, t)
    w = data[0].weights()
    torch.testing.assert_close(gt.kl_loss(gate, pq, pk, t, weight=torch.ones_like(w)), plain)
    torch.testing.assert_close(gt.kl_loss(gate, pq, pk, t, weight=3 * torch.ones_like(w)),
                               plain)
    assert not torch.isclose(gt.kl_loss(gate, pq, pk, t, weight=w), plain)
    r = gt.train_gate(m, ids[:512], block=16, d_gate=16, length=256, sequences=2, steps=3,
                      weighting="gradient", early_stop=False)
    assert json.loads(r.gates.meta["train"])["weighting"] == "gradient"
    assert r.history[-1] < r.history[0]
    with pytest.raises(ValueError, match="unknown weighting 'loss'"):
        gt.train_gate(m, ids[:512], block=16, length=256, steps=1, weighting="loss")


@pytest.mark.parametrize("density", [0.3, 0.6])
def test_calibrated_threshold_meets_the_block_density(tiny, trained, density):
    m, ids = tiny
    data = gt.collect(m, [ids[768:1024]], 16, gates=trained.gates)
    thr = gt.calibrate_threshold(trained.gates, data, density)
    kept = total = 0
    for ly in trained.gates.layers:
        g = trained.gates[ly]
        pq, pk, _ = data[ly].stacked()
        el = eligible(16, 16, 0, 256)
        with torch.no_grad():
            s = g.log_probs(pq[0], pk[0], el).exp()
        keep = block_keep(s, el, 0, thr) | torch.eye(16, dtype=torch.bool)
        kept += int(keep.sum())
        total += int(el.sum()) * 4
    assert kept / total <= density and kept / total > density - 0.05
    # The oracle's threshold does the same on the true block targets.
    othr = gt.calibrate_threshold(trained.gates, data, density, oracle=True)
    el = eligible(16, 16, 0, 256)
    okept = sum(int((block_keep(data[ly].target[0], el, 0, othr)
                     | torch.eye(16, dtype=torch.bool)).sum()) for ly in (0, 1))
    assert density - 0.05 < okept / total <= density


def test_train_for_a_plan_trains_its_gated_cells(tiny):
    m, ids = tiny
    plan = ("plan p(layers = 2, heads = 4, kv_heads = 2) {\n    layers 1 kv_heads 1: "
            "gated(block = 32, topk = 2)\n    default: causal\n}\n")
    r = gt.train_gate(m, ids, plan=plan, length=256, sequences=1, steps=3)
    assert r.gates.block == 32 and r.gates.cells == [(1, 2), (1, 3)] and r.gates.layers == [1]
    duo = "plan p(layers = 2, heads = 4, kv_heads = 2) {\n    default: duo(window = 32)\n}\n"
    with pytest.raises(NotImplementedError, match="one-block"):
        gt.train_gate(m, ids, plan=duo, length=256, sequences=1, steps=1)


# ---------------------------------------------------------------- weights


def test_safetensors_round_trip_and_refusals(tiny, trained, tmp_path):
    m, _ = tiny
    plan_path = tmp_path / "p.attn"
    plan_path.write_text("plan p(layers = 2, heads = 4, kv_heads = 2) {\n    default: "
                         "gated(block = 16, topk = 3)\n}\n")
    path = ga.save_gates(trained, ga.gates_path(plan_path))
    assert path.name == "p.gates.safetensors"
    gs = ga.load_gates(path, model=m, plan=str(plan_path))
    for ly in gs.layers:
        for name in ("wq", "wk", "bias", "dist"):
            assert torch.equal(getattr(gs[ly], name), getattr(trained.gates[ly], name))
    # Training moved the positional prior off its zero start.
    assert any(trained.gates[ly].dist.abs().max() > 0 for ly in gs.layers)
    assert gs.meta == trained.gates.meta and gs.block == 16 and gs.d_gate == 16
    # A file from before the prior (no dist tensors) loads with the prior at 0.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        old = {k: f.get_tensor(k) for k in f.keys() if not k.endswith(".dist")}  # noqa: SIM118
        meta = f.metadata()
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    gold = ga.load_gates(tmp_path / "old.safetensors", model=m)
    assert all(gold[ly].dist.abs().max() == 0 for ly in gold.layers)
    assert torch.equal(gold[gold.layers[0]].wq, trained.gates[gold.layers[0]].wq)
    other = tiny_llama(layers=2, heads=4, kv_heads=2, hidden=64, seed=1)
    with pytest.raises(attnc.AttncError, match="trained for model") as e:
        ga.load_gates(path, model=other)
    assert "\n" not in str(e.value)
    wrong_block = ("plan p(layers = 2, heads = 4, kv_heads = 2) {\n    default: "
                   "gated(block = 32)\n}\n")
    with pytest.raises(attnc.AttncError, match="block 16, plan 'p' uses block 32"):
        ga.load_gates(path, model=m, plan=wrong_block)
    bad = tmp_path / "x.safetensors"
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(bad))
    with pytest.raises(attnc.AttncError, match="not an attnc gate file"):
        ga.load_gates(bad)
    with pytest.raises(attnc.AttncError, match="no gate weights"):
        ga.load_gates(tmp_path / "missing.safetensors")


def test_plan_key_ignores_selection_parameters_but_not_cells(tiny, trained, tmp_path):
    m, _ = tiny
    path = ga.save_gates(trained, tmp_path / "g.safetensors")
    sub = ("plan p(layers = 2, heads = 4, kv_heads = 2) {\n    layers 1: gated(block = 16, "
           "topk = 1, threshold = 0.2)\n    default: causal\n}\n")
    assert ga.load_gates(path, model=m, plan=sub).cells == trained.gates.cells
    part = gt.train_gate(m, torch.arange(256) % 256, block=16, d_gate=8, length=256,
                         sequences=1, steps=1, plan=sub)
    p2 = ga.save_gates(part, tmp_path / "part.safetensors")
    full = ("plan p(layers = 2, heads = 4, kv_heads = 2) {\n    default: gated(block = 16)\n}"
            "\n")
    with pytest.raises(attnc.AttncError, match="do not cover plan 'p' \\(layer 0 head 0"):
        ga.load_gates(p2, model=m, plan=full)


# ---------------------------------------------------------------- apply


def test_apply_with_gates(tiny, trained, tmp_path):
    m, ids = tiny
    x = ids[:200].view(1, -1)
    with torch.no_grad():
        dense = m(x).logits
    plan = ("plan p(layers = 2, heads = 4, kv_heads = 2) {\n    layers 1: gated(block = 16, "
            "topk = 2)\n    default: streaming(sink = 4, window = 32)\n}\n")
    masks = ga.apply(m, plan, gates=trained, stats=True)
    try:
        with torch.no_grad():
            out = m(x).logits
    finally:
        ga.remove(m)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-3)
    d_all, b_all = masks.density("all")
    d_g, b_g = masks.density("gated")
    assert 0 < d_g < 1 and 0 < b_g < 1 and 0 < d_all < 1
    # Gated rows keep the top 2 blocks of 16 and their own block: at most 48 keys per query.
    kept = max(masks.stats[(1, h)][0] for h in range(4))
    assert kept <= 200 * 48
    # A gate keeping every block is dense attention; remove() restores the model.
    plan_file = tmp_path / "all.attn"
    plan_file.write_text("plan p(layers = 2, heads = 4, kv_heads = 2) {\n    default: "
                         "gated(block = 16, topk = 0)\n}\n")
    ga.save_gates(trained, ga.gates_path(plan_file))
    ga.apply(m, str(plan_file))  # weights found next to the plan
    try:
        with torch.no_grad():
            full = m(x).logits
    finally:
        ga.remove(m)
    torch.testing.assert_close(full, dense, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, dense)


# ---------------------------------------------------------------- fine-tuning


def test_finetune_forward_is_the_evaluated_selection(tiny, trained):
    """finetune_gate's attention (hard selection forward) gives the logits apply() gives for
    the gated plan at the same threshold, and its gradient reaches the gate weights."""
    from attnc.autotune.capture import use_attention
    from transformers import AttentionInterface

    m, ids = tiny
    x = ids[:200].view(1, -1)
    data = gt.collect(m, [ids[768:1024]], 16, gates=trained.gates)
    thr = gt.calibrate_threshold(trained.gates, data, 0.4)
    plan = ("plan p(layers = 2, heads = 4, kv_heads = 2) {\n    default: gated(block = 16, "
            f"topk = 0, threshold = {thr!r})\n}}\n")
    ga.apply(m, plan, gates=trained)
    try:
        with torch.no_grad():
            want = m(x).logits
    finally:
        ga.remove(m)
    gs = copy.deepcopy(trained.gates)
    for p in gs.parameters():
        p.requires_grad_(True)
    ft = gt._FineTune(gs, thr, 0.5)
    AttentionInterface.register("attnc_test_finetune", ft)
    with use_attention(m, "attnc_test_finetune"):
        got = m(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert 0 < ft.kept[0] / ft.kept[1] < 1
    # gated_perplexity is apply()'s perplexity and block density, without element masks.
    masks = ga.apply(m, plan, gates=trained, stats=True)
    try:
        ppl = ga.perplexity(m, x)
    finally:
        ga.remove(m)
    got_ppl, got_density = gt.gated_perplexity(m, trained, x, thr)
    assert got_ppl == pytest.approx(ppl, rel=1e-5)
    assert got_density == pytest.approx(masks.density("all")[1], rel=1e-6)
    # Threshold 0 keeps every block: the dense model's perplexity.
    assert gt.gated_perplexity(m, trained, x, 0.0) == pytest.approx(
        (ga.perplexity(m, x), 1.0), rel=1e-5)
    got.float().logsumexp(-1).sum().backward()
    assert all(g.wq.grad is not None and g.wq.grad.abs().sum() > 0
               for g in gs.layer_gates.values())


def test_finetune_lowers_the_gated_models_kl_at_a_fixed_density(tiny, trained):
    """On one chunk, at a block density held by recalibrating every step, fine-tuning lowers
    the gated model's KL to the dense model; the model is left untouched and the gates
    frozen; bad settings are refused."""
    m, ids = tiny
    before = [p.detach().clone() for p in m.parameters()]
    gs = copy.deepcopy(trained.gates)
    r = gt.finetune_gate(m, gs, [ids[0:256]], density=0.3, steps=40, lr=3e-4, tau=0.5,
                         calib_chunks=1)
    kl = [h["kl"] for h in r.history]
    assert sum(kl[-10:]) / 10 < 0.99 * kl[0]
    assert all(abs(h["block_density"] - 0.3) < 0.03 for h in r.history)
    assert len(r.thresholds) == 40 and r.gates is gs
    assert json.loads(gs.meta["train"])["finetune"]["steps"] == 40
    assert not any(p.requires_grad for p in gs.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
    assert all(p.requires_grad for p in m.parameters())
    # Early stopping on held-out tokens keeps the weights of the best checked step.
    gs = copy.deepcopy(trained.gates)
    r = gt.finetune_gate(m, gs, [ids[0:256], ids[256:512]], density=0.3, steps=12, lr=3e-3,
                         calib_chunks=1, val_ids=ids[768:1024], check_every=4)
    assert [s for s, _ in r.val_curve] == [0, 4, 8, 12]
    best = min(r.val_curve, key=lambda sv: sv[1])
    assert r.best_step == best[0]
    thr = gt.calibrate_threshold(gs, gt.collect(m, [ids[0:256]], 16, gates=gs), 0.3)
    assert gt.gated_perplexity(m, gs, ids[768:1024], thr)[0] == pytest.approx(best[1], rel=1e-4)
    with pytest.raises(ValueError, match="density"):
        gt.finetune_gate(m, gs, [ids[0:256]], density=1.5)
    with pytest.raises(ValueError, match="at least one chunk"):
        gt.finetune_gate(m, gs, [], density=0.3)


def test_apply_refuses_gates_of_another_model(trained):
    other = tiny_llama(layers=2, heads=4, kv_heads=2, hidden=64, seed=2)
    plan = "plan p(layers = 2, heads = 4, kv_heads = 2) {\n    default: gated(block = 16)\n}\n"
    with pytest.raises(attnc.AttncError, match="another model"):
        ga.apply(other, plan, gates=trained)


# ---------------------------------------------------------------- kernel path


def _kernel_case(device: str, dtype=torch.float32):
    from attnc.codegen import dynamic as dyn

    H, Hkv, n, q_len, D, blk = 4, 2, 96, 80, 16, 16
    g = _gen(21)
    q = torch.randn(1, H, q_len, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, n, D, generator=g).to(dtype)
    v = torch.randn(1, Hkv, n, D, generator=g).to(dtype)
    gate = BlockGate(H, Hkv, D, blk, d_gate=8, init="random", seed=4)
    with torch.no_grad():
        scores = gate(q[0].float(), k[0].float())
    args = {"block": blk, "topk": 2}
    bm = build(lower(LIB, "gated", args), n=n, heads=H, q_len=q_len,
               schedule=Schedule(16, 16))
    res, sets = dyn.dynamic_attention(q.to(device), k.to(device), v.to(device), bm,
                                      gates=gate.to(device), return_index=True, poison=True)
    ev = reference.evaluate(LIB, "gated", n=n, heads=H, q_len=q_len, args=args, gates=scores)
    el = eligible(6, blk, n - q_len, q_len)
    assert torch.equal(sets[0].of("gate").cpu(), block_keep(scores, el, 2, 0.0))
    kk = k[0].double().repeat_interleave(H // Hkv, 0)
    vv = v[0].double().repeat_interleave(H // Hkv, 0)
    logits = (q[0].double() @ kk.transpose(1, 2)) * D ** -0.5
    p = torch.softmax(logits.masked_fill(~ev.mask, float("-inf")), -1)
    want = p @ vv
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(res.out[0].cpu().double(), want, atol=tol, rtol=tol)
    # Scores as a tensor give the same selection as the module.
    _, sets2 = dyn.dynamic_attention(q.to(device), k.to(device), v.to(device), bm,
                                     gates=scores.to(device), return_index=True)
    assert torch.equal(sets2[0].of("gate"), sets[0].of("gate"))
    src = dyn.selector_printer(bm.pattern)
    assert src is not None
    with pytest.raises(ValueError, match="gates="):
        dyn.dynamic_attention(q.to(device), k.to(device), v.to(device), bm)


def test_kernel_path_matches_the_reference():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU run uses the Triton interpreter")
    _kernel_case("cpu")


@pytest.mark.gpu
def test_gpu_kernel_path_matches_the_reference():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("set TRITON_INTERPRET=0 to compile for the GPU")
    _kernel_case("cuda", torch.float16)


def test_tune_cli_has_the_train_gate_flag():
    from attnc.cli import build_parser

    a = build_parser().parse_args(["tune", "--model", "m", "--train-gate", "--gate-block", "32"])
    assert a.train_gate and a.gate_block == 32 and a.gate_steps == 150
    assert not build_parser().parse_args(["tune", "--model", "m"]).train_gate


def test_calibration_chunks_with_stride():
    """Disjoint chunks by default; a stride below the length overlaps them."""
    ids = torch.arange(10)
    assert [c.tolist() for c in gt.training_chunks(ids, 4, None)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    got = gt.training_chunks(ids, 4, None, 2)
    assert [int(c[0]) for c in got] == [0, 2, 4, 6] and all(c.numel() == 4 for c in got)
    assert len(gt.training_chunks(ids, 4, 3, 1)) == 3
    with pytest.raises(ValueError, match="fewer than the training length"):
        gt.training_chunks(ids, 11, None)
    with pytest.raises(ValueError, match="stride"):
        gt.training_chunks(ids, 4, None, 0)


def test_relative_scores_and_trained_distance(tiny, trained, tmp_path):
    """Relative scores are probabilities times the row's eligible blocks; distances beyond
    the trained ones use the prior of the longest trained distance; both survive a file."""
    from attnc.codegen.gate import distance_buckets

    g = trained.gates[0]
    assert g.max_distance == 256 // 16 - 1  # training length 256, block 16
    q, k = torch.randn(4, 100, 16, generator=_gen(3)), torch.randn(2, 100, 16, generator=_gen(4))
    p = g(q, k)
    g.relative = True
    try:
        r = g(q, k)
    finally:
        g.relative = False
    el = eligible(p.shape[-1], 16, 0, 100)
    torch.testing.assert_close(r, p * el.sum(-1, keepdim=True))
    b = distance_buckets(40, 40, max_distance=5)
    assert int(b[39, 20]) == int(b[10, 5]) and int(b[6, 1]) == int(b[10, 5])
    assert (b[:, 0] == distance_buckets(40, 40)[:, 0]).all()
    import copy

    gs = copy.deepcopy(trained.gates).configure(relative=True)
    path = ga.save_gates(gs, tmp_path / "rel.gates.safetensors")
    back = ga.load_gates(path, model=tiny[0])
    assert back.relative and back[0].max_distance == 15 and not trained.gates.relative
    torch.testing.assert_close(back[0](q, k), r)


def test_length_scores(tiny, trained, tmp_path):
    """Length scores are probabilities times the sequence's key blocks: at one length the same
    order as probabilities (a threshold selects the same blocks as the threshold divided by the
    key blocks), at another length scaled by the other count; the kind survives a file, and an
    unknown kind is refused."""
    import copy

    g = copy.deepcopy(trained.gates[0])
    q, k = torch.randn(4, 100, 16, generator=_gen(5)), torch.randn(2, 100, 16, generator=_gen(6))
    p = g(q, k)
    g.score_kind = "length"
    s = g(q, k)
    nb = -(-100 // 16)
    torch.testing.assert_close(s, p * nb)
    el = eligible(nb, 16, 0, 100)
    t = float(s[:, el].median())
    assert torch.equal(block_keep(s, el, 0, t), block_keep(p, el, 0, t / nb))
    # a decode step (one query at the end of 200 keys): its row is scaled by 200's key blocks
    q1, k2 = torch.randn(4, 1, 16, generator=_gen(7)), torch.randn(2, 200, 16, generator=_gen(8))
    s1 = g(q1, k2)
    g.score_kind = "probability"
    torch.testing.assert_close(s1, g(q1, k2) * -(-200 // 16))
    gs = copy.deepcopy(trained.gates).configure(scores="length")
    assert gs.score_kind == "length" and not gs.relative and gs.meta["scores"] == "length"
    path = ga.save_gates(gs, tmp_path / "len.gates.safetensors")
    back = ga.load_gates(path, model=tiny[0])
    assert back.score_kind == "length"
    with pytest.raises(ValueError, match="score kind"):
        copy.deepcopy(trained.gates).configure(scores="row")
    with pytest.raises(ValueError, match="not both"):
        copy.deepcopy(trained.gates).configure(scores="length", relative=True)
    bad = copy.deepcopy(trained.gates)
    bad.meta["scores"] = "ranked"
    path = ga.save_gates(bad, tmp_path / "bad.gates.safetensors")
    with pytest.raises(attnc.AttncError, match="unknown score kind 'ranked'"):
        ga.load_gates(path, model=tiny[0])


def test_mass_scores_are_top_p(tiny, trained, tmp_path):
    """Mass scores: 1 minus the mass of the row's better blocks (ties to the lower key block),
    so a threshold t keeps the fewest best blocks whose mass reaches 1 - t; not-eligible
    blocks score 0; the kind survives a file and gives the same selection through the
    reference as the definition."""
    import copy

    from attnc.codegen.gate import mass_scores

    p = torch.tensor([[[0.2, 0.5, 0.3, 0.0], [0.25, 0.25, 0.5, 0.0]]])
    el = torch.tensor([[True, True, True, False], [True, True, True, False]])
    m = mass_scores(p, el)
    torch.testing.assert_close(m, torch.tensor([[[0.2, 1.0, 0.5, 0.0], [0.5, 0.25, 1.0, 0.0]]]))
    # top-p with p = 0.6: the first row needs blocks 1 and 2 (0.5 < 0.6 <= 0.8)
    assert (m >= 0.4)[0, 0].tolist() == [False, True, True, False]
    assert (m >= 0.4)[0, 1].tolist() == [True, False, True, False]
    g = copy.deepcopy(trained.gates[0])
    q, k = torch.randn(4, 100, 16, generator=_gen(9)), torch.randn(2, 100, 16, generator=_gen(10))
    pr = g(q, k)
    g.score_kind = "mass"
    s = g(q, k)
    nb = -(-100 // 16)
    el = eligible(nb, 16, 0, 100)
    for h in range(4):
        for r in range(nb):
            row = pr[h, r][el[r]].double()
            order = sorted(range(row.numel()), key=lambda j: (-float(row[j]), j))
            above = 0.0
            for j in order:
                assert abs(float(s[h, r][el[r]][j]) - (1.0 - above)) < 1e-5
                above += float(row[j])
    assert (s[:, ~el] == 0).all()
    gs = copy.deepcopy(trained.gates).configure(scores="mass")
    back = ga.load_gates(ga.save_gates(gs, tmp_path / "m.gates.safetensors"), model=tiny[0])
    assert back.score_kind == "mass"
    torch.testing.assert_close(back[0](q, k), s)


def test_density_thresholds_rank_own_blocks_first():
    """Own blocks count before any gate score, also with relative scores above 1 or 2; a
    budget below the own blocks gives a threshold above every gate score."""
    from attnc.codegen.gate import density_thresholds, own_blocks_first

    nb = 4
    el = eligible(nb, 16, 0, 64)  # 10 eligible blocks, 4 of them own
    s = torch.tensor([[0.0, 0, 0, 0], [7.0, 0.5, 0, 0], [3.0, 1.0, 0.1, 0],
                      [6.0, 2.5, 0.2, 0.05]])
    flat = own_blocks_first(s, el)
    assert flat.numel() == 10 and torch.isinf(flat).sum() == 4
    t6, t2, t1 = density_thresholds([flat], [0.6, 0.2, 1.0])
    assert ((s >= t6) & el & ~torch.eye(nb, dtype=torch.bool)).sum() == 2  # 7.0 and 6.0
    assert t2 > 7.0 and t1 == 0.0


# ---------------------------------------------------------------- the model's RoPE and the gate's


def test_unrotate_inverts_the_models_rotary_embedding(tiny):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, _ = tiny
    inv = gt.model_rope(m)
    H, n, D = 4, 50, m.config.hidden_size // m.config.num_attention_heads
    assert inv is not None and inv.numel() == D // 2
    q = torch.randn(1, H, n, D, generator=_gen(5))
    k = torch.randn(1, 2, n, D, generator=_gen(6))
    start = 7  # positions start .. start + n - 1, as for queries after a prefix
    cos, sin = m.model.rotary_emb(q, torch.arange(start, start + n).view(1, -1))
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
    from attnc.codegen.gate import unrotate

    torch.testing.assert_close(unrotate(qr[0], inv, start), q[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unrotate(kr[0], inv, start), k[0], atol=1e-5, rtol=1e-5)
    # Partial rotary: only the first 2 R dims were rotated; the rest pass through.
    part = inv[: D // 4]
    x = torch.randn(3, n, D, generator=_gen(7))
    y = unrotate(x, part)
    assert torch.equal(y[..., D // 2:], x[..., D // 2:])
    assert not torch.allclose(y[..., :D // 2], x[..., :D // 2])


def test_block_rope_scores_depend_on_block_distance_only():
    from attnc.codegen.gate import block_rope

    g = BlockGate(2, 1, 8, 16, d_gate=8, init="random", seed=1, rope=4)
    assert g.wq.shape == (2, 24, 12)
    # Every block has the same features: the scores can differ only by block distance.
    f = torch.randn(1, 1, 24, generator=_gen(2))
    z = g.logits(f.expand(2, 6, 24), f.expand(1, 6, 24))
    for d in range(6):
        diag = torch.diagonal(z, offset=-d, dim1=-2, dim2=-1)
        torch.testing.assert_close(diag, diag[..., :1].expand_as(diag))
    assert not torch.allclose(z[..., 5, 5], z[..., 5, 0])
    x = torch.randn(3, 6, 10, generator=_gen(3))
    assert torch.equal(block_rope(x, 0, 10000.0), x)
    assert torch.equal(block_rope(x, 4, 10000.0)[..., :6], x[..., :6])
    with pytest.raises(ValueError, match="even"):
        BlockGate(2, 1, 8, 16, rope=3)


def test_pre_rope_gate_sees_unrotated_q_and_k(tiny):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, _ = tiny
    inv = gt.model_rope(m)
    H, G, D, n, blk = 4, 2, 16, 70, 16
    g = BlockGate(H, G, D, blk, d_gate=8, init="random", seed=4, rope=4).set_model_rope(inv)
    q = torch.randn(1, H, n, D, generator=_gen(8))
    k = torch.randn(1, G, n, D, generator=_gen(9))
    cos, sin = m.model.rotary_emb(q, torch.arange(n).view(1, -1))
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
    Lq = 20  # the last 20 queries: positions n - 20 .. n - 1
    s = g(qr[0, :, -Lq:], kr[0])
    plain = BlockGate(H, G, D, blk, d_gate=8, init="random", seed=4, rope=4)
    s0 = plain(q[0, :, -Lq:], k[0])
    torch.testing.assert_close(s, s0, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="do not fit head dim"):
        BlockGate(H, G, 4, blk).set_model_rope(inv)


def test_rope_gate_files_round_trip(tiny, trained, tmp_path):
    m, ids = tiny
    gs = trained.gates
    g0 = gs[gs.layers[0]]
    assert g0.rope == 32 and g0.model_inv_freq is not None  # train_gate's defaults
    assert gs.meta["rope"] == "32" and gs.meta["pre_rope"] == "1"
    path = ga.save_gates(trained, tmp_path / "r.gates.safetensors")
    back = ga.load_gates(path, model=m)
    q = torch.randn(4, 40, 16, generator=_gen(10))
    k = torch.randn(2, 40, 16, generator=_gen(11))
    for ly in gs.layers:
        assert torch.equal(back[ly].model_inv_freq, gs[ly].model_inv_freq)
        torch.testing.assert_close(back[ly](q, k), gs[ly](q, k))
    # A file that claims pre-RoPE features but lacks the frequencies, or whose weights do not
    # have the rope dimensions its metadata says, is refused with one line.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
        meta = f.metadata()
    save_file({k: v for k, v in t.items() if k != "model_inv_freq"}, str(tmp_path / "a.st"),
              metadata=meta)
    with pytest.raises(attnc.AttncError, match="missing tensor model_inv_freq"):
        ga.load_gates(tmp_path / "a.st")
    save_file(t, str(tmp_path / "b.st"), metadata={**meta, "rope": "8"})
    with pytest.raises(attnc.AttncError, match="has shape") as e:
        ga.load_gates(tmp_path / "b.st")
    assert "\n" not in str(e.value)
    save_file(t, str(tmp_path / "c.st"), metadata={**meta, "rope": "3"})
    with pytest.raises(attnc.AttncError, match="bad gate rotary"):
        ga.load_gates(tmp_path / "c.st")


def test_post_rope_training_without_gate_rope(tiny):
    m, ids = tiny
    r = gt.train_gate(m, ids[:512], block=16, d_gate=16, length=256, sequences=1, steps=5,
                      rope=0, pre_rope=False)
    g = r.gates[r.gates.layers[0]]
    assert g.rope == 0 and g.model_inv_freq is None and g.wq.shape[-1] == 16
    assert r.gates.meta["pre_rope"] == "0"


@pytest.mark.parametrize("start,L,block,rot", [(0, 70, 16, 8), (5, 30, 8, 4), (37, 27, 16, 0),
                                               (0, 48, 12, 2)])
def test_fused_gate_pool_equals_torch(start, L, block, rot):
    """The GPU's one-pass pooling (Triton, here interpreted on the CPU) equals unrotate +
    pool3 in torch, with and without the rotation, partial rotary, partial first and last
    blocks and a block size that is not a power of two."""
    from attnc.codegen.builders import gate_pool
    from attnc.codegen.gate import pool3, unrotate

    D = 16
    x = torch.randn(3, L, D, generator=_gen(L + rot)).to(torch.bfloat16)
    inv = (1.0 / 10000 ** (torch.arange(rot) / max(rot, 1))) if rot else None
    nb = -(-(start + L) // block) + 1  # one block more than needed: zeros
    want = pool3(x if inv is None else unrotate(x, inv, start), block, start=start, nb=nb)
    # The kernel runs on the GPU where there is one (TRITON_INTERPRET=0), else interpreted.
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" \
        else "cpu"
    x, want = x.to(dev), want.to(dev)
    inv = inv.to(dev) if inv is not None else None
    for hp in (None, 2, 4):  # several heads per program, the last program short of heads
        got = gate_pool(x, block, start=start, nb=nb, inv_freq=inv, heads_per_program=hp)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not hold"):
        gate_pool(x, block, start=start, nb=1)


@pytest.mark.gpu
def test_gpu_gate_features_equal_the_cpu_path():
    """On CUDA tensors gate_features runs the fused kernel; the CPU runs torch's ops."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("set TRITON_INTERPRET=0 to compile for the GPU")
    from attnc.codegen.gate import gate_features

    inv = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    x = torch.randn(2, 4, 3000, 128, generator=_gen(3)).to(torch.bfloat16)
    for start, f in ((0, inv), (1000, inv), (77, None)):
        xs = x[..., : 3000 - start, :]
        want = gate_features(xs, 64, start=start, inv_freq=f)
        got = gate_features(xs.cuda(), 64, start=start, inv_freq=f)
        assert got.is_cuda
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_retrieval_samples():
    """Every fact is hidden in the first 70% of the filler and asked for, with its answer,
    after it; the sample has exactly the length asked for, is reproducible by seed, and bad
    sizes are refused."""
    from attnc.autotune.text import retrieval_ids

    def enc(t):  # one id per character, above the filler's ids
        return [1000 + ord(c) for c in t]

    filler = list(range(600))
    x = retrieval_ids(enc, filler, 900, needles=3, seed=4)
    assert len(x) == 900 and x == retrieval_ids(enc, filler, 900, needles=3, seed=4)
    assert x != retrieval_ids(enc, filler, 900, needles=3, seed=5)
    text = "".join(chr(c - 1000) if c >= 1000 else "." for c in x)
    import re

    facts = {m.group(1): (m.start(), m.group(2))
             for m in re.finditer(r"The pass key of (\w+) is (\d+)\. Remember", text)}
    asks = {m.group(1): (m.start(), m.group(2))
            for m in re.finditer(r"What is the pass key of (\w+)\? The pass key of \w+ is (\d+)",
                                 text)}
    assert len(facts) == 3 and facts.keys() == asks.keys()
    for name, (at, key) in facts.items():
        assert asks[name][1] == key and asks[name][0] > at
    plain = [c for c in x if c < 1000]  # the filler, in order, one contiguous run
    assert plain == list(range(plain[0], plain[0] + len(plain)))
    # spans=True: the same ids, and where each fact and its recalled key sit.
    y, spans = retrieval_ids(enc, filler, 900, needles=3, seed=4, spans=True)
    assert y == x and len(spans) == 3
    for f0, f1, a0, a1 in spans:
        fact = text[f0:f1]
        m = re.match(r" The pass key of (\w+) is (\d+)\. Remember it\. \2 is the pass key of "
                     r"\1\. $", fact)
        assert m, fact
        name, key = m.groups()
        assert text[a0:a1] == " " + key and f1 <= a0
        assert text[:a0].endswith(f"The pass key of {name} is")
    with pytest.raises(ValueError, match="needs"):
        retrieval_ids(enc, filler, 300, needles=3)
    with pytest.raises(ValueError, match="needles"):
        retrieval_ids(enc, filler, 900, needles=0)


def test_train_gate_with_extra_chunks(tiny):
    """Extra chunks (retrieval samples) are trained on after the calibration chunks; a chunk
    of another length is refused."""
    m, ids = tiny
    extra = [ids[700:956]]
    r = gt.train_gate(m, ids[:512], block=16, d_gate=16, length=256, sequences=2, steps=5,
                      extra_ids=extra, early_stop=False)
    meta = json.loads(r.gates.meta["train"])
    assert meta["sequences"] == 3 and meta["extra_chunks"] == 1
    with pytest.raises(ValueError, match="extra training chunk 0 has 100 tokens"):
        gt.train_gate(m, ids[:512], block=16, d_gate=16, length=256, sequences=2, steps=1,
                      extra_ids=[ids[:100]])


def test_tuner_gate_copy_uses_length_scores(tiny, trained, tmp_path):
    """The head tuner scores gated candidates on its own copy of the gates, with length scores
    (docs/gate.md: per-row relative scores cost far more perplexity); the caller's gates and
    a gate file it reads are left as they are."""
    from attnc.tune_api import _gate_set

    gs = _gate_set(trained, tiny[0])
    assert gs.score_kind == "length" and gs.meta["scores"] == "length"
    assert trained.gates.score_kind == "probability"
    path = ga.save_gates(trained, tmp_path / "p.gates.safetensors")
    assert _gate_set(str(path), tiny[0]).score_kind == "length"
    assert ga.load_gates(path, model=tiny[0]).score_kind == "probability"


def test_retrieval_samples_with_repeated_filler():
    """filler="repeat" hides the facts in the passkey test's kind of filler (short sentences
    drawn from its list), "both" alternates text and repeat samples; spans stay right."""
    import re

    from attnc.autotune.text import _FILLER, repeat_filler, retrieval_samples

    def enc(t):  # one id per character, above the calibration filler's ids
        return [1000 + ord(c) for c in t]

    filler = list(range(600))
    rep = retrieval_samples(enc, filler, 900, 2, filler="repeat")
    assert rep == retrieval_samples(enc, filler, 900, 2, filler="repeat")
    assert rep[0][0] != rep[1][0]
    for i, (ids, spans) in enumerate(rep):
        assert len(ids) == 900 and min(ids) >= 1000  # no calibration text inside
        text = "".join(chr(c - 1000) for c in ids)
        for f0, f1, a0, a1 in spans:
            key = re.match(r" The pass key of \w+ is (\d+)\. ", text[f0:f1]).group(1)
            assert text[a0:a1] == f" {key}" and a0 > f1
        # without the facts and questions: one stretch of the passkey test's sentences
        rest = text
        for f0, f1, _, _ in sorted(spans, reverse=True):
            rest = rest[:f0] + rest[f1:]
        rest = re.sub(r" What is the pass key of \w+\? The pass key of \w+ is \d+\. ", "", rest)
        stream = "".join(chr(c - 1000) for c in repeat_filler(enc, 900, seed=2000 + i))
        assert len(rest) > 300 and rest in stream
        assert set(re.findall(r"[A-Z][^.]*\.", stream)) <= set(_FILLER)
    both = retrieval_samples(enc, filler, 900, 4, filler="both")
    text_only = retrieval_samples(enc, filler, 900, 2)
    assert both[0] == text_only[0] and both[2] == text_only[1]
    assert both[1] == rep[0] and both[3] == rep[1]
    with pytest.raises(ValueError, match="unknown retrieval filler"):
        retrieval_samples(enc, filler, 900, 2, filler="noise")


def test_gate_retrieval_samples_apart_from_the_ranking_samples():
    """The gates' training samples: text ones are retrieval_ids with seeds 0.. (as before),
    repeat ones hide the facts in repeated short sentences, "both" alternates them, and none
    equals a sample that ranks retrieval heads (so heads are not ranked on trained facts)."""
    from attnc.autotune.text import (
        gate_retrieval_ids,
        repeat_filler,
        retrieval_ids,
        retrieval_samples,
    )

    def enc(t):
        return [1000 + ord(c) for c in t]

    filler = list(range(600))
    text = gate_retrieval_ids(enc, filler, 900, 2)
    assert text == [retrieval_ids(enc, filler, 900, seed=i) for i in range(2)]
    rep = gate_retrieval_ids(enc, filler, 900, 2, seed=5, filler="repeat")
    for i, x in enumerate(rep):
        assert len(x) == 900 and min(x) >= 1000
        assert x == retrieval_ids(enc, repeat_filler(enc, 900, seed=3005 + i), 900,
                                  seed=3005 + i)
    both = gate_retrieval_ids(enc, filler, 900, 4, seed=5, filler="both")
    assert both[1::2] == rep and both[0::2] == gate_retrieval_ids(enc, filler, 900, 2, seed=5)
    ranking = [x for x, _ in retrieval_samples(enc, filler, 900, 8, seed=5, filler="both")]
    assert not any(x in ranking for x in both)
    with pytest.raises(ValueError, match="unknown retrieval filler"):
        gate_retrieval_ids(enc, filler, 900, 1, filler="noise")


@pytest.mark.gpu
def test_gpu_train_gate_matches_the_cpu_and_serves_a_gpu_model(tiny, tmp_path):
    """train_gate on a CUDA model: the model runs there, the gates train there (same losses
    as on the CPU up to float error), are saved from there, and a gated plan applied to the
    CUDA model with them gives the CPU's perplexity."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("set TRITON_INTERPRET=0 to compile for the GPU")
    import copy

    m, ids = tiny
    kw = dict(block=16, d_gate=16, length=256, sequences=3, steps=20, lr=1e-2,
              heldout_ids=ids[768:], early_stop=False)
    cpu = gt.train_gate(m, ids[:768], **kw)
    mc = copy.deepcopy(m).cuda()
    gpu = gt.train_gate(mc, ids[:768], **kw)
    g0 = gpu.gates[gpu.gates.layers[0]]
    assert g0.wq.is_cuda and g0.model_inv_freq.is_cuda
    assert gpu.history[0] == pytest.approx(cpu.history[0], rel=1e-4)
    assert gpu.history[-1] == pytest.approx(cpu.history[-1], rel=0.05)
    assert gpu.heldout[1] == pytest.approx(cpu.heldout[1], rel=0.05)
    path = ga.save_gates(gpu, tmp_path / "g.gates.safetensors")  # from the device
    back = ga.load_gates(path, model=m)
    torch.testing.assert_close(back[0].wq, g0.wq.cpu())
    plan = ("plan p(layers = 2, heads = 4, kv_heads = 2) {\n    default: gated(block = 16, "
            "topk = 3)\n}\n")
    x = ids[:256]
    ppl = {}
    for name, model, gates in (("gpu", mc, gpu.gates), ("cpu", m, back)):
        ga.apply(model, plan, gates=gates)
        try:
            ppl[name] = ga.perplexity(model, x)
        finally:
            ga.remove(model)
    # Float differences between the devices move a few near-tied blocks of this random
    # model (0.25% in perplexity on an H200).
    assert ppl["gpu"] == pytest.approx(ppl["cpu"], rel=1e-2), ppl
