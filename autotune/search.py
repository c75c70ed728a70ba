"""The search: per-trial exact knapsack over heads, Optuna over the budget, its split across
layers, the candidate families and the signal weighting; studies live in SQLite or PostgreSQL."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import optuna

from . import knapsack
from .candidates import Candidate
from .latency import LatencyModel
from .signals import Signals, density

SIGNALS = ("error", "mass", "influence")
# With retrieval samples (Signals.recall), a fourth: influence on the recalled answers' loss.
RECALL = "recall"
# Optuna 5 takes a trial's constraint from Trial.set_constraint; older versions only from the
# sampler's constraints_func.
_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")


@dataclass
class Problem:
    """Units (layer, kv head) or (layer, query head), candidates, signals and costs."""

    signals: Signals
    layers: int
    heads: int
    kv_heads: int
    granularity: str
    latency_n: int
    cost: np.ndarray  # [U, C] ms per unit at latency_n (sum over the unit's query heads)
    dens: np.ndarray  # [U, C] mean density of the unit's heads at latency_n
    allowed: np.ndarray  # [U, C] valid at every length
    units: list[tuple[int, int]] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)  # latency source counts
    dense_units: list[tuple[int, int]] = field(default_factory=list)  # forced dense

    def force_dense(self, units: list[tuple[int, int]]) -> None:
        """Keep these units dense in every trial (retrieval heads): only candidate 0."""
        index = {u: i for i, u in enumerate(self.units)}
        for u in units:
            if tuple(u) not in index:
                kind = "KV head" if self.granularity == "kv" else "head"
                raise ValueError(f"no unit {tuple(u)} (layer, {kind})")
            self.allowed[index[tuple(u)], 1:] = False
            if tuple(u) not in self.dense_units:
                self.dense_units.append(tuple(u))

    @property
    def candidates(self) -> list[Candidate]:
        return self.signals.candidates

    @property
    def heads_per_unit(self) -> int:
        return self.heads // self.kv_heads if self.granularity == "kv" else 1

    @property
    def dense_cost(self) -> float:
        return float(self.cost[:, 0].sum())

    def families(self) -> list[str]:
        return sorted({c.family for c in self.candidates if not c.dense})

    @property
    def signal_names(self) -> tuple[str, ...]:
        """The signals the search weighs: SIGNALS, and RECALL where the signals have it."""
        return SIGNALS + ((RECALL,) if self.signals.recall is not None else ())

    def unit_signal(self, name: str) -> np.ndarray:
        """[lengths, U, C]: error and mass averaged over the unit's heads, influences summed
        (recall's lengths axis is 1: its samples are summed)."""
        s = getattr(self.signals, name)  # [Ls, layers, H, C]
        Ls, nl, H, C = s.shape
        g = self.heads_per_unit
        s = s.reshape(Ls, nl, H // g, g, C)
        s = s.sum(3) if name in ("influence", RECALL) else s.mean(3)
        return s.reshape(Ls, nl * (H // g), C)

    def loss(self, weights: dict[str, float], agg: str = "max",
             power: float = 1.0) -> np.ndarray:
        """[U, C] weighted, normalised signal: each signal divided by its mean over the
        non-dense finite options, raised to `power` (> 1 makes the knapsack fix the worst
        heads first: losses compound across layers), combined over lengths by max or mean."""
        total = np.zeros(self.cost.shape)
        for name in self.signal_names:
            w = weights.get(name, 0.0)
            if w <= 0:
                continue
            s = self.unit_signal(name)
            if name == "mass":
                s = 1.0 - s
            # Rounding can leave a kept mass a hair above 1: a negative base to a fractional
            # power would be NaN.
            s = np.where(np.isnan(s), 0.0, np.maximum(s, 0.0))
            s = s.max(0) if agg == "max" else s.mean(0)
            fin = np.isfinite(s)
            fin[:, 0] = False
            scale = float(s[fin].mean()) if fin.any() and s[fin].mean() > 0 else 1.0
            total = total + w * (s / scale) ** power
        total[~self.allowed] = np.inf
        total[:, 0] = 0.0
        return total

    def choice_cells(self, choice: np.ndarray) -> dict[tuple[int, int], Candidate]:
        return {u: self.candidates[int(c)] for u, c in zip(self.units, choice, strict=True)}

    def latency(self, choice: np.ndarray) -> float:
        """Modelled attention time of a choice as a fraction of dense."""
        return float(self.cost[np.arange(len(choice)), choice].sum()) / self.dense_cost

    def mean_density(self, choice: np.ndarray) -> float:
        return float(self.dens[np.arange(len(choice)), choice].mean())

    def fingerprint(self) -> str:
        d = {"candidates": [c.call_text() for c in self.candidates], "units": self.units,
             "lengths": self.signals.lengths, "latency_n": self.latency_n}
        if self.dense_units:  # a study with other forced units is another problem
            d["dense_units"] = sorted(self.dense_units)
        if self.signals.recall is not None:  # another search space (w_recall)
            d["signals"] = list(self.signal_names)
        return json.dumps(d, sort_keys=True)


def build_problem(sig: Signals, lat: LatencyModel, *, layers: int, granularity: str = "kv",
                  latency_n: int | None = None) -> Problem:
    H, G = sig.heads, sig.kv_heads
    n = latency_n or max(sig.lengths)
    units_per_layer = G if granularity == "kv" else H
    g = H // units_per_layer
    C = len(sig.candidates)
    per_head = np.zeros((H, C))
    dens_h = np.zeros((H, C))
    sources: dict[str, int] = {}
    from .candidates import valid_at

    ok_n = np.array([valid_at(c, n) for c in sig.candidates])
    for ci, c in enumerate(sig.candidates):
        sources[lat.source(c, n)] = sources.get(lat.source(c, n), 0) + 1
        if c.input_dependent:
            continue  # per layer and head, below
        for h in range(H):
            hh = h if c.head_dependent else 0
            if not ok_n[ci]:
                per_head[h, ci], dens_h[h, ci] = np.inf, 1.0
                continue
            if hh == h or h == 0:
                per_head[h, ci] = lat.ms(c, n, hh)
                dens_h[h, ci] = density(c, n, hh)
            else:
                per_head[h, ci], dens_h[h, ci] = per_head[0, ci], dens_h[0, ci]
    unit_cost = per_head.reshape(units_per_layer, g, C).sum(1)
    unit_dens = dens_h.reshape(units_per_layer, g, C).mean(1)
    units = [(ly, u) for ly in range(layers) for u in range(units_per_layer)]
    cost = np.tile(unit_cost, (layers, 1))
    dens = np.tile(unit_dens, (layers, 1))
    allowed = np.tile(sig.valid.all(0) & ok_n, (len(units), 1))
    # Gated candidates: density measured per (layer, head) on the longest captured text (the
    # gate's choice depends on the input), time from the gated latency model at n.
    for ci, c in enumerate(sig.candidates):
        if not c.input_dependent:
            continue
        for ui, (ly, u) in enumerate(units):
            hs = range(u * g, (u + 1) * g)
            d = [sig.cell_density(len(sig.lengths) - 1, ly, h, ci) for h in hs]
            dens[ui, ci] = float(np.mean(d))
            cost[ui, ci] = sum(lat.input_ms(c, n, x) for x in d)
    return Problem(sig, layers, H, G, granularity, n, cost, dens, allowed, units, sources)


@dataclass
class Space:
    """What Optuna searches, and the budgets."""

    latency_budget: float | None = None  # fraction of dense attention time (upper bound)
    # Mean kept share of the causal pairs over units (MoA's density budget), a hard limit on
    # every trial's knapsack beside the latency target.
    max_density: float | None = None
    min_target: float | None = None  # smallest latency target sampled (default: feasible min)


def target_range(prob: Problem, space: Space) -> tuple[float, float]:
    """Latency targets worth sampling: from the cheapest feasible choice to the budget."""
    cheapest = np.where(prob.allowed, prob.cost, np.inf).min(1).sum() / prob.dense_cost
    lo = float(cheapest) if space.min_target is None else max(space.min_target, float(cheapest))
    hi = 1.0 if space.latency_budget is None else max(lo, space.latency_budget)
    return lo, hi


def _suggest(trial: optuna.Trial, prob: Problem, space: Space):
    lo, hi = target_range(prob, space)
    target = trial.suggest_float("latency_target", lo, hi)
    names = prob.signal_names
    w = {s: trial.suggest_float(f"w_{s}", 0.0, 1.0) for s in names}
    if sum(w.values()) <= 0:
        w = dict.fromkeys(names, 1.0)
    agg = trial.suggest_categorical("length_agg", ["max", "mean"])
    tilt = trial.suggest_float("layer_tilt", -2.0, 2.0)
    split = trial.suggest_categorical("layer_split", ["global", "tilt", "uniform"])
    fams = {f: trial.suggest_categorical(f"use_{f}", [True, False]) for f in prob.families()}
    power = trial.suggest_float("loss_power", 0.5, 3.0, log=True)
    dense_top = trial.suggest_float("dense_top", 0.0, 0.4)
    return target, w, agg, split, tilt, fams, power, dense_top


def assign(prob: Problem, target: float, weights: dict[str, float], agg: str = "max",
           split: str = "global", tilt: float = 0.0,
           families: dict[str, bool] | None = None, power: float = 1.0,
           dense_top: float = 0.0, clamp: bool = False,
           max_density: float | None = None) -> np.ndarray | None:
    """The exact knapsack choice for one setting of the searched parameters. `dense_top`
    keeps that fraction of units dense first (DuoAttention's retrieval heads), ranked by
    their mean loss over the sparse options; the knapsack then spends the rest. A target
    below the cheapest choice these settings allow gives None, or with `clamp` that cheapest
    choice (so a trial is not wasted). `max_density` bounds the mean density of the units'
    choices (never clamped: no choice within it gives None)."""
    loss = prob.loss(weights, agg, power)
    allowed = prob.allowed.copy()
    if families:
        for ci, c in enumerate(prob.candidates):
            if not c.dense and not families.get(c.family, True):
                allowed[:, ci] = False
    k = int(round(dense_top * len(prob.units)))
    if k > 0:
        sparse = np.where(allowed[:, 1:] & np.isfinite(loss[:, 1:]), loss[:, 1:], np.nan)
        some = np.isfinite(sparse).any(axis=1)
        mean = np.full(len(sparse), np.inf)
        mean[some] = np.nanmean(sparse[some], axis=1)
        rank = np.argsort(-mean, kind="stable")
        allowed[rank[:k], 1:] = False
    budget = target * prob.dense_cost
    limits = [] if max_density is None else [(prob.dens, max_density * len(prob.units))]
    if clamp:
        usable = allowed & np.isfinite(loss)
        if limits:
            # The cheapest choice within the density limit (the cheapest per unit may not be
            # within it): a knapsack that minimises time alone.
            cheap = knapsack.solve(np.where(usable, prob.cost, np.inf), prob.cost, np.inf,
                                   allowed=usable, limits=limits)
            if cheap is None:
                return None
            floor = float(prob.cost[np.arange(len(cheap)), cheap].sum())
        else:
            floor = float(np.where(usable, prob.cost, np.inf).min(1).sum())
        budget = max(budget, floor)
    if split == "uniform":
        return _uniform(loss, prob.cost, budget, allowed, clamp, limits)
    groups = []
    if split == "tilt" and prob.layers > 1:
        per_layer = len(prob.units) // prob.layers
        x = np.linspace(-0.5, 0.5, prob.layers)
        wl = np.exp(tilt * x)
        wl = wl * prob.layers / wl.sum()
        dense_layer = prob.cost[:per_layer, 0].sum()
        cheap = np.where(allowed, prob.cost, np.inf).min(1)
        for ly in range(prob.layers):
            units = range(ly * per_layer, (ly + 1) * per_layer)
            floor = float(cheap[ly * per_layer: (ly + 1) * per_layer].sum())
            sub = max(floor, min(dense_layer, target * dense_layer * wl[ly]))
            groups.append((units, sub * 1.000001))
    return knapsack.solve(loss, prob.cost, budget * 1.000001, allowed=allowed, groups=groups,
                          limits=[(w, b * 1.000001) for w, b in limits])


def _uniform(loss: np.ndarray, cost: np.ndarray, budget: float, allowed: np.ndarray,
             clamp: bool, limits=()) -> np.ndarray | None:
    """The best one-candidate-for-every-unit choice within the budget (units that may not take
    it stay dense): the uniform plans MoA and DuoAttention compare against, so the front
    always holds the best of them. Ranked by total loss, ties to the cheaper; with `clamp` and
    none within the budget, the cheapest."""
    U, C = loss.shape
    best, best_key, cheapest, cheapest_cost = None, None, None, np.inf
    for c in range(1, C):
        ok = allowed[:, c] & np.isfinite(loss[:, c])
        if not ok.any() or not (ok | allowed[:, 0]).all():
            continue
        choice = np.where(ok, c, 0)
        idx = np.arange(U), choice
        if any(w[idx].sum() > b * 1.000001 for w, b in limits):
            continue  # a hard limit: never clamped
        total = float(cost[idx].sum())
        if total < cheapest_cost:
            cheapest, cheapest_cost = choice, total
        if total <= budget * 1.000001:
            key = (float(loss[np.arange(U), choice].sum()), total)
            if best_key is None or key < best_key:
                best, best_key = choice, key
    if best is None and clamp:
        return cheapest
    return best


# A trial's calibration perplexity, or (perplexity, constraint): the trial is feasible when the
# constraint is <= 0 (e.g. needles recalled fewer than allowed, see attnc.autotune).
Evaluator = Callable[[dict[tuple[int, int], Candidate]], "float | tuple[float, float]"]


def default_storage(path: str) -> str:
    return "sqlite:///" + os.path.abspath(path)


def open_study(storage: str, study_name: str, *, sampler: str = "tpe", seed: int = 0,
               heartbeat: int = 60) -> optuna.Study:
    """A two-objective study (modelled latency fraction, calibration perplexity ratio), both
    minimised; created or resumed. SQLite or PostgreSQL URLs (anything SQLAlchemy takes)."""
    import importlib.util
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if storage.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        storage = "postgresql+psycopg2://" + storage[len("postgresql://"):]
    cons = {} if _SET_CONSTRAINT else {"constraints_func": _constraints}
    if sampler == "nsga2":
        smp = optuna.samplers.NSGAIISampler(seed=seed, population_size=8, **cons)
    else:
        smp = optuna.samplers.TPESampler(seed=seed, n_startup_trials=6, multivariate=True,
                                         **cons)
    import random
    import time

    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(8):
        # Workers starting together race to create the schema and the study; the loser of a
        # race sees a duplicate-key error and simply tries again (then finds them made).
        try:
            st = optuna.storages.RDBStorage(
                storage, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                engine_kwargs=None if storage.startswith("sqlite") else {"pool_pre_ping": True})
            return optuna.create_study(storage=st, study_name=study_name, sampler=smp,
                                       directions=["minimize", "minimize"], load_if_exists=True)
        except (IntegrityError, OperationalError, ProgrammingError):
            if attempt == 7:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def _constraints(t: optuna.trial.FrozenTrial) -> tuple[float]:
    """The sampler's view of a trial's constraint (user attribute, <= 0 feasible): samplers
    steer away from infeasible settings; trials without one are feasible."""
    return (float(t.user_attrs.get("constraint", 0.0)),)


def run(prob: Problem, evaluate: Evaluator, dense_ppl: float, study: optuna.Study, *,
        trials: int, space: Space, progress: bool = False) -> optuna.Study:
    """Run trials until the study holds `trials` finished ones (shared between workers). An
    evaluator that returns (perplexity, constraint) makes trials with a constraint > 0
    infeasible: the samplers avoid them and `front` leaves them out."""
    fp = prob.fingerprint()
    have = study.user_attrs.get("problem")
    if have is None:
        study.set_user_attr("problem", fp)
        study.set_user_attr("dense_ppl", dense_ppl)
    elif have != fp:
        raise ValueError(f"study '{study.study_name}' was made for another problem (other "
                         "candidates, units or lengths); use another --study-name")
    cache: dict[tuple, float] = {}

    def objective(trial: optuna.Trial):
        target, w, agg, split, tilt, fams, power, dense_top = _suggest(trial, prob, space)
        choice = assign(prob, target, w, agg, split, tilt, fams, power, dense_top, clamp=True,
                        max_density=space.max_density)
        if choice is None or prob.latency(choice) > target_range(prob, space)[1] + 1e-9:
            raise optuna.TrialPruned("no assignment of these settings meets the budgets")
        key = tuple(choice.tolist())
        if key not in cache:
            cache[key] = evaluate(prob.choice_cells(choice))
        ppl = cache[key]
        if isinstance(ppl, tuple):
            ppl, violation = ppl
            trial.set_user_attr("constraint", float(violation))
            if _SET_CONSTRAINT:
                trial.set_constraint("recall", float(violation))
        trial.set_user_attr("choice", list(key))
        trial.set_user_attr("density", prob.mean_density(choice))
        trial.set_user_attr("worker", os.getpid())
        return prob.latency(choice), ppl / dense_ppl

    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if not study.trials:
        lo, hi = target_range(prob, space)
        base = {"latency_target": min(hi, max(lo, 0.5)), "length_agg": "max", "layer_tilt": 0.0,
                "loss_power": 1.0, "dense_top": 0.0,
                "layer_split": "global", **{f"w_{s}": 1.0 for s in prob.signal_names},
                **{f"use_{f}": True for f in prob.families()}}
        starts = [base,
                  # A DuoAttention-like start: the heads the MoA signal ranks worst stay dense.
                  # (With retrieval samples, recall's ranking joins the MoA signal's.)
                  {**base, "w_error": 0.0, "w_mass": 0.0, "loss_power": 2.0, "dense_top": 0.2},
                  # The best uniform plan (one candidate everywhere) within the budget.
                  {**base, "layer_split": "uniform"}]
        # Then the base with one signal at a time, and with compounding losses: each varies
        # one setting, where TPE's early trials move all of them at once and rarely land
        # near a good point within a few dozen trials (docs/BENCHMARKS.md).
        names = prob.signal_names
        starts += [{**base, **{f"w_{s}": float(s == only) for s in names}} for only in names]
        starts.append({**base, "loss_power": 2.0})
        for params in starts[:trials]:  # never more than the trials asked for
            study.enqueue_trial(params, skip_if_exists=True)
    left = trials - len(study.get_trials(deepcopy=False, states=done_states))
    if left <= 0:
        return study
    cb = optuna.study.MaxTrialsCallback(trials, states=done_states)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=left, callbacks=[cb], show_progress_bar=progress,
                   catch=())
    return study


def front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The Pareto-optimal finished trials, fastest first (duplicates of a choice dropped),
    among the feasible ones (constraint <= 0; all of them if none is feasible, so that the
    caller can still return the best it found)."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    pool = [t for t in done if t.user_attrs.get("constraint", 0.0) <= 0] or done
    best = [t for t in pool if not any(
        all(a <= b for a, b in zip(o.values, t.values, strict=True)) and o.values != t.values
        for o in pool)]
    seen, out = set(), []
    for t in sorted(best, key=lambda t: (t.values[0], t.values[1], t.number)):
        key = tuple(t.user_attrs.get("choice", ()))
        if key and key not in seen:
            seen.add(key)
            out.append(t)
    return out


__all__ = ["Problem", "RECALL", "SIGNALS", "Space", "assign", "build_problem",
           "default_storage", "front", "open_study", "run"]
