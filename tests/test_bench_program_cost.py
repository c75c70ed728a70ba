"""benchmarks/program_cost.py: its line fit, and its refusal without a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "bench_program_cost", Path(__file__).parents[1] / "benchmarks" / "program_cost.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_fit_recovers_slope_and_intercept():
    xs = [3.0, 17.4, 31.8, 57.6]
    slope, icpt = bench._fit(xs, [1.96 * x + 5.2 for x in xs])
    assert slope == pytest.approx(1.96) and icpt == pytest.approx(5.2)
    noisy = [1.96 * x + 5.2 + e for x, e in zip(xs, (0.3, -0.2, 0.1, -0.2), strict=True)]
    slope, icpt = bench._fit(xs, noisy)
    assert slope == pytest.approx(1.96, abs=0.02) and icpt == pytest.approx(5.2, abs=0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without one")
def test_refuses_without_a_gpu(capsys):
    assert bench.main(["--n", "1024"]) == 1
    assert "needs a GPU" in capsys.readouterr().err
