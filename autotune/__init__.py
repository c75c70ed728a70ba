"""Per-head autotuning under accuracy and latency budgets (to come)."""
