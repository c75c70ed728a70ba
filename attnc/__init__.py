"""attnc: a compiler for attention patterns (.attn files to Triton kernels) and a head tuner."""

from __future__ import annotations

# load/loads return a Program that also compiles kernels (attnc.api.Library).
from attnc.api import Kernel, Library, load, loads
from attnc.dsl.check import Program
from attnc.dsl.errors import AttncError
from attnc.dsl.parser import parse

__version__ = "0.1.0"

__all__ = ["AttncError", "Kernel", "Library", "Program", "__version__", "load", "loads", "parse"]


def __getattr__(name: str):
    # The head tuner needs torch and transformers: attnc.autotune(model, calib_ids, ...) and
    # attnc.apply(model, plan), attnc.train_gate(model, calib_ids) and attnc.finetune_gate
    # load it on first use.
    if name == "autotune":
        import importlib

        return importlib.import_module("attnc.autotune")
    if name == "apply":
        # Gated plans need their gate weights; every other plan goes on to autotune.apply.
        from attnc.gate_api import apply

        return apply
    if name in ("train_gate", "finetune_gate"):
        from attnc import gate_api

        return getattr(gate_api, name)
    raise AttributeError(f"module 'attnc' has no attribute {name!r}")
