"""Per-head autotuning under accuracy and latency budgets: capture, signals, latency, search."""
