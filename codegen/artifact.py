"""Ahead-of-time kernel binaries: kernels compiled by Triton for a named GPU, on any machine."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from attnc.compiler.blockmask import BlockMaskIR
from attnc.compiler.ir import to_text
from attnc.dsl.errors import AttncError

from attnc import atomic
from attnc.settings import settings, subprocess_env

from . import cache
from . import kernel as K

# Architectures Triton's NVIDIA backend compiles for (ptxas ships with Triton). AMD targets
# need ROCm's linker, which a CPU build machine lacks, so they are not offered.
ARCHS = {"sm_75": 75, "sm_80": 80, "sm_86": 86, "sm_87": 87, "sm_89": 89, "sm_90": 90,
         "sm_100": 100, "sm_120": 120}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                 torch.float64: "fp64", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
                 torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}
# What an ahead-of-time binary assumes, recorded in every manifest: pointers are 16-byte
# aligned (every torch allocation is), integers are not specialised (the JIT also keys on
# values that are 1 or multiples of 16, which a binary for all sizes cannot).
SPECIALIZATION = "pointers 16-byte aligned; integer arguments unspecialised (i32 below 2**31)"


def parse_archs(text: str | None) -> list[str]:
    out = []
    for a in _items(text, "--arch"):
        a = a.lower()
        if a not in ARCHS:
            raise AttncError(f"unknown --arch '{a}' (known: {', '.join(ARCHS)})")
        out.append(a)
    return out


def parse_dtypes(text: str | None) -> list[str]:
    out = []
    for d in _items(text, "--dtype"):
        if d not in DTYPES:
            raise AttncError(f"unknown --dtype '{d}' (known: {', '.join(DTYPES)})")
        out.append(d)
    return out


def parse_head_dims(text: str | None) -> list[int]:
    out = []
    for d in _items(text, "--head-dim"):
        if not re.fullmatch(r"[0-9]+", d) or not 16 <= int(d) <= 256 or int(d) & (int(d) - 1):
            raise AttncError(f"bad --head-dim '{d}' (a power of two from 16 to 256)")
        out.append(int(d))
    return out


def _items(text: str | None, flag: str) -> list[str]:
    """A comma list's items, each once; an empty item ('', 'a,,b') is a mistake, not nothing."""
    if text is None:
        return []
    seen: list[str] = []
    for x in text.split(","):
        x = x.strip()
        if not x:
            raise AttncError(f"empty item in {flag} '{text}' (a comma list such as "
                             f"{_EXAMPLES[flag]})")
        if x not in seen:
            seen.append(x)
    return seen


_EXAMPLES = {"--arch": "sm_80,sm_90", "--dtype": "bf16,fp16", "--head-dim": "64,128"}


# ---------------------------------------------------------------- the launch


@dataclass
class Launch:
    """One kernel launch as data: the generated source, the grid and the arguments of its
    `attnc_fwd` (keyword arguments hold constexprs and launch options such as num_warps)."""

    source: str
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)


def launch_args(q, k, v, bm: BlockMaskIR, *, arithmetic: bool | None = None,
                interpret: bool = False) -> Launch:
    """The launch kernel.attention() would make, without launching (tensors may live on the
    meta device): kernel.launch_args builds it, so the arguments follow the kernel's code."""
    got = K.launch_args(q, k, v, bm, arithmetic=arithmetic, interpret=interpret)
    return Launch(got.source, tuple(got.grid), tuple(got.args), dict(got.kwargs))


def probe_tensors(bm: BlockMaskIR, dtype: str, head_dim: int):
    """q, k, v on the meta device (no memory) with the shapes the block mask expects."""
    n = bm.n_var
    lay = bm.layout
    q_len = n if lay is not None and lay.moves_queries() else bm.q_len
    H = bm.heads
    dt = DTYPES[dtype]
    q = torch.empty((1, H, q_len, head_dim), dtype=dt, device="meta")
    k = torch.empty((1, H, n, head_dim), dtype=dt, device="meta")
    return q, k, torch.empty_like(k)


# ---------------------------------------------------------------- signature


@dataclass
class Signature:
    """What Triton compiles: argument types by name ('constexpr' for constexprs), constexpr
    values, the names of pointer arguments (assumed 16-byte aligned) and launch options."""

    types: dict[str, str]
    constexprs: dict[str, object]
    aligned: list[str]
    options: dict[str, object]

    def text(self) -> str:
        return json.dumps({"types": self.types, "constexprs": self.constexprs,
                           "aligned": self.aligned, "options": self.options}, sort_keys=True,
                          default=str)


def _type_of(name: str, value) -> str:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _TRITON_TYPES:
            raise AttncError(f"kernel argument {name}: no Triton type for {value.dtype}")
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise AttncError(f"kernel argument {name}: cannot type a {type(value).__name__}")


def signature(fn, launch: Launch) -> Signature:
    """Bind the launch's arguments to the kernel's own parameters (no argument list is
    written here): constexpr parameters give values, the others Triton types; keywords that
    are not parameters are launch options."""
    params = list(fn.params)
    names = [p.name for p in params]
    kw = {k: v for k, v in launch.kwargs.items() if k in names}
    options = {k: v for k, v in launch.kwargs.items() if k not in names}
    try:
        bound = inspect.signature(fn.fn).bind(*launch.args, **kw)
    except TypeError as e:
        raise AttncError(f"the launch does not fit attnc_fwd's parameters: {e}") from None
    bound.apply_defaults()
    types: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    aligned = []
    for p in params:
        value = bound.arguments[p.name]
        if p.is_constexpr or value is None:
            types[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        ann = getattr(p, "annotation_type", None)
        types[p.name] = ann if isinstance(ann, str) and ann else _type_of(p.name, value)
        if types[p.name].startswith("*"):
            aligned.append(p.name)
    return Signature(types, constexprs, aligned, options)


# ---------------------------------------------------------------- compiling


@dataclass
class Built:
    """An ahead-of-time binary in the cache."""

    entry: cache.Entry
    hit: bool  # found in the cache (no compilation)
    seconds: float

    @property
    def binary(self) -> Path:
        return self.entry.file(self.entry.manifest["binary"])


def ir_text(bm: BlockMaskIR) -> str:
    """The canonical IR the kernel computes, without the pattern's name (a label); for a plan
    kernel, each variant's IR and the head -> variant map."""
    if isinstance(bm, K.PlanMask):
        return "\n".join([f"(heads {' '.join(map(str, bm.head_variant))})"]
                         + [f"(variant {i}\n{ir_text(v)})" for i, v in enumerate(bm.variants)])
    p = bm.pattern
    bias = to_text(p.bias) if p.bias is not None else "none"
    return f"(mask {to_text(p.mask)})\n(bias {bias})"


def build(bm: BlockMaskIR, dtype: str, head_dim: int, arch: str, *,
          arithmetic: bool | None = None) -> Built:
    """The binary of bm's kernel for one dtype, head dim and architecture: from the cache, or
    compiled by Triton (about a second; no GPU needed) and stored."""
    if arch not in ARCHS:
        raise AttncError(f"unknown arch '{arch}' (known: {', '.join(ARCHS)})")
    if dtype not in DTYPES:
        raise AttncError(f"unknown dtype '{dtype}' (known: {', '.join(DTYPES)})")
    t0 = time.perf_counter()
    launch = launch_args(*probe_tensors(bm, dtype, head_dim), bm, arithmetic=arithmetic,
                         interpret=False)
    fn = cache.load_kernel(launch.source, interpret=False)
    sig = signature(fn, launch)
    vers = cache.versions()
    fields = {"attnc_sources": vers["attnc_sources"], "ir": ir_text(bm),
              "schedule": bm.schedule.text(), "source_sha256": cache.sha256(launch.source),
              "signature": sig.text(), "dtype": dtype, "head_dim": str(head_dim), "arch": arch,
              "triton": vers["triton"], "torch": vers["torch"]}
    key = cache.make_key(fields)
    found = cache.lookup(key)
    if found is not None:
        return Built(found, True, time.perf_counter() - t0)
    files, info = _compile(launch.source, sig, arch)
    files["kernel.py"] = launch.source.encode()
    manifest = {
        "pattern": bm.pattern.name, "ir": fields["ir"], "ir_key": bm.pattern.key,
        "schedule": fields["schedule"], "source": "kernel.py",
        "source_sha256": fields["source_sha256"], "dtype": dtype, "head_dim": head_dim,
        "arch": arch, "versions": vers, "signature": sig.types,
        "constexprs": {k: v for k, v in sig.constexprs.items()}, "aligned": sig.aligned,
        "options": sig.options, "specialization": SPECIALIZATION, "grid": _grid_text(),
        **info,
    }
    entry = cache.store(key, files, json.loads(json.dumps(manifest, default=str)))
    return Built(entry, False, time.perf_counter() - t0)


def _grid_text() -> str:
    return "(ceil(q_len / BLOCK_M), batch * heads)"


def _compile(source: str, sig: Signature, arch: str) -> tuple[dict[str, bytes], dict]:
    """Compile in this process, or in a child when this one runs Triton's interpreter: Triton
    decides at import whether its own library functions are interpreted, and interpreted ones
    cannot be compiled."""
    if not settings().triton_interpret:
        return _compile_here(cache.load_kernel(source, interpret=False), sig, arch)
    job = {"source": source, "types": sig.types, "constexprs": sig.constexprs,
           "aligned": sig.aligned, "options": sig.options, "arch": arch}
    with tempfile.TemporaryDirectory(prefix="attnc-aot-") as d:
        r = subprocess.run([sys.executable, "-m", "attnc.codegen.artifact", d],
                           input=json.dumps(job), capture_output=True, text=True,
                           env=subprocess_env(interpret=False), timeout=900)
        if r.returncode != 0:
            lines = (r.stderr or r.stdout).strip().splitlines()
            raise AttncError(lines[-1].removeprefix("attnc: ") if lines else
                             f"Triton could not compile for {arch} (exit {r.returncode})")
        info = json.loads((Path(d) / "info.json").read_text())
        files = {name: (Path(d) / name).read_bytes() for name in info.pop("files")}
    return files, info


def _worker(folder: str) -> int:
    """`python -m attnc.codegen.artifact DIR`: compile the job on stdin into DIR."""
    job = json.loads(sys.stdin.read())
    sig = Signature(job["types"], job["constexprs"], job["aligned"], job["options"])
    try:
        files, info = _compile_here(cache.load_kernel(job["source"], interpret=False), sig,
                                    job["arch"])
    except AttncError as e:
        print(e.render(), file=sys.stderr)
        return 1
    for name, data in files.items():
        (Path(folder) / name).write_bytes(data)
    (Path(folder) / "info.json").write_text(json.dumps({**info, "files": sorted(files)}))
    return 0


def _compile_here(fn, sig: Signature, arch: str) -> tuple[dict[str, bytes], dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", ARCHS[arch], 32)
    index = {name: i for i, name in enumerate(fn.arg_names)}
    try:
        from triton.compiler.compiler import make_backend

        attr = make_backend(target).parse_attr("D")
        attrs = {(index[n],): attr for n in sig.aligned}
    except (ImportError, AttributeError):
        attrs = {}  # older Triton: no alignment hints, still a correct binary
    try:
        # Triton >= 3.3 keys constexprs by argument path; older versions by name.
        src = ASTSource(fn, sig.types, {(index[n],): v for n, v in sig.constexprs.items()},
                        attrs)
    except (TypeError, AssertionError):
        src = ASTSource(fn, sig.types, dict(sig.constexprs), attrs)
    with cache.triton_cache(), warnings.catch_warnings():
        # Triton 3.9 warns that a default will change; the binary records the options used.
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")
        try:
            compiled = triton.compile(src, target=target, options=dict(sig.options))
        except Exception as e:  # noqa: BLE001 - Triton's errors are many; report one line
            first = str(e).strip().splitlines()
            raise AttncError(f"Triton could not compile for {arch}: {type(e).__name__}: "
                             f"{first[-1] if first else ''}") from None
    asm = compiled.asm
    binary_ext = "cubin"
    files = {f"attnc_fwd.{binary_ext}": bytes(asm[binary_ext])}
    if "ptx" in asm:
        files["attnc_fwd.ptx"] = str(asm["ptx"]).encode()
    meta = compiled.metadata._asdict()
    meta["target"] = {"backend": target.backend, "arch": target.arch,
                      "warp_size": target.warp_size}
    files["attnc_fwd.json"] = json.dumps(meta, sort_keys=True, default=str).encode()
    info = {"binary": f"attnc_fwd.{binary_ext}", "kernel_name": meta.get("name"),
            "num_warps": meta.get("num_warps"), "num_stages": meta.get("num_stages"),
            "shared_bytes": meta.get("shared"), "triton_hash": meta.get("hash")}
    return files, info


# ---------------------------------------------------------------- compile -o DIR


@dataclass
class KernelSpec:
    """One kernel to write: its block mask and, for plans, the (layer, head) cells it serves."""

    name: str
    bm: BlockMaskIR
    cells: list[tuple[int, int]] = field(default_factory=list)


def plan_specs(plan, *, n: int, q_len: int, schedule) -> list[KernelSpec]:
    """One kernel per layer of a plan: its heads' patterns run in one launch (codegen.kernel's
    PlanMask); layers with the same head -> pattern map share a kernel, and a layer with one
    pattern gets a plain kernel. A layer with a dynamic pattern gets one kernel per pattern
    (their run-time builders are per pattern). Natural token order (no layout)."""
    from attnc.compiler.blockmask import build as build_bm
    from attnc.compiler.ir import PatternIR
    from attnc.compiler.lower import lower_plan
    from attnc.compiler.rules import rewrite

    from attnc import reference

    cells = lower_plan(plan)
    checked: set[str] = set()
    built: dict[str, BlockMaskIR] = {}

    def bm_for(ir: PatternIR, layer: int, head: int) -> BlockMaskIR:
        if ir.key not in built:
            if not ir.dynamic and ir.key not in checked:
                # Elastic arguments are range-checked by evaluating one query row.
                reference.evaluate_plan(plan, layer=layer, n=n, q_len=1, heads=[head])
                checked.add(ir.key)
            simple = PatternIR(ir.name, rewrite(ir.mask),
                               rewrite(ir.bias) if ir.bias is not None else None)
            built[ir.key] = build_bm(simple, n=n, heads=plan.heads, q_len=q_len,
                                     schedule=schedule)
        return built[ir.key]

    specs: dict[str, KernelSpec] = {}
    for layer in range(plan.layers):
        irs = [cells[(layer, h)] for h in range(plan.heads)]
        keys = list(dict.fromkeys(ir.key for ir in irs))
        if len(keys) == 1 or any(ir.dynamic for ir in irs):
            for h, ir in enumerate(irs):
                spec = specs.get(ir.key)
                if spec is None:
                    spec = specs[ir.key] = KernelSpec(ir.name, bm_for(ir, layer, h))
                spec.cells.append((layer, h))
            continue
        sig = " ".join(ir.key for ir in irs)
        if sig not in specs:
            firsts = {ir.key: (h, ir) for h, ir in reversed(list(enumerate(irs)))}
            variants = [bm_for(firsts[key][1], layer, firsts[key][0]) for key in keys]
            plan_mask = K.PlanMask(variants, [keys.index(ir.key) for ir in irs])
            specs[sig] = KernelSpec(f"{plan.name}-layer{layer}", plan_mask)
        specs[sig].cells += [(layer, h) for h in range(plan.heads)]
    return list(specs.values())


def write_output(out: str | Path, specs: list[KernelSpec], *, archs: list[str],
                 dtypes: list[str], head_dims: list[int], about: dict,
                 log=None) -> dict:
    """Write DIR/<kernel>/kernel.py, DIR/<kernel>/<arch>-<dtype>-d<D>.cubin (+ .json, .ptx)
    and DIR/manifest.json, last; binaries come from the cache. Returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kernels = []
    for spec in specs:
        source = K.kernel_source(spec.bm)
        folder = f"{spec.name}-{cache.sha256(source)[:10]}"
        (out / folder).mkdir(exist_ok=True)
        atomic.write_text(out / folder / "kernel.py", source)
        binaries = []
        for arch in archs:
            for dtype in dtypes:
                for hd in head_dims:
                    b = build(spec.bm, dtype, hd, arch)
                    m = b.entry.manifest
                    stem = f"{arch}-{dtype}-d{hd}"
                    files = {}
                    for name in sorted(m["files"]):
                        if name == "kernel.py":
                            continue
                        dst = f"{stem}.{name.rsplit('.', 1)[1]}"
                        atomic.write_bytes(out / folder / dst, b.entry.file(name).read_bytes())
                        files[dst] = m["files"][name]
                    binaries.append({
                        "arch": arch, "dtype": dtype, "head_dim": hd, "key": b.entry.key,
                        "file": f"{folder}/{stem}.{m['binary'].rsplit('.', 1)[1]}",
                        "files": {f"{folder}/{k}": v for k, v in files.items()},
                        "kernel_name": m.get("kernel_name"), "num_warps": m.get("num_warps"),
                        "num_stages": m.get("num_stages"), "shared_bytes": m.get("shared_bytes"),
                        "signature": m["signature"], "constexprs": m["constexprs"],
                        "aligned": m["aligned"], "options": m["options"],
                    })
                    if log is not None:
                        how = "cached" if b.hit else f"compiled in {b.seconds:.1f} s"
                        log(f"{spec.name} {arch} {dtype} d{hd}: {how} (key {b.entry.key[:16]})")
        kernels.append({
            "name": spec.name, "dir": folder, "source": f"{folder}/kernel.py",
            "source_sha256": cache.sha256(source), "ir": ir_text(spec.bm),
            "ir_key": spec.bm.pattern.key, "blockmask": spec.bm.text(),
            "cells": [list(c) for c in spec.cells], "binaries": binaries,
        })
    vers = cache.versions()
    key = cache.make_key({"kernels": " ".join(b["key"] for k in kernels for b in k["binaries"]),
                          "sources": " ".join(k["source_sha256"] for k in kernels),
                          "about": json.dumps(about, sort_keys=True, default=str)})
    manifest = {
        "attnc_manifest": 1, "key": key, **about,
        "schedule": specs[0].bm.schedule.text() if specs else None,
        "archs": archs, "dtypes": dtypes, "head_dims": head_dims,
        "specialization": SPECIALIZATION, "grid": _grid_text(),
        "versions": vers, "kernels": kernels,
    }
    atomic.write_text(out / "manifest.json",
                      json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return manifest


__all__ = ["ARCHS", "DTYPES", "Built", "KernelSpec", "Launch", "Signature", "build",
           "launch_args", "parse_archs", "parse_dtypes", "parse_head_dims", "plan_specs",
           "signature", "write_output"]


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
