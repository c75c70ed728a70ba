"""attnc: a compiler for attention patterns (.attn files to Triton kernels) and a head tuner."""

from __future__ import annotations

# load/loads return a Program that also compiles kernels (attnc.api.Library).
from attnc.api import Kernel, Library, load, loads
from attnc.dsl.check import Program
from attnc.dsl.errors import AttncError
from attnc.dsl.parser import parse

__version__ = "0.1.0"

__all__ = ["AttncError", "Kernel", "Library", "Program", "__version__", "load", "loads", "parse"]
