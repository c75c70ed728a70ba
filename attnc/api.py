"""Kernels from Python: attnc.load("f.attn").compile("streaming", window=512)(q, k, v)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from attnc.dsl.check import PatternInfo, Program, call_with_args
from attnc.dsl.check import load as _load
from attnc.dsl.check import loads as _loads
from attnc.dsl.errors import AttncError


@dataclass
class Library(Program):
    """A checked .attn program (an attnc.Program) whose patterns compile to kernels."""

    def compile(self, pattern: str, args: dict | None = None, *, block_m: int = 128,
                block_n: int = 128, layout: str = "auto", **pattern_args) -> Kernel:
        """A callable kernel for one pattern. Arguments are Python values or expression
        strings that may use n and h ("n // 8"); the block mask is built per problem size on
        first use (elastic arguments depend on n)."""
        from attnc.compiler.blockmask import Schedule

        info = self.pattern(pattern)
        merged = {**(args or {}), **pattern_args}
        try:
            schedule = Schedule(block_m, block_n)
        except ValueError as e:
            raise AttncError(str(e)) from None
        for name, b in schedule.odd_tiles():  # refused now, not at the first call
            raise AttncError(f"{name} {b} is not supported: the kernel needs a power of two")
        if layout not in ("auto", "none"):
            raise AttncError(f"layout must be 'auto' or 'none', not {layout!r}")
        parsed = _arguments(merged)
        _check_arguments(info, parsed)
        return Kernel(info, parsed, schedule, layout)


def _check_arguments(info: PatternInfo, args: dict) -> None:
    """What can be checked without a problem size, checked here rather than at the first
    call: a misspelt or missing parameter, a float for an int, an expression that uses q or k,
    and a constant out of the parameter's range (elastic ones are range-checked per n)."""
    call_with_args(info, args)
    missing = [prm.name for prm in info.params if prm.required and prm.name not in args]
    if missing:
        raise AttncError(f"pattern '{info.name}' needs argument '{missing[0]}'")
    for name, v in args.items():
        prm = info.param(name)
        if isinstance(v, int | float) and not isinstance(v, bool) and not prm.in_range(v):
            raise AttncError(f"parameter '{name}' of '{info.name}' is {v!r}, out of range "
                             f"{prm.range_text()}")


def _arguments(args: dict) -> dict:
    from attnc.dsl.parser import parse_expr

    out = {}
    for name, value in args.items():
        out[name] = parse_expr(value, f"argument {name}") if isinstance(value, str) else value
    return out


def load(path: str | os.PathLike, *, with_library: bool = True) -> Library:
    """Parse and check a file (raises AttncError); the result also compiles kernels."""
    p = _load(path, with_library=with_library)
    return Library(p.main, p.modules)


def loads(text: str, file: str = "<string>", **kwargs) -> Library:
    p = _loads(text, file, **kwargs)
    return Library(p.main, p.modules)


@dataclass
class Kernel:
    """Sparse attention with one pattern: kernel(q, k, v) on [B, H, Lq, D] / [B, Hkv, n, D]
    tensors returns the output (and the LSE with return_lse=True). Triton's binaries are kept
    in ATTNC_CACHE_DIR/triton, so a second process launches without compiling."""

    pattern: PatternInfo
    args: dict
    schedule: object
    layout: str = "auto"
    _masks: dict = field(default_factory=dict, repr=False)

    def blockmask(self, n: int, q_len: int | None = None, heads: int = 1):
        """The block-mask IR for one problem size (built once per size)."""
        from attnc.compiler.stages import compile_pattern

        q_len = n if q_len is None else q_len
        key = (n, q_len, heads)
        if key not in self._masks:
            if not self.pattern.dynamic:
                # Range checks and requirements of the arguments at this n, as the CLI does
                # (the block mask alone would silently compile an out-of-range value).
                from attnc import reference

                reference.evaluate(self.pattern, n=n, heads=min(heads, 64), q_len=1,
                                   args=self.args)
            c = compile_pattern(self.pattern, self.args, n=n, heads=heads, q_len=q_len,
                                schedule=self.schedule, layout=self.layout)
            self._masks[key] = c.blockmask
        return self._masks[key]

    def source(self, n: int, q_len: int | None = None, heads: int = 1) -> str:
        from attnc.codegen.kernel import kernel_source

        return kernel_source(self.blockmask(n, q_len, heads))

    def __call__(self, q, k, v, *, sm_scale: float | None = None, return_lse: bool = False):
        from attnc.codegen import cache

        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise AttncError("q, k, v must be [batch, heads, length, head_dim] tensors")
        _, H, Lq, _ = q.shape
        n = k.shape[2]
        if not 1 <= Lq <= n:
            raise AttncError(f"q has {Lq} queries, k has {n} keys: need 1 <= q_len <= n")
        bm = self.blockmask(n, Lq, H)
        try:
            with cache.triton_cache():
                if self.pattern.dynamic:
                    from attnc.codegen.dynamic import dynamic_attention

                    res = dynamic_attention(q, k, v, bm, sm_scale=sm_scale)
                else:
                    from attnc.codegen.kernel import attention

                    res = attention(q, k, v, bm, sm_scale=sm_scale)
        except ValueError as e:
            # The launch's input checks (GQA head counts, k/v shapes, dtypes, head dim) raise
            # ValueError; this API's errors are AttncError, as its other shape checks are.
            raise AttncError(str(e)) from None
        return (res.out, res.lse) if return_lse else res.out

    def build(self, arch: str, dtype: str = "bf16", head_dim: int = 128, *, n: int = 4096,
              heads: int = 1):
        """The ahead-of-time binary for one GPU architecture (codegen.artifact.Built), from
        the cache or compiled by Triton on this machine (no GPU needed)."""
        from attnc.codegen import artifact

        return artifact.build(self.blockmask(n, n, heads), dtype, head_dim, arch)


__all__ = ["Kernel", "Library", "load", "loads"]
