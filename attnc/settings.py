"""Typed settings read once from the environment; the one place attnc reads os.environ."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnc"


@dataclass(frozen=True)
class Settings:
    debug: bool  # ATTNC_DEBUG=1: show Python tracebacks instead of bare diagnostics
    cache_dir: Path  # ATTNC_CACHE_DIR: compiled-kernel cache (default ~/.cache/attnc)
    triton_interpret: bool  # TRITON_INTERPRET=1: run kernels in Triton's CPU interpreter

    @staticmethod
    def from_env() -> Settings:
        cache = os.environ.get("ATTNC_CACHE_DIR")
        return Settings(
            debug=_flag("ATTNC_DEBUG"),
            cache_dir=Path(cache).expanduser() if cache else _default_cache_dir(),
            triton_interpret=_flag("TRITON_INTERPRET"),
        )


def settings() -> Settings:
    """Current settings (re-read each call so tests can change the environment)."""
    return Settings.from_env()
