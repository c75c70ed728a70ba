"""The artifact cache: keys, damaged entries found and rebuilt, concurrent writers, export and
import, generated sources, and kernel signatures derived from the kernel's own parameters."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from attnc.codegen import artifact, cache
from attnc.dsl.errors import AttncError
from test_artifacts import SMALL, env_for, run

from attnc import settings as S

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A cache holding one sm_90 entry (and Triton's binaries for it)."""
    base = tmp_path_factory.mktemp("warm")
    r = run("compile", *SMALL, "-o", str(base / "out"), "--arch", "sm_90", cache=base / "cache")
    assert r.returncode == 0, r.stderr
    return base / "cache"


@pytest.fixture
def copy(warm, tmp_path, monkeypatch):
    dst = tmp_path / "cache"
    shutil.copytree(warm, dst)
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(dst))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    return dst


def _only_entry() -> Path:
    (entry,) = cache.entries()
    return entry


def test_ls_lists_the_entry(copy):
    r = run("cache", "ls", cache=copy)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"# {copy}: 1 entry"
    assert lines[1].split()[1:5] == ["causal", "sm_90", "bf16", "d16"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "remove"])
def test_damaged_entry_is_detected_and_rebuilt(copy, damage):
    entry = _only_entry()
    good = {p.name: p.read_bytes() for p in entry.iterdir()}
    cubin = entry / "attnc_fwd.cubin"
    if damage == "truncate":
        cubin.write_bytes(good["attnc_fwd.cubin"][:1000])
    elif damage == "flip":
        data = bytearray(good["attnc_fwd.cubin"])
        data[len(data) // 2] ^= 0xFF
        cubin.write_bytes(bytes(data))
    elif damage == "manifest":
        (entry / "manifest.json").write_text(good["manifest.json"].decode()[:50])
    else:
        cubin.unlink()
    want = {"truncate": "attnc_fwd.cubin: 1000 bytes", "flip": "attnc_fwd.cubin: sha256",
            "manifest": "unreadable manifest", "remove": "attnc_fwd.cubin: missing"}[damage]
    assert cache.lookup(entry.name) is None
    r = run("cache", "verify", cache=copy)
    assert r.returncode == 1
    assert f"{entry.name[:16]}: damaged: {want}" in r.stdout, r.stdout
    assert "0 of 1 entries good" in r.stdout
    if damage == "flip":
        # --repair removes it; the next compile rebuilds it either way.
        assert run("cache", "verify", "--repair", cache=copy).returncode == 0
        assert cache.entries() == []
    r = run("compile", *SMALL, "-o", str(copy.parent / "out"), "--arch", "sm_90", cache=copy,
            counting=True)
    assert r.returncode == 0, r.stderr
    assert "compiled in" in r.stderr  # not "cached": the damaged entry was not used
    assert "triton compilations: 0" in r.stdout  # Triton's own cache still had the binary
    assert {p.name: p.read_bytes() for p in entry.iterdir()}.keys() == good.keys()
    assert (entry / "attnc_fwd.cubin").read_bytes() == good["attnc_fwd.cubin"]
    assert cache.verify() == []
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]


WRITER = """
import os, sys, time
from attnc.codegen import cache
start = float(sys.argv[1])
payload = os.urandom(200_000) + str(os.getpid()).encode()
time.sleep(max(0.0, start - time.time()))
e = cache.store("ab" * 32, {"blob.bin": payload, "note.txt": b"x" * 1000},
                {"writer": os.getpid()})
print(e.manifest["writer"], e.manifest["files"]["blob.bin"]["sha256"])
"""


def test_eight_concurrent_writers_leave_one_good_entry(tmp_path):
    """Eight processes store the same key at the same moment, each with its own bytes: one
    entry remains, whole, and every process is handed that one."""
    env = env_for(tmp_path / "cache")
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    answers = {o.strip() for o, _ in outs}
    assert len(answers) == 1, answers
    folder = tmp_path / "cache" / "kernels" / "ab"
    assert [p.name for p in folder.iterdir()] == ["ab" * 32]  # no temporary folders left
    manifest, problems = cache.check_entry(folder / ("ab" * 32))
    assert problems == []
    assert answers == {f"{manifest['writer']} {manifest['files']['blob.bin']['sha256']}"}


def test_export_import_round_trip(copy, tmp_path):
    entry = _only_entry()
    before = {p.name: p.read_bytes() for p in entry.iterdir()}
    archive = tmp_path / "kernels.tar.gz"
    r = run("cache", "export", str(archive), cache=copy)
    assert r.returncode == 0 and "exported 1 entries" in r.stdout, r.stderr
    # into a folder that does not exist: one line naming the archive, not the temp file
    r = run("cache", "export", str(tmp_path / "no" / "k.tar.gz"), cache=copy)
    assert r.returncode == 1 and "no folder" in r.stderr and ".tmp" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert run("cache", "clear", cache=copy).returncode == 0
    assert cache.entries() == [] and not (copy / "triton").exists()
    r = run("cache", "import", str(archive), cache=copy)
    assert r.returncode == 0 and "imported 1 entries (0 already present)" in r.stdout, r.stderr
    assert {p.name: p.read_bytes() for p in _only_entry().iterdir()} == before
    source = json.loads(before["manifest.json"])["source_sha256"]
    assert (copy / "sources" / source[:2] / f"k_{source}.py").read_bytes() == \
        before["kernel.py"]
    r = run("cache", "import", str(archive), cache=copy)
    assert "imported 0 entries (1 already present)" in r.stdout
    # An archive whose entry does not match its manifest is refused whole, in one line.
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(bad, "w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith(".cubin"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    shutil.rmtree(copy / "kernels")
    r = run("cache", "import", str(bad), cache=copy)
    assert r.returncode == 1 and "sha256 mismatch" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert cache.entries() == []


def test_import_of_a_missing_or_foreign_archive_is_one_plain_line(tmp_path, monkeypatch):
    """The OS's reason once, not "[Errno 2] No such file or directory: '<path>'" again."""
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "cache"))
    missing = tmp_path / "none.tar.gz"
    with pytest.raises(AttncError) as e:
        cache.import_(missing)
    assert str(e.value) == (f"attnc: cannot read cache archive '{missing}': "
                            "No such file or directory")
    junk = tmp_path / "junk.tar.gz"
    junk.write_text("junk")
    with pytest.raises(AttncError, match="junk.tar.gz': not a gzip file$"):
        cache.import_(junk)


def test_keys_are_canonical():
    a = cache.make_key({"ir": "(le k q)", "arch": "sm_90"})
    assert a == cache.make_key({"arch": "sm_90", "ir": "(le k q)"})
    assert len(a) == 64 and a != cache.make_key({"ir": "(le k q)", "arch": "sm_80"})
    # Values cannot run into each other: lengths come before values.
    assert cache.make_key({"a": "x\nb 1\ny"}) != cache.make_key({"a": "x", "b": "y"})


def test_sources_are_content_addressed(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    src = "import triton\nimport triton.language as tl\n\n\n@triton.jit\n" \
          "def attnc_fwd(X, n, BLOCK: tl.constexpr):\n    pass\n"
    path = cache.write_source(src)
    assert path == tmp_path / "sources" / cache.sha256(src)[:2] / f"k_{cache.sha256(src)}.py"
    path.write_text(src[:10])  # a damaged copy is replaced, not imported
    fn = cache.load_kernel(src, interpret=False)
    assert path.read_text() == src
    assert cache.load_kernel(src, interpret=False) is fn
    assert type(fn).__name__ == "JITFunction"


KERNEL = """import triton
import triton.language as tl


@triton.jit
def attnc_fwd(X, Y, n, big, scale, flag, NOTHING, BLOCK: tl.constexpr, MODE: tl.constexpr):
    pass
"""


def test_signature_follows_the_kernel_parameters(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    fn = cache.load_kernel(KERNEL, interpret=False)
    x = torch.empty(4, dtype=torch.bfloat16, device="meta")
    y = torch.empty(4, dtype=torch.int32, device="meta")
    launch = artifact.Launch(KERNEL, (1,), (x, y, 7, 2**40, 0.5, True, None),
                             {"MODE": 2, "BLOCK": 64, "num_warps": 8})
    sig = artifact.signature(fn, launch)
    assert sig.types == {"X": "*bf16", "Y": "*i32", "n": "i32", "big": "i64", "scale": "fp32",
                         "flag": "i1", "NOTHING": "constexpr", "BLOCK": "constexpr",
                         "MODE": "constexpr"}
    assert sig.constexprs == {"NOTHING": None, "BLOCK": 64, "MODE": 2}
    assert sig.aligned == ["X", "Y"] and sig.options == {"num_warps": 8}
    with pytest.raises(cache.AttncError, match="does not fit attnc_fwd's parameters"):
        artifact.signature(fn, artifact.Launch(KERNEL, (1,), (x,), {"BOGUS": 1}))


def test_triton_knobs_are_restored(tmp_path):
    from triton import knobs

    before = knobs.cache.dir
    with S.triton_knobs(cache_dir=tmp_path / "t", interpret=False):
        assert knobs.cache.dir == str(tmp_path / "t") and knobs.runtime.interpret is False
    assert knobs.cache.dir == before
    assert os.environ.get("TRITON_INTERPRET") == ("1" if S.settings().triton_interpret else None)


def test_settings_triton_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert S.settings().triton_cache_dir == tmp_path / "triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert S.settings().triton_cache_dir == tmp_path / "mine"
