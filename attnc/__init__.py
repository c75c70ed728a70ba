"""attnc: a compiler for attention patterns (.attn files to Triton kernels) and a head tuner."""

from __future__ import annotations

from attnc.dsl.check import Program, load, loads
from attnc.dsl.errors import AttncError
from attnc.dsl.parser import parse

__version__ = "0.1.0"

__all__ = ["AttncError", "Program", "__version__", "load", "loads", "parse"]
