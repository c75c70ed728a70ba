"""Per-head autotuning under accuracy and latency budgets: capture, signals, latency, search."""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    """`attnc.autotune` is this package and also the tuner: attnc.autotune(model, calib_ids,
    ...) calls attnc.tune_api.autotune (imported on first use: it needs torch and
    transformers)."""

    def __call__(self, *args, **kwargs):
        from attnc.tune_api import autotune

        return autotune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
