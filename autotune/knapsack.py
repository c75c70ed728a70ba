"""Exact per-head assignment: a multiple-choice knapsack solved as a MILP with scipy (HiGHS)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix


def solve(loss: np.ndarray, cost: np.ndarray, budget: float, *,
          allowed: np.ndarray | None = None,
          groups: Sequence[tuple[Sequence[int], float]] = (),
          limits: Sequence[tuple[np.ndarray, float]] = (),
          time_limit: float = 30.0) -> np.ndarray | None:
    """Choose one option per unit minimising sum(loss) subject to sum(cost) <= budget, for
    each (units, sub_budget) in groups, the cost of those units <= sub_budget, and for each
    (weight [U, C], bound) in limits, the summed weight of the choice <= bound (e.g. a
    density budget beside the latency one).

    loss, cost: [U, C]; allowed: [U, C] bool (disallowed options and non-finite losses are
    excluded). Returns the option index per unit, or None when infeasible."""
    U, C = loss.shape
    ok = np.isfinite(loss) & np.isfinite(cost)
    if allowed is not None:
        ok &= allowed
    if not ok.any(axis=1).all():
        return None
    uu, cc = np.nonzero(ok)
    V = uu.size
    c = loss[uu, cc].astype(np.float64)
    # Costs in units of the budget: per-head times of 1e-5 ms are far below HiGHS's absolute
    # tolerances, which then misjudge a budget that only the cheapest choice meets.
    scale = budget if np.isfinite(budget) and budget > 0 else 1.0
    w = cost[uu, cc].astype(np.float64) / scale
    budget = budget / scale
    groups = [(units, sub / scale) for units, sub in groups]
    rows = [csr_matrix((np.ones(V), (uu, np.arange(V))), shape=(U, V))]
    lo, hi = [np.ones(U)], [np.ones(U)]
    rows.append(csr_matrix(w.reshape(1, -1)))
    lo.append(np.array([-np.inf]))
    hi.append(np.array([budget]))
    for units, sub in groups:
        sel = np.isin(uu, np.asarray(list(units)))
        rows.append(csr_matrix((w * sel).reshape(1, -1)))
        lo.append(np.array([-np.inf]))
        hi.append(np.array([sub]))
    for weight, bound in limits:
        wl = np.asarray(weight, dtype=np.float64)[uu, cc]
        # Same reasoning as the budget: bounds of order one for HiGHS's tolerances.
        sc = abs(bound) if bound else 1.0
        rows.append(csr_matrix((wl / sc).reshape(1, -1)))
        lo.append(np.array([-np.inf]))
        hi.append(np.array([bound / sc]))
    from scipy.sparse import vstack

    A = vstack(rows).tocsr()
    res = milp(c, constraints=LinearConstraint(A, np.concatenate(lo), np.concatenate(hi)),
               integrality=np.ones(V), bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "mip_rel_gap": 1e-6})
    if res.x is None:
        return None
    x = res.x > 0.5
    out = np.full(U, -1, dtype=np.int64)
    out[uu[x]] = cc[x]
    if (out < 0).any():
        return None
    return out


def brute_force(loss: np.ndarray, cost: np.ndarray, budget: float,
                allowed: np.ndarray | None = None,
                limits: Sequence[tuple[np.ndarray, float]] = ()
                ) -> tuple[float, np.ndarray | None]:
    """Exhaustive reference for small instances (tests): the best loss and a choice."""
    import itertools

    U, C = loss.shape
    best, arg = np.inf, None
    for choice in itertools.product(range(C), repeat=U):
        idx = np.arange(U), np.array(choice)
        if allowed is not None and not allowed[idx].all():
            continue
        if any(np.asarray(w)[idx].sum() > b + 1e-9 for w, b in limits):
            continue
        if cost[idx].sum() <= budget + 1e-9 and loss[idx].sum() < best:
            best, arg = float(loss[idx].sum()), np.array(choice)
    return best, arg


__all__ = ["brute_force", "solve"]
