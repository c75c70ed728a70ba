"""Python API of the head tuner: attnc.autotune(model, calib_ids, ...) and attnc.apply."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from attnc.autotune import search
from attnc.autotune.apply import apply, perplexity, remove
from attnc.autotune.candidates import Candidate, gated_candidates, grid
from attnc.autotune.capture import capture
from attnc.autotune.latency import LatencyModel
from attnc.autotune.model import shape
from attnc.autotune.planio import expand, plan_text
from attnc.autotune.retrieval import answer_recall, loss_and_recall, recall_signal
from attnc.autotune.signals import compute, density, gate_thresholds

# Block densities (kept / causal blocks over every head on the calibration text) whose global
# gate thresholds become the gated candidates: the knapsack mixes them per head.
GATE_DENSITIES = (0.06, 0.1, 0.15, 0.22, 0.32)


@dataclass
class TuneResult:
    plan_text: str
    cells: dict[tuple[int, int], Candidate]  # (layer, query head) -> candidate
    report: dict
    study_name: str
    storage: str
    timings: dict[str, float] = field(default_factory=dict)
    signals: object = None  # the Signals the search used
    gates: object = None  # the GateSet of gated candidates (None without gates)

    @property
    def gated(self) -> bool:
        """Whether the chosen plan has gated cells (it then needs its gate weights)."""
        return any(c.gated for c in self.cells.values())

    def write(self, plan_path: str | Path, report_path: str | Path | None = None,
              figures: str | Path | None = None) -> list[Path]:
        """Write the plan, the JSON report and the two pictures; returns the paths."""
        from attnc import atomic
        from attnc.autotune import report as pics

        out = [Path(plan_path)]
        atomic.write_text(plan_path, self.plan_text)
        if self.gated:
            from attnc.gate_api import gates_path, save_gates

            out.append(save_gates(self.gates, gates_path(plan_path)))
        if report_path is not None:
            atomic.write_text(report_path, json.dumps(self.report, indent=1) + "\n")
            out.append(Path(report_path))
        if figures is not None:
            d = Path(figures)
            d.mkdir(parents=True, exist_ok=True)
            out.append(pics.head_map(self.report, d / "heads.png"))
            out.append(pics.pareto(self.report, d / "pareto.png"))
        return out


def expand_choice(result: TuneResult, choice) -> dict[tuple[int, int], Candidate]:
    """(layer, query head) cells of a unit-level choice (candidate indices, as stored in the
    report's front points) of a tuning result."""
    rep = result.report
    m = rep["model"]
    units_per_layer = m["kv_heads"] if rep["granularity"] == "kv" else m["heads"]
    cands = result.signals.candidates
    unit = {(i // units_per_layer, i % units_per_layer): cands[int(c)]
            for i, c in enumerate(choice)}
    return expand(unit, heads=m["heads"], kv_heads=m["kv_heads"],
                  granularity=rep["granularity"])


def _bar(total: int, desc: str, on: bool):
    if not on:
        return nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def _segments(ids: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """Consecutive calibration segments of the given lengths (restarting at 0 when short)."""
    out, off = [], 0
    for n in lengths:
        if n > ids.numel():
            raise ValueError(f"calibration text has {ids.numel()} tokens; length {n} needs more")
        if off + n > ids.numel():
            off = 0
        out.append(ids[off: off + n])
        off += n
    return out


def autotune(model, calib_ids: torch.Tensor, *, heldout_ids: torch.Tensor | None = None,
             max_ppl_increase: float | None = 0.01, latency_budget: float | None = None,
             max_density: float | None = None, lengths: Sequence[int] | None = None,
             validation_length: int | None = None,
             families: Sequence[str] | None = None, granularity: str = "kv",
             trials: int = 16, rows: int = 256, records: str | Path | None = None,
             dtype: str = "float16", device: str | None = None, block: int = 128,
             storage: str | None = None,
             study_name: str | None = None, sampler: str = "tpe", seed: int = 0,
             name: str = "tuned", workdir: str | Path = ".", progress: bool = False,
             worker: bool = False, gates=None,
             gate_densities: Sequence[float] = GATE_DENSITIES,
             retrieval: Sequence | None = None,
             retrieval_heads: int = 0, retrieval_eval: int = 0,
             retrieval_rank: str = "mass", retrieval_signal: int = 0,
             recall_samples: Sequence | None = None,
             max_recall_drop: float = 0.0) -> TuneResult | None:
    """Choose a pattern per head (per KV head with granularity "kv") of a transformers causal LM.

    Signals are measured on calibration segments at `lengths` (default: half and all of
    min(len(calib), 2048) tokens); every trial solves the exact knapsack for its budget and
    weighting and is scored by calibration perplexity with the plan applied; the Pareto front
    is validated on held-out text at `validation_length` (default: twice the longest tuning
    length, within the held-out text), and the fastest point within `max_ppl_increase` (and
    `latency_budget`, a fraction of dense attention time, and `max_density`, the mean kept share
    of the causal pairs) is chosen. `max_density` also bounds every trial's knapsack (on the
    search's density estimates); the chosen point must meet it on the held-out text, where a
    gate's share is measured, not estimated. The study is stored in
    `storage` (default SQLite in workdir; resumable; PostgreSQL URLs let several workers share
    it). `block` is the kernel tile of the latency model. worker=True only runs trials and
    returns None.

    `gates` (a GateSet, train_gate's result or a gate file, trained for every head of this
    model: attnc.train_gate) adds gated candidates: `gated(block, topk = 0, threshold = t)`
    for the global thresholds that keep `gate_densities` of the blocks on the calibration
    text, on length scores (the gate's probability times the sequence's key blocks), so
    that a threshold keeps about the same share at other lengths. Their signals
    and densities come from the gate run on the captured Q and K, their latency from gate
    records (or the block model plus the gate's pass); a plan with gated
    cells is evaluated through attnc.gate_api and written with its weights next to it.

    `retrieval_heads` units (KV heads, or query heads with granularity "q") stay dense in
    every trial: those whose attention, on the `retrieval` samples (token ids with the spans
    of each fact and of its recalled key, autotune.text.retrieval_ids(..., spans=True)),
    puts the most mass on the fact while the model recalls it (DuoAttention's retrieval
    heads, measured on the dense model instead of trained). Calibration prose rarely asks
    for a fact from far back, so its signals do not see which heads do that.
    `retrieval_rank="influence"` ranks the units instead by the first-order increase of the
    recalled keys' loss when the unit loses its long-range view (keeps 64 sink and 256 local
    keys; autotune.retrieval.retrieval_influence), which also finds heads that need the far
    context without attending to the fact itself.
    `retrieval_eval` of the samples join the trials' calibration perplexity (weighted by
    length), so that a plan which stops recalling their keys scores worse.
    `retrieval_signal` of the samples give every (unit, candidate) a fourth signal, "recall":
    MoA's influence on the loss of the recalled answers alone, on the rows that carry its
    gradient (autotune.retrieval.recall_signal); the search weighs it like the others
    (`w_recall`), so the knapsack pays for dropping the keys that recall needs, per
    candidate, where retrieval_heads only keeps whole units dense.

    `recall_samples` (retrieval samples with spans, best at the validation length and apart
    from those above) join the validation: every front point's recall (needles whose key is
    the top prediction, token by token: autotune.retrieval.answer_recall) is measured with
    dense's, and a point meets the accuracy budget only if it recalls at least dense's share
    less `max_recall_drop`; when none does, the point within the cost budgets that recalls
    most (then the lowest perplexity) is returned, not met. Perplexity alone barely sees a
    plan that loses a fact recalled from far back. With `retrieval_eval` samples too, the
    same rule holds in every trial on those samples: a trial that recalls fewer of their
    needles is infeasible (search.run's constraint), so the front holds plans that recall."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    calib_ids = calib_ids.reshape(-1)
    L, H, G, D = shape(model)
    _check_args(calib_ids, max_ppl_increase=max_ppl_increase, latency_budget=latency_budget,
                trials=trials, rows=rows, sampler=sampler, lengths=lengths, records=records,
                retrieval_rank=retrieval_rank)
    if not 0 <= max_recall_drop <= 1:  # also refuses NaN
        raise ValueError(f"max_recall_drop {max_recall_drop}: a share of the needles in [0, 1]")
    if recall_samples is not None and not any(sp for _, sp in recall_samples):
        raise ValueError("recall_samples hold no needles (retrieval samples with spans: "
                         "autotune.text.retrieval_samples)")
    if retrieval_signal < 0 or retrieval_signal > len(retrieval or []):
        raise ValueError(f"retrieval_signal {retrieval_signal}: between 0 and the "
                         f"{len(retrieval or [])} retrieval samples given")
    if lengths is None:
        top = min(calib_ids.numel(), 2048)
        lengths = (top // 2, top)
    lengths = sorted(int(x) for x in lengths)
    if heldout_ids is None:
        heldout_ids = calib_ids[sum(lengths):]
        if heldout_ids.numel() < 2:
            raise ValueError(f"calibration text has {calib_ids.numel()} tokens, all used by the "
                             f"tuning lengths {lengths}: pass heldout_ids (held-out text for "
                             "validation) or shorter lengths")
    heldout_ids = heldout_ids.reshape(-1)
    if validation_length is None:
        validation_length = min(heldout_ids.numel(), 2 * lengths[-1])
    if validation_length in lengths:
        raise ValueError(f"validation length {validation_length} is a tuning length")
    if max_density is not None and not 0 < max_density <= 1:
        raise ValueError(f"max_density {max_density}: a share of the causal pairs in (0, 1]")
    if heldout_ids.numel() < validation_length or validation_length < 2:
        raise ValueError(f"held-out text has {heldout_ids.numel()} tokens; validation at "
                         f"{validation_length} needs more")

    # 1. capture and signals
    caps = []
    segs = _segments(calib_ids, lengths)
    with _bar(len(segs), "capture", progress) as bar:
        for seg in segs:
            caps.append(capture(model, seg))
            if bar is not None:
                bar.update(1)
    timings["capture_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    cands = grid(families)
    gs = _gate_set(gates, model)
    if gs is not None:
        thr = gate_thresholds(gs, caps[-1], gate_densities)
        cands += gated_candidates(gs.block, sorted(set(thr), reverse=True))
    with _bar(len(caps) * L, "signals", progress) as bar:
        sig = compute(caps, cands, rows=rows, seed=seed,
                      progress=bar.update if bar is not None else None, gates=gs)
    del caps
    timings["signals_s"] = time.perf_counter() - t1
    if retrieval_signal:
        t1 = time.perf_counter()
        with _bar(retrieval_signal * L, "recall", progress) as bar:
            sig.recall = recall_signal(
                model, list(retrieval)[:retrieval_signal], cands, rows=rows, gates=gs,
                progress=bar.update if bar is not None else None)[None]
        timings["recall_s"] = time.perf_counter() - t1

    # 2. latency model and the problem
    t1 = time.perf_counter()
    lat = LatencyModel.from_records(records, head_dim=D, dtype=dtype, device=device,
                                   block_m=block, block_n=block)
    prob = search.build_problem(sig, lat, layers=L, granularity=granularity,
                                latency_n=max(validation_length, lengths[-1]))
    timings["latency_s"] = time.perf_counter() - t1
    retrieval_rows = []
    if retrieval_heads:
        t1 = time.perf_counter()
        if not retrieval:
            raise ValueError("retrieval_heads needs retrieval samples (token ids with fact and "
                             "answer spans: autotune.text.retrieval_ids(..., spans=True))")
        from attnc.autotune.retrieval import (
            retrieval_influence,
            retrieval_scores,
            top_units,
            unit_scores,
        )

        if retrieval_rank == "influence":
            rs, red = retrieval_influence(model, retrieval), "sum"
        else:
            rs, red = retrieval_scores(model, retrieval), "max"
        top = top_units(rs, retrieval_heads, G, granularity, red)
        prob.force_dense(top)
        per = unit_scores(rs, G, granularity, red)
        retrieval_rows = [{"layer": ly, "unit": u, "score": float(per[ly, u])} for ly, u in top]
        timings["retrieval_s"] = time.perf_counter() - t1

    # 3. search
    t1 = time.perf_counter()
    eval_ids = calib_ids[: lengths[-1]]
    if retrieval_eval < 0 or retrieval_eval > len(retrieval or []):
        raise ValueError(f"retrieval_eval {retrieval_eval}: between 0 and the "
                         f"{len(retrieval or [])} retrieval samples given")
    # The trials' calibration text: the prose segment, then retrieval samples whose recalled
    # keys cost a plan that loses them (their perplexity joins, weighted by length).
    trial_ids = [eval_ids] + [torch.as_tensor(list(ids)) for ids, _ in
                              (retrieval or [])[:retrieval_eval]]

    def mean_ppl(seqs, spans=None) -> tuple[float, int, int]:
        """Length-weighted perplexity and (needles recalled, needles) of the sequences that
        have `spans` (one per sequence, None for prose; no spans: 0, 0), from the same
        passes."""
        logs, hits, needles = [], 0, 0
        for x, sp in zip(seqs, spans or [None] * len(seqs), strict=True):
            if sp:
                loss, h, k = loss_and_recall(model, x, sp)
                hits, needles = hits + h, needles + k
            else:
                loss = math.log(perplexity(model, x))
            logs.append(loss * x.numel())
        return math.exp(sum(logs) / sum(x.numel() for x in seqs)), hits, needles

    def ppl_with(cells, *seqs, measure: bool = False, recall=None, spans=None) -> dict:
        """With a plan applied: "ppl", "hits" and "needles" (mean_ppl with `spans`);
        "density", with `measure`, the kept / causal pairs it realised on the sequences (a
        gate's share depends on the text and its length, so the estimate the search used is
        not the density the plan has at the validation length); "recall", with `recall`
        (retrieval samples), answer_recall's result on them."""
        full = expand(cells, heads=H, kv_heads=G, granularity=granularity)
        masks = None
        if measure or any(c.input_dependent for c in full.values()):
            from attnc import gate_api

            masks = gate_api.apply(
                model, plan_text(name, layers=L, heads=H, kv_heads=G, choice=full,
                                 granularity="q"), gates=gs, stats=measure)
        else:
            apply(model, full)
        try:
            ppl, hits, needles = mean_ppl(seqs, spans)
            dens = masks.density() if measure else None  # of `seqs` alone
            rec = answer_recall(model, recall) if recall else None
        finally:
            remove(model)
        return {"ppl": ppl, "hits": hits, "needles": needles, "density": dens, "recall": rec}

    # With the recall check on, a trial must also recall the retrieval_eval samples' needles
    # as dense does (less max_recall_drop), or it is infeasible: the samplers steer away from
    # it and the front leaves it out, so the validation's recall check has points to keep.
    # The eval samples' needles are counted in the same passes as their perplexity.
    trial_spans = [None] + [sp for _, sp in list(retrieval)[:retrieval_eval]] \
        if recall_samples is not None and retrieval_eval else None
    dense_ppl, hits, needles = mean_ppl(trial_ids, trial_spans)
    trial_floor = hits / needles - max_recall_drop if trial_spans else None

    def trial_eval(cells):
        r = ppl_with(cells, *trial_ids, spans=trial_spans)
        if not trial_spans:
            return r["ppl"]
        short = trial_floor - r["hits"] / r["needles"]
        return r["ppl"], (short if short > 1e-9 else 0.0)

    fp_text = prob.fingerprint()
    if retrieval_eval:
        # The samples themselves, not just their count: another filler or seed is another
        # objective, so another study.
        ids_text = ";".join(",".join(map(str, x.tolist())) for x in trial_ids[1:])
        fp_text += (f"\nretrieval eval {retrieval_eval} "
                    f"{hashlib.sha256(ids_text.encode()).hexdigest()[:16]}")
    if retrieval_signal:  # other samples give other recall signals: another problem
        ids_text = ";".join(",".join(map(str, ids)) + "|" + repr([tuple(x) for x in sp])
                            for ids, sp in list(retrieval)[:retrieval_signal])
        fp_text += (f"\nretrieval signal {retrieval_signal} rows {rows} "
                    f"{hashlib.sha256(ids_text.encode()).hexdigest()[:16]}")
    if trial_spans:  # feasibility is part of the trials' results
        fp_text += f"\nrecall constraint {max_recall_drop!r}"
    if max_density is not None:
        # Trials of another density limit are not this study's: a resumed study would count
        # them (and their densities) towards this run's trials.
        fp_text += f"\nmax density {max_density!r}"

    fp = hashlib.sha256(fp_text.encode()).hexdigest()[:10]
    study_name = study_name or f"{name}-{fp}"
    if storage is None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        storage = search.default_storage(str(Path(workdir) / "attnc-tune.db"))
    study = search.open_study(storage, study_name, sampler=sampler, seed=seed)
    space = search.Space(latency_budget=latency_budget, max_density=max_density)
    search.run(prob, trial_eval, dense_ppl, study, trials=trials, space=space,
               progress=progress)
    timings["search_s"] = time.perf_counter() - t1
    if worker:
        return None

    # 4. validate the front end to end on held-out text at another length
    t1 = time.perf_counter()
    val_ids = heldout_ids[:validation_length]
    dense_val = perplexity(model, val_ids)
    recall = list(recall_samples) if recall_samples is not None else None
    dense_recall = None
    if recall:
        hits, needles, nll = answer_recall(model, recall)
        dense_recall = {"recall": hits / needles, "recall_hits": hits, "needles": needles,
                        "recall_nll": nll}
    pts = []
    fr = search.front(study)
    with _bar(len(fr), "validate", progress) as bar:
        for t in fr:
            choice = np.asarray(t.user_attrs["choice"])
            got = ppl_with(prob.choice_cells(choice), val_ids, measure=True, recall=recall)
            ppl, (realised, blocks) = got["ppl"], got["density"]
            pts.append({"trial": t.number, "latency": t.values[0],
                        "calib_ppl_ratio": t.values[1], "heldout_ppl": ppl,
                        "heldout_ppl_ratio": ppl / dense_val, "density": prob.mean_density(choice),
                        "heldout_density": realised, "heldout_block_density": blocks,
                        "choice": choice.tolist(), "params": t.params})
            if recall:
                hits, needles, nll = got["recall"]
                pts[-1].update(recall=hits / needles, recall_hits=hits, recall_nll=nll)
            if bar is not None:
                bar.update(1)
    timings["validate_s"] = time.perf_counter() - t1

    def ok_cost(p):  # the latency and density budgets
        return (latency_budget is None or p["latency"] <= latency_budget + 1e-9) and \
            (max_density is None or p["heldout_density"] <= max_density + 1e-9)

    def ok_recall(p):  # dense's share of the needles, less the drop allowed
        return dense_recall is None or \
            p["recall"] >= dense_recall["recall"] - max_recall_drop - 1e-9

    def ok_acc(p):
        return (max_ppl_increase is None or p["heldout_ppl_ratio"] <= 1 + max_ppl_increase) \
            and ok_recall(p)

    good = [p for p in pts if ok_cost(p) and ok_acc(p)]
    if good and max_ppl_increase is not None:
        chosen, met = min(good, key=lambda p: (p["latency"], p["heldout_ppl_ratio"])), True
    elif good:
        chosen, met = min(good, key=lambda p: (p["heldout_ppl_ratio"], p["latency"])), True
    else:
        within = [p for p in pts if ok_cost(p)] or pts
        # With a recall check, the point that recalls most first: losing a fact is the
        # failure perplexity does not show.
        chosen = min(within, key=lambda p: (-p.get("recall", 0.0), p["heldout_ppl_ratio"])) \
            if within else None
        # Dense is the answer in pure accuracy mode (it meets every budget there), and the
        # plan when every trial was pruned (e.g. too small a max_density: not met).
        accuracy_only = max_ppl_increase is not None and latency_budget is None \
            and max_density is None
        met = chosen is not None and accuracy_only
        if chosen is None or accuracy_only:
            chosen = {"trial": None, "latency": 1.0, "calib_ppl_ratio": 1.0,
                      "heldout_ppl": dense_val, "heldout_ppl_ratio": 1.0, "density": 1.0,
                      "heldout_density": 1.0, "heldout_block_density": 1.0,
                      "choice": [0] * len(prob.units), "params": {},
                      **{k: v for k, v in (dense_recall or {}).items() if k != "needles"}}
    choice = np.asarray(chosen["choice"])
    unit_cells = prob.choice_cells(choice)
    cells = expand(unit_cells, heads=H, kv_heads=G, granularity=granularity)
    timings["total_s"] = time.perf_counter() - t0
    comments = [
        f"attnc tune: {len(study.trials)} trials; latency {chosen['latency']:.3f} of dense "
        f"(model at n = {prob.latency_n}); held-out perplexity x{chosen['heldout_ppl_ratio']:.4f} "
        f"at n = {validation_length}; mean density {chosen['density']:.3f} (search), "
        f"{chosen['heldout_density']:.3f} (held-out text at n = {validation_length})",
    ]
    if dense_recall is not None:
        comments.append(f"recall {chosen['recall_hits']} of {dense_recall['needles']} needles "
                        f"(dense {dense_recall['recall_hits']})")
    text = plan_text(name, layers=L, heads=H, kv_heads=G, choice=unit_cells,
                     granularity=granularity, comments=comments)
    report = _report(prob, sig, lat, study, pts, chosen, met, cells, dense_ppl, dense_val,
                     validation_length, max_ppl_increase, latency_budget, max_density,
                     timings, storage, (L, H, G, D))
    report["retrieval_heads"] = retrieval_rows
    report["retrieval_signal"] = retrieval_signal
    if dense_recall is not None:
        report["dense"].update(dense_recall)
        report["budgets"]["max_recall_drop"] = max_recall_drop
    return TuneResult(text, cells, report, study_name, storage, timings, sig, gs)


def _check_args(calib_ids: torch.Tensor | None, *, max_ppl_increase, latency_budget,
                trials: int, rows: int, sampler: str, lengths, records=None,
                retrieval_rank: str = "mass") -> None:
    """Refuse arguments that no tuning can use, with one clear line (ValueError). Without
    calibration ids (the CLI, before it loads the model) only the options are checked."""
    from attnc.autotune.latency import records_path, shipped_records

    if records is not None and not records_path(records).is_dir():
        # A misspelt set name would otherwise tune silently with the default coefficients.
        raise ValueError(f"records '{records}': no such directory, nor a shipped set "
                         f"({', '.join(shipped_records()) or 'none'})")
    if calib_ids is not None and calib_ids.numel() < 2:
        raise ValueError(f"calibration text has {calib_ids.numel()} tokens; tuning needs more")
    if calib_ids is not None and (calib_ids.is_floating_point() or calib_ids.is_complex()):
        raise ValueError(f"calibration ids are {calib_ids.dtype}: token ids are integers")
    if max_ppl_increase is not None and not max_ppl_increase >= 0:  # also refuses NaN
        raise ValueError(f"max_ppl_increase {max_ppl_increase}: a relative increase >= 0")
    if latency_budget is not None and not latency_budget > 0:  # no plan takes no time
        raise ValueError(f"latency_budget {latency_budget}: a fraction of dense time > 0")
    if trials < 1:
        raise ValueError(f"trials {trials}: at least 1")
    if rows < 1:
        raise ValueError(f"rows {rows}: at least 1 query row per length")
    if sampler not in ("tpe", "nsga2"):
        raise ValueError(f"unknown sampler '{sampler}' (tpe or nsga2)")
    if retrieval_rank not in ("mass", "influence"):
        raise ValueError(f"unknown retrieval_rank '{retrieval_rank}' (mass or influence)")
    if lengths is not None and (not len(lengths) or min(int(x) for x in lengths) < 2):
        raise ValueError(f"tuning lengths {list(lengths)}: at least one, each >= 2 tokens")


def _gate_set(gates, model):
    """The tuner's own copy of a GateSet, train_gate's result or a gate file (checked against
    model), with length scores (probability times the sequence's key blocks): a threshold on
    them keeps about the same share at the validation length as on the calibration text, where
    a probability threshold keeps fewer blocks the more a row holds. Per-row relative scores
    (times the row's eligible blocks) also carry over, but cost far more perplexity at the same
    density (x1.031 at 25.2% against x1.018 at 24.1% for SmolLM2-135M at 4096 tokens,
    docs/gate.md). The caller's gates are left as they are."""
    if gates is None:
        return None
    from attnc.autotune.gate_train import TrainResult, gate_meta
    from attnc.codegen.gate import GateSet

    if isinstance(gates, TrainResult):
        gates = gates.gates
    if isinstance(gates, GateSet):
        gs = copy.deepcopy(gates)
        if gs.meta.get("format") is None:  # built by hand: describe it for its file
            gs.meta = gate_meta(gs, model)
    else:
        from attnc.gate_api import load_gates

        gs = load_gates(gates, model=model)
    return gs.configure(scores="length")


def _report(prob, sig, lat, study, pts, chosen, met, cells, dense_ppl, dense_val, val_n,
            max_inc, lat_budget, max_dens, timings, storage, shp) -> dict:
    L, H, G, D = shp
    ci = {c: i for i, c in enumerate(prob.candidates)}
    rows = []
    for (ly, h), c in sorted(cells.items()):
        i = ci[c]
        if c.input_dependent:  # measured on the longest calibration text, per layer and head
            d = sig.cell_density(len(sig.lengths) - 1, ly, h, i)
            ms = lat.input_ms(c, prob.latency_n, d)
        else:
            hh = h if c.head_dependent else 0
            d, ms = density(c, prob.latency_n, hh), lat.ms(c, prob.latency_n, hh)
        rows.append({
            "layer": ly, "head": h, "kv_head": h // (H // G), "pattern": c.call_text(),
            "family": c.family, "density": float(d), "ms": float(ms),
            "signals": {n_: {"error": float(sig.error[k, ly, h, i]),
                             "mass": float(sig.mass[k, ly, h, i]),
                             "influence": float(sig.influence[k, ly, h, i])}
                        for k, n_ in enumerate(sig.lengths)},
        })
        if sig.recall is not None:
            rows[-1]["recall"] = float(sig.recall[0, ly, h, i])
    trials = [{"number": t.number, "state": t.state.name, "values": t.values,
               "params": t.params, "density": t.user_attrs.get("density"),
               "constraint": t.user_attrs.get("constraint")}
              for t in study.trials]
    return {
        "model": {"layers": L, "heads": H, "kv_heads": G, "head_dim": D},
        "budgets": {"max_ppl_increase": max_inc, "latency_budget": lat_budget,
                    "max_density": max_dens},
        "budget_met": met, "granularity": prob.granularity, "tuning_lengths": sig.lengths,
        "rows_per_length": sig.rows, "latency_n": prob.latency_n, "validation_n": val_n,
        "latency_model": {"coeffs": lat.coeffs, "fitted": lat.fitted,
                          "records": len(lat.records), "sources": prob.sources},
        "dense": {"calib_ppl": dense_ppl, "heldout_ppl": dense_val},
        "chosen": chosen, "front": pts, "trials": trials, "cells": rows,
        "candidates": [c.call_text() for c in prob.candidates],
        "study": {"name": study.study_name, "storage": storage.split("@")[-1]},
        "timings": timings,
    }


__all__ = ["TuneResult", "apply", "autotune", "expand_choice", "perplexity", "remove"]
