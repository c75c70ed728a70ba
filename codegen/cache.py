"""The content-addressed artifact cache under ATTNC_CACHE_DIR: generated sources and kernels."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from attnc.dsl.errors import AttncError

from attnc import atomic
from attnc.settings import settings, triton_knobs

# Bumped when the entry layout or the manifest's meaning changes: old entries then miss.
SCHEMA = 1
MANIFEST = "manifest.json"
_PACKAGES = ("attnc", "dsl", "compiler", "codegen", "autotune", "patterns")


def root() -> Path:
    return settings().cache_dir


def kernels_dir() -> Path:
    return root() / "kernels"


def sources_dir() -> Path:
    return root() / "sources"


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


_SOURCES_DIGEST: str | None = None


def attnc_sources_digest() -> str:
    """sha256 over attnc's own sources (code, grammar, library), so any change to the compiler
    misses the cache: version numbers do not move while attnc is being developed."""
    global _SOURCES_DIGEST
    if _SOURCES_DIGEST is None:
        import attnc

        top = Path(attnc.__file__).resolve().parent.parent
        h = hashlib.sha256()
        for pkg in _PACKAGES:
            base = top / pkg
            files = [p for ext in ("*.py", "*.lark", "*.attn") for p in base.rglob(ext)]
            for p in sorted(files, key=lambda p: p.relative_to(top).as_posix()):
                if "__pycache__" in p.parts:
                    continue
                rel = p.relative_to(top).as_posix().encode()
                data = p.read_bytes()
                h.update(b"%d:%s%d:" % (len(rel), rel, len(data)) + data)
        _SOURCES_DIGEST = h.hexdigest()
    return _SOURCES_DIGEST


def versions() -> dict[str, str]:
    import torch
    import triton

    import attnc

    return {"attnc": attnc.__version__, "attnc_sources": attnc_sources_digest(),
            "triton": triton.__version__, "torch": torch.__version__,
            "python": ".".join(map(str, sys.version_info[:3]))}


def make_key(fields: dict[str, str]) -> str:
    """sha256 of a canonical text of the fields (sorted names, lengths before values, so no
    two field sets print alike); never hash() or pickle, which change between processes."""
    parts = [f"attnc-cache-schema {SCHEMA}\n"]
    for name in sorted(fields):
        value = str(fields[name])
        parts.append(f"{name} {len(value)}\n{value}\n")
    return sha256("".join(parts))


# ---------------------------------------------------------------- generated sources


def source_path(source: str) -> Path:
    d = sha256(source)
    return sources_dir() / d[:2] / f"k_{d}.py"


def write_source(source: str) -> Path:
    """Store a generated module under the sha256 of its text (atomically; an existing file
    with other contents, a damaged one, is replaced)."""
    path = source_path(source)
    try:
        if path.read_text() == source:
            return path
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, source)
    return path


_LOADED: dict[tuple[str, bool], object] = {}
_LOAD_LOCK = threading.Lock()


def load_kernel(source: str, interpret: bool | None = None):
    """Import generated source from the cache (Triton's JIT needs a real file) and return its
    `attnc_fwd`; one module per source text and mode. interpret: make interpreted functions
    (True), compilable ones (False), or follow TRITON_INTERPRET (None)."""
    mode = settings().triton_interpret if interpret is None else interpret
    digest = sha256(source)
    with _LOAD_LOCK:
        if (digest, mode) in _LOADED:
            return _LOADED[(digest, mode)]
        path = write_source(source)
        name = f"attnc_k_{digest[:24]}_{'i' if mode else 'c'}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        # @triton.jit decides at import whether it makes an interpreted function.
        with triton_knobs(interpret=mode):
            spec.loader.exec_module(mod)
        _LOADED[(digest, mode)] = mod.attnc_fwd
        return mod.attnc_fwd


@contextlib.contextmanager
def triton_cache(interpret: bool | None = None) -> Iterator[None]:
    """Triton's compilation cache in attnc's cache for the duration (binaries compiled by the
    JIT land there, so a second process finds them); interpret: see load_kernel."""
    with triton_knobs(cache_dir=settings().triton_cache_dir, interpret=interpret):
        yield


# ---------------------------------------------------------------- entries


@dataclass
class Entry:
    key: str
    path: Path
    manifest: dict

    def file(self, name: str) -> Path:
        return self.path / name


def entry_dir(key: str) -> Path:
    return kernels_dir() / key[:2] / key


def check_entry(path: Path, key: str | None = None) -> tuple[dict | None, list[str]]:
    """(manifest, problems) of an entry folder: the manifest parses, names its key and schema,
    and every file it lists exists with its recorded size and sha256."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return None, ["no manifest"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [f"unreadable manifest ({type(e).__name__})"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, ["manifest without a file list"]
    problems = []
    if manifest.get("schema") != SCHEMA:
        problems.append(f"schema {manifest.get('schema')!r}, expected {SCHEMA}")
    want = key or path.name
    if manifest.get("key") != want:
        problems.append(f"manifest names key {str(manifest.get('key'))[:16]}, folder {want[:16]}")
    for name, info in sorted(manifest["files"].items()):
        try:
            data = (path / name).read_bytes()
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if len(data) != info.get("bytes"):
            problems.append(f"{name}: {len(data)} bytes, expected {info.get('bytes')}")
        elif sha256(data) != info.get("sha256"):
            problems.append(f"{name}: sha256 mismatch")
    return manifest, problems


def lookup(key: str) -> Entry | None:
    """The verified entry for a key, or None (missing, or damaged: then it is rebuilt)."""
    path = entry_dir(key)
    manifest, problems = check_entry(path, key)
    if manifest is None or problems:
        return None
    return Entry(key, path, manifest)


def store(key: str, files: dict[str, bytes], manifest: dict) -> Entry:
    """Write an entry: every file into a private folder, the manifest (with each file's size
    and sha256) last, then one rename into place. When several processes build the same key,
    the first rename wins and the others keep its entry, so exactly one good entry remains; a
    damaged entry in the way is moved aside first."""
    final = entry_dir(key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        listed = {}
        for name, data in sorted(files.items()):
            if "/" in name or name in (MANIFEST, "", ".", ".."):
                raise ValueError(f"bad entry file name {name!r}")
            (tmp / name).write_bytes(data)
            listed[name] = {"bytes": len(data), "sha256": sha256(data)}
        full = {"schema": SCHEMA, "key": key, **manifest, "files": listed}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        for _attempt in range(3):
            try:
                os.rename(tmp, final)
                return Entry(key, final, full)
            except OSError:
                if not final.exists():
                    raise
            found = lookup(key)
            if found is not None:
                return found  # another process got there first
            _discard(final)
        raise AttncError(f"cannot install cache entry {key[:16]} in {final.parent}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _discard(path: Path) -> None:
    """Move a folder aside (one atomic rename, so readers never see half of it), then delete."""
    trash = path.parent / f".trash-{path.name[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def entries() -> list[Path]:
    """Every entry folder (finished or not; temporary folders excluded)."""
    base = kernels_dir()
    if not base.is_dir():
        return []
    return sorted(p for p in base.glob("*/*") if p.is_dir() and not p.name.startswith("."))


def verify(repair: bool = False) -> list[tuple[Path, list[str]]]:
    """(entry, problems) for every damaged entry; repair=True removes them (they are rebuilt
    the next time they are needed)."""
    bad = []
    for path in entries():
        _, problems = check_entry(path)
        if problems:
            bad.append((path, problems))
            if repair:
                _discard(path)
    return bad


def clear() -> int:
    """Delete attnc's entries, generated sources and (when it lives inside the cache) Triton's
    binaries; tuning records are measurements, not derived files, and stay."""
    removed = len(entries())
    for sub in ("kernels", "sources"):
        _discard(root() / sub)
    tri = settings().triton_cache_dir
    with contextlib.suppress(ValueError):
        tri.resolve().relative_to(root().resolve())
        _discard(tri)
    with _LOAD_LOCK:
        _LOADED.clear()
    return removed


def export(path: str | os.PathLike) -> int:
    """Write every good entry and the generated sources to a .tar.gz (atomically)."""
    n = 0
    with contextlib.ExitStack() as stack:
        try:
            tmp = stack.enter_context(atomic.atomic_path(path))
        except FileNotFoundError as e:  # the archive's folder is missing (atomic_path names it)
            raise AttncError(f"cannot write cache archive '{path}': no folder "
                             f"'{e.filename}'") from e
        tar = stack.enter_context(tarfile.open(tmp, "w:gz"))
        for entry in entries():
            _, problems = check_entry(entry)
            if problems:
                continue
            for f in sorted(entry.iterdir()):
                tar.add(f, arcname=f"kernels/{entry.parent.name}/{entry.name}/{f.name}",
                        recursive=False)
            n += 1
        src = sources_dir()
        if src.is_dir():
            for f in sorted(src.glob("*/k_*.py")):
                tar.add(f, arcname=f"sources/{f.parent.name}/{f.name}", recursive=False)
    return n


def import_(path: str | os.PathLike) -> tuple[int, int]:
    """Install the entries of an exported archive: (installed, already present). Each entry is
    verified before it is installed; an archive with a damaged entry or a path outside the
    cache is refused whole."""
    try:
        tar = tarfile.open(path, "r:gz")
    except (OSError, tarfile.TarError) as e:
        # The OS's reason alone: str(OSError) repeats the errno and the path.
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise AttncError(f"cannot read cache archive '{path}': {why}") from None
    groups: dict[str, dict[str, bytes]] = {}
    sources: dict[str, bytes] = {}
    with tar:
        for m in tar.getmembers():
            parts = m.name.split("/")
            if not m.isfile() or ".." in parts or m.name.startswith("/"):
                raise AttncError(f"cache archive '{path}': unexpected member '{m.name}'")
            data = tar.extractfile(m).read()
            if len(parts) == 4 and parts[0] == "kernels":
                groups.setdefault(parts[2], {})[parts[3]] = data
            elif len(parts) == 3 and parts[0] == "sources" and parts[2].startswith("k_"):
                sources[parts[2]] = data
            else:
                raise AttncError(f"cache archive '{path}': unexpected member '{m.name}'")
    checked = []
    for key, files in sorted(groups.items()):
        with tempfile.TemporaryDirectory() as d:
            for name, data in files.items():
                (Path(d) / name).write_bytes(data)
            manifest, problems = check_entry(Path(d), key)
        if manifest is None or problems:
            raise AttncError(f"cache archive '{path}': entry {key[:16]}: {'; '.join(problems)}")
        checked.append((key, files, manifest))
    for name, data in sources.items():
        text = data.decode()
        if f"k_{sha256(text)}.py" != name:
            raise AttncError(f"cache archive '{path}': source {name} does not match its name")
        write_source(text)
    installed = present = 0
    for key, files, manifest in checked:
        if lookup(key) is not None:
            present += 1
            continue
        body = {k: v for k, v in manifest.items() if k not in ("schema", "key", "files")}
        store(key, {k: v for k, v in files.items() if k != MANIFEST}, body)
        installed += 1
    return installed, present


def describe(path: Path) -> str:
    """One line for `attnc cache ls`."""
    manifest, problems = check_entry(path)
    if manifest is None or problems:
        return f"{path.name[:16]}  DAMAGED: {'; '.join(problems)}"
    size = sum(f["bytes"] for f in manifest["files"].values())
    return (f"{path.name[:16]}  {manifest.get('pattern', '?'):<16} {manifest.get('arch', '?'):<7} "
            f"{manifest.get('dtype', '?'):<5} d{manifest.get('head_dim', '?'):<4} "
            f"{size / 1024:8.1f} KiB")
