"""Benchmark the head tuner on SmolLM2-135M: tuned plan vs dense vs a uniform streaming plan of
the same density (held-out perplexity, passkey retrieval), and the search's wall time.

    python benchmarks/autotune.py --text docs --lengths 2048 4096 --validation-length 8192 \
        --trials 24 --passkeys 16 --out bench-autotune
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch


def uniform_streaming(n: int, target_density: float, sink: int = 64):
    """streaming(sink, window) whose density at length n is closest to target_density."""
    from attnc.autotune.candidates import candidate
    from attnc.autotune.signals import density

    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if density(candidate("streaming", sink=sink, window=mid), n) < target_density:
            lo = mid + 1
        else:
            hi = mid
    return candidate("streaming", sink=sink, window=lo)


def passkey_trials(tok, n_tokens: int, count: int, seed: int = 0):
    """(ids, answer positions, answer ids) of passkey prompts of about n_tokens tokens."""
    from attnc.autotune.text import passkey_prompt

    r = random.Random(seed)
    out = []
    probe = len(tok(passkey_prompt(12345, 100, 0.5)).input_ids)
    per = (len(tok(passkey_prompt(12345, 200, 0.5)).input_ids) - probe) / 100
    filler = int(100 + (n_tokens - probe) / per)
    for i in range(count):
        key = r.randint(10000, 99999)
        depth = (i + 0.5) / count
        prompt = passkey_prompt(key, filler, depth, seed=seed + i)
        p_ids = tok(prompt).input_ids
        a_ids = tok(prompt + " " + str(key)).input_ids[len(p_ids):]
        ids = torch.tensor(p_ids + a_ids)
        out.append((ids, len(p_ids), a_ids, key, depth))
    return out


@torch.no_grad()
def passkey_accuracy(model, trials, tok, cache: bool = False) -> dict:
    """Passkey retrieval, greedy. A prompt passes when the first number in the model's greedy
    answer (up to the answer's token count plus 4 new tokens, each from a full forward pass
    without a cache) is the key: the usual passkey metric, which does not care whether the
    answer starts with the space token. `strict` also requires every token of " KEY", the
    space included, as the argmax after the true prefix (teacher-forced); SmolLM2 puts a
    separate token on that space, and dense's margin for it is as low as 0.33 nats on one
    prompt (docs/BENCHMARKS.md). No trials (--passkeys 0): accuracies nan.

    Generation stops once the first number is complete. `cache` decodes the model's own tokens
    with a KV cache (one token per step) instead of a full forward pass per token: the same
    tokens for dense attention and for static plans (whose masks for the last query do not
    depend on the queries before it), not for dynamic ones (vertical-slash and the gates
    choose their blocks from all queries of the pass)."""
    import re

    hits, strict, answers = [], [], []
    for ids, start, ans, key, _depth in trials:
        logits = model(ids.view(1, -1), use_cache=False).logits[0]
        pred = logits[start - 1: start - 1 + len(ans)].argmax(-1).tolist()
        strict.append(pred == list(ans))
        # Greedy decoding equals teacher forcing up to the first wrong token; from there on
        # the model continues on its own tokens.
        gen = []
        for p_, a_ in zip(pred, ans, strict=True):
            gen.append(p_)
            if p_ != a_:
                break
        if gen == list(ans):
            # The token after the answer (the last row's prediction): a number that goes on
            # is not the key.
            gen.append(int(logits[start - 1 + len(ans)].argmax()))
        seq = ids[:start].tolist() + gen
        past = None

        # Decoding ends at answer length + 4 tokens, after the full answer, or once a number
        # is followed by something else (the first number cannot change any more).
        while not (len(gen) >= len(ans) + 4 or gen[:len(ans)] == list(ans)
                   or re.search(r"\d\D", tok.decode(gen)) is not None):
            if not cache:
                out = model(torch.tensor([seq]), use_cache=False)
            elif past is None:
                out = model(torch.tensor([seq]), use_cache=True)
            else:
                out = model(torch.tensor([seq[-1:]]), past_key_values=past, use_cache=True)
            past = out.past_key_values if cache else None
            nxt = int(out.logits[0, -1].argmax())
            gen.append(nxt)
            seq.append(nxt)
        text = tok.decode(gen)
        m = re.search(r"\d+", text)
        hits.append(bool(m) and m.group(0) == str(key))
        answers.append(text)
    acc = sum(hits) / len(hits) if hits else float("nan")
    sacc = sum(strict) / len(strict) if strict else float("nan")
    return {"passkey": acc, "hits": hits, "passkey_strict": sacc, "strict_hits": strict,
            "answers": answers}


def _tune(tune_api, model, tok, calib, held, args, out):
    from attnc.autotune.text import retrieval_samples

    def enc(t: str) -> list[int]:  # no BOS inside a sample
        return tok(t, add_special_tokens=False).input_ids

    retrieval = recall = None
    if args.retrieval_heads or args.retrieval_eval or args.retrieval_signal:
        # Never the passkey prompts: facts hidden in calibration text.
        retrieval = retrieval_samples(enc, calib.tolist(), max(args.lengths),
                                      args.retrieval_samples, filler=args.retrieval_filler)
    if args.recall_check:
        # As attnc tune --recall-check: held-out filler, other seeds, never the passkey prompts.
        recall = retrieval_samples(enc, held.tolist(), args.validation_length,
                                   args.recall_check, seed=100, filler="both")
    res = tune_api.autotune(model, calib, heldout_ids=held, lengths=args.lengths,
                            validation_length=args.validation_length, trials=args.trials,
                            rows=args.rows, max_ppl_increase=args.max_ppl_increase,
                            latency_budget=args.latency_budget, max_density=args.max_density,
                            workdir=out, progress=True,
                            name="smollm2_tuned", records=args.records, gates=args.gates,
                            granularity=args.granularity, families=args.families,
                            retrieval=retrieval, retrieval_heads=args.retrieval_heads,
                            retrieval_eval=args.retrieval_eval,
                            retrieval_signal=args.retrieval_signal,
                            recall_samples=recall, max_recall_drop=args.max_recall_drop,
                            retrieval_rank=args.retrieval_rank,
                            **({"gate_densities": args.gate_densities}
                               if args.gate_densities else {}))
    res.write(out / "plan.attn", out / "report.json", out)
    return res


def _from_report(d: Path):
    """A tuning result rebuilt from a saved report.json and plan.attn (comparisons only)."""
    import json as _json
    from types import SimpleNamespace

    rep = _json.loads((d / "report.json").read_text())
    cands = _parse_candidates(rep["candidates"])
    from attnc.gate_api import gates_path

    # A plan with gated cells was written with the tuner's gates (its score kind) next to it.
    gp = gates_path(d / "plan.attn")
    return SimpleNamespace(report=rep, signals=SimpleNamespace(candidates=cands),
                           plan_text=(d / "plan.attn").read_text(), timings=rep["timings"],
                           gates=gp if gp.exists() else None)


def _parse_candidates(texts):
    from attnc.autotune.candidates import Candidate

    cands = []
    for text in texts:
        if "(" not in text:
            cands.append(Candidate(text))
            continue
        fam, rest = text.split("(", 1)
        args = tuple(tuple(a.split(" = ", 1)) for a in rest[:-1].split(", "))
        cands.append(Candidate(fam, args))
    return cands


def _from_study(url: str, model, val: torch.Tensor, max_density: float = 0.25):
    """A tuning result from a stored study whose front was not validated (a run stopped after
    its trials): only the front point at density <= max_density with the best calibration
    perplexity is validated on held-out text (comparisons only)."""
    from types import SimpleNamespace

    import optuna
    from attnc.autotune import apply as ap_
    from attnc.autotune import search
    from attnc.autotune.model import shape

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [s.study_name for s in optuna.get_all_study_summaries(url)]
    if len(names) != 1:
        raise SystemExit(f"{url} holds {len(names)} studies; expected one")
    study = optuna.load_study(study_name=names[0], storage=url)
    fp = json.loads(study.user_attrs["problem"])
    cands = _parse_candidates(fp["candidates"])
    L, H, G, D = shape(model)
    gran = "kv" if len(fp["units"]) == L * G else "q"
    pts = [{"trial": t.number, "latency": t.values[0], "calib_ppl_ratio": t.values[1],
            "density": t.user_attrs["density"], "choice": t.user_attrs["choice"]}
           for t in search.front(study)]
    sparse = [p for p in pts if p["density"] <= max_density]
    if not sparse:
        raise SystemExit(f"no front point at density <= {max_density}")
    best = min(sparse, key=lambda p: (p["calib_ppl_ratio"], p["latency"]))
    rep = {"model": {"layers": L, "heads": H, "kv_heads": G, "head_dim": D},
           "granularity": gran, "front": pts, "budget_met": None, "timings": {}}
    res = SimpleNamespace(report=rep, signals=SimpleNamespace(candidates=cands),
                          plan_text="", timings={})
    from attnc import tune_api

    rep["dense"] = {"heldout_ppl": ap_.perplexity(model, val)}
    ap_.apply(model, tune_api.expand_choice(res, best["choice"]))
    try:
        best["heldout_ppl"] = ap_.perplexity(model, val)
    finally:
        ap_.remove(model)
    best["heldout_ppl_ratio"] = best["heldout_ppl"] / rep["dense"]["heldout_ppl"]
    rep["chosen"] = best
    return res


def _families(res, choice) -> dict[str, int]:
    cells = res.signals.candidates
    out: dict[str, int] = {}
    for i in choice:
        f = cells[int(i)].family
        out[f] = out.get(f, 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--validation-length", type=int, default=8192)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--granularity", choices=["kv", "q"], default="kv",
                    help="one decision per KV head (saves KV cache) or per query head")
    ap.add_argument("--families", nargs="*", default=None,
                    help="candidate families (default: every shipped one; dense always; none "
                         "given: only dense and, with --gates, gated)")
    ap.add_argument("--gate-densities", type=float, nargs="+", default=None,
                    help="block densities whose global gate thresholds become candidates")
    ap.add_argument("--max-ppl-increase", type=float, default=0.02)
    ap.add_argument("--latency-budget", type=float, default=None)
    ap.add_argument("--max-density", type=float, default=None,
                    help="mean kept share of the causal pairs (a hard limit of every trial)")
    ap.add_argument("--passkey-tokens", type=int, default=4096)
    ap.add_argument("--passkeys", type=int, default=16,
                    help="passkey prompts (keys at depths spread evenly over the prompt)")
    ap.add_argument("--text", choices=["docs", "chronicle"], default="docs",
                    help="shipped calibration/held-out text (default docs: Python reference "
                         "prose; chronicle: the generated town chronicle)")
    ap.add_argument("--records", default=None,
                    help="latency records (a directory or a shipped set: h200)")
    ap.add_argument("--gates", default=None,
                    help="a gate file trained for every head: gated candidates join the grid")
    ap.add_argument("--retrieval-heads", type=int, default=0,
                    help="units kept dense as retrieval heads (ranked on synthetic retrieval "
                         "samples, never the passkey prompts)")
    ap.add_argument("--retrieval-rank", choices=["mass", "influence"], default="mass",
                    help="how the retrieval heads are ranked (attnc tune --retrieval-rank)")
    ap.add_argument("--retrieval-samples", type=int, default=4)
    ap.add_argument("--retrieval-filler", choices=["text", "repeat", "both"], default="text",
                    help="the retrieval samples' filler (attnc tune --retrieval-filler)")
    ap.add_argument("--retrieval-eval", type=int, default=0,
                    help="retrieval samples that join the trials' calibration perplexity")
    ap.add_argument("--recall-check", type=int, default=0,
                    help="retrieval samples of the validation length on which every front "
                         "point's recall is validated (attnc tune --recall-check)")
    ap.add_argument("--max-recall-drop", type=float, default=0.0,
                    help="share of the needles a plan may recall fewer than dense")
    ap.add_argument("--retrieval-signal", type=int, default=0,
                    help="retrieval samples that give the search its recall signal (attnc tune "
                         "--retrieval-signal)")
    ap.add_argument("--skip-uniform", action="store_true",
                    help="no uniform streaming comparison (e.g. a second run at a density "
                         "another run has compared already)")
    ap.add_argument("--out", default="bench-autotune")
    ap.add_argument("--from-report", metavar="DIR",
                    help="skip tuning: compare the front of a saved report.json")
    ap.add_argument("--compare", choices=["both", "chosen", "best"], default="both",
                    help="front points to compare: the chosen one, the one at density <= 25%% "
                         "with the best calibration perplexity, or both (the default)")
    ap.add_argument("--from-study", metavar="URL",
                    help="skip tuning: a stored study (e.g. sqlite:///DIR/attnc-tune.db) whose "
                         "run stopped after its trials; validate and compare only its front "
                         "point at density <= 25%% with the best calibration perplexity")
    args = ap.parse_args()

    import optuna
    import transformers
    from attnc.autotune import apply as ap_
    from attnc.autotune.model import load
    from attnc.autotune.text import shipped_text

    from attnc import tune_api

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = load("smollm2")
    load_s = time.perf_counter() - t0
    calib_text, held_text = shipped_text(args.text)
    calib = torch.tensor(tok(calib_text).input_ids)
    held = torch.tensor(tok(held_text).input_ids)

    t0 = time.perf_counter()
    if args.from_report:
        res = _from_report(Path(args.from_report))
        tune_s = res.report["timings"]["total_s"]
    elif args.from_study:
        res = _from_study(args.from_study, model, held[: args.validation_length])
        tune_s = None
    else:
        res = _tune(tune_api, model, tok, calib, held, args, out)
        tune_s = time.perf_counter() - t0
    rep = res.report
    n_val = args.validation_length
    val = held[:n_val]
    L, H = rep["model"]["layers"], rep["model"]["heads"]
    pk = passkey_trials(tok, args.passkey_tokens, args.passkeys)
    dense_pk = passkey_accuracy(model, pk, tok, cache=True)
    dense_ppl = rep["dense"]["heldout_ppl"]

    from attnc.autotune.signals import density

    def realised(point: dict) -> float:
        """The kept / causal pairs the point realised on the held-out text at the validation
        length (the search's estimate for a study read back without validation)."""
        d = point.get("heldout_density")
        return point["density"] if d is None else d

    def compare(label: str, point: dict) -> dict:
        """A front point vs uniform streaming of the same mean density at the validation
        length (the density the point realised on the held-out text): held-out perplexity
        and passkey retrieval, and the density the point keeps on the passkey prompts."""
        cells = tune_api.expand_choice(res, point["choice"])
        uni = uniform_streaming(n_val, realised(point))
        if args.skip_uniform:
            uni_ppl, uni_pk = float("nan"), {}
        else:
            uni_cells = {(ly, h): uni for ly in range(L) for h in range(H)}
            ap_.apply(model, uni_cells)
            uni_ppl = ap_.perplexity(model, val)
            uni_pk = passkey_accuracy(model, pk, tok, cache=True)  # static: cached decoding
            ap_.remove(model)
        from attnc.autotune.planio import plan_text

        from attnc import gate_api

        gated = any(c.gated for c in cells.values())
        masks = gate_api.apply(model, plan_text("bench", layers=L, heads=H,
                                                kv_heads=rep["model"]["kv_heads"], choice=cells,
                                                granularity="q"),
                               gates=(getattr(res, "gates", None) or args.gates) if gated
                               else None, stats=True)
        tuned_pk = passkey_accuracy(model, pk, tok)
        ap_.remove(model)
        return {
            "label": label,
            "tuned": {"heldout_ppl": point["heldout_ppl"], "ratio": point["heldout_ppl_ratio"],
                      "density": point["density"], "latency": point["latency"],
                      "heldout_density": point.get("heldout_density"),
                      "heldout_block_density": point.get("heldout_block_density"),
                      "passkey_density": masks.density()[0] if pk else None,
                      **tuned_pk,
                      "families": _families(res, point["choice"])},
            "uniform": {"pattern": uni.call_text(), "density": density(uni, n_val),
                        "heldout_ppl": uni_ppl, "ratio": uni_ppl / dense_ppl,
                        **uni_pk},
        }

    if args.from_study:
        rows = [compare("front point at density <= 25% with the best calibration perplexity",
                        rep["chosen"])]
    else:
        rows = []
        if args.compare != "best":
            rows.append(compare("chosen (fastest within the accuracy budget)", rep["chosen"]))
    # The front point at density <= 25% picked by calibration perplexity (tuning text), never
    # by held-out perplexity: its held-out number is then an honest estimate.
    sparse = [p for p in rep["front"] if realised(p) <= 0.25]
    if sparse and not args.from_study and args.compare != "chosen":
        best = min(sparse, key=lambda p: (p["calib_ppl_ratio"], p["latency"]))
        if (args.compare == "best" or best is not rep["chosen"]
                and best.get("trial") != rep["chosen"].get("trial")):
            rows.append(compare("front point at density <= 25% with the best calibration "
                                "perplexity", best))

    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}), "
                  f"{torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "optuna": optuna.__version__, "python": platform.python_version()},
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (dequantised to float32)",
        "args": vars(args),
        "text": args.text, "calib_tokens": int(calib.numel()),
        "heldout_tokens": int(held.numel()), "tuning_lengths": args.lengths,
        "validation_length": n_val, "trials": args.trials,
        "rows": args.rows, "model_load_s": load_s, "tune_wall_s": tune_s,
        "timings": res.timings, "dense_heldout_ppl": dense_ppl,
        "dense_passkey": dense_pk["passkey"], "dense_hits": dense_pk["hits"],
        "dense_passkey_strict": dense_pk["passkey_strict"],
        "dense_strict_hits": dense_pk["strict_hits"], "dense_answers": dense_pk["answers"],
        "passkey_depths": [x[4] for x in pk],
        "passkey_tokens": [int(x[0].numel()) for x in pk],
        "comparisons": rows,
        "front": [{k: p.get(k) for k in ("trial", "latency", "calib_ppl_ratio",
                                         "heldout_ppl_ratio", "density",
                                         "heldout_density", "heldout_block_density")}
                  for p in rep["front"]],
        "budget_met": rep["budget_met"],
    }
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(res.plan_text)


if __name__ == "__main__":
    main()
