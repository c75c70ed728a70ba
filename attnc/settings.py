"""Typed settings read once from the environment; the one place attnc reads os.environ."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
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
    # Where Triton keeps the binaries of attnc's kernels: TRITON_CACHE_DIR when the user set it,
    # else ATTNC_CACHE_DIR/triton, so one cache folder holds sources, artifacts and binaries.
    triton_cache_dir: Path

    @staticmethod
    def from_env() -> Settings:
        cache = os.environ.get("ATTNC_CACHE_DIR")
        cache_dir = Path(cache).expanduser() if cache else _default_cache_dir()
        triton_cache = os.environ.get("TRITON_CACHE_DIR", "").strip()
        return Settings(
            debug=_flag("ATTNC_DEBUG"),
            cache_dir=cache_dir,
            triton_interpret=_flag("TRITON_INTERPRET"),
            triton_cache_dir=Path(triton_cache).expanduser() if triton_cache
            else cache_dir / "triton",
        )


def settings() -> Settings:
    """Current settings (re-read each call so tests can change the environment)."""
    return Settings.from_env()


_TRITON_LOCK = threading.RLock()


@contextlib.contextmanager
def triton_knobs(*, cache_dir: Path | None = None, interpret: bool | None = None
                 ) -> Iterator[None]:
    """For the duration: Triton's cache folder and whether @triton.jit makes interpreted
    functions (decided when a module is imported). Through triton.knobs where it exists (Triton
    >= 3.4), else through the environment variables older Triton reads at each use; restored
    afterwards. Process-wide, hence the lock."""
    with _TRITON_LOCK:
        try:
            from triton import knobs
        except ImportError:
            knobs = None
        if knobs is not None and hasattr(knobs, "cache") and hasattr(knobs.cache, "scope"):
            with knobs.cache.scope(), knobs.runtime.scope():
                if cache_dir is not None:
                    knobs.cache.dir = str(cache_dir)
                if interpret is not None:
                    knobs.runtime.interpret = interpret
                yield
            return
        saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_INTERPRET")}
        try:
            if cache_dir is not None:
                os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
            if interpret is not None:
                os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def subprocess_env(*, interpret: bool | None = None) -> dict[str, str]:
    """This process's environment for a child, with TRITON_INTERPRET set or removed."""
    env = dict(os.environ)
    if interpret is not None:
        env.pop("TRITON_INTERPRET", None)
        if interpret:
            env["TRITON_INTERPRET"] = "1"
    return env
