"""attnc compile -o: kernel sources, manifest and ahead-of-time binaries (sm_80, sm_90 built on
this CPU machine), warm-cache runs that compile nothing, the kernel API, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attnc.codegen import cache

import attnc
from attnc import reference

ROOT = Path(__file__).resolve().parent.parent
# A small kernel (16 x 16 blocks, head dim 16) compiles in about a second per architecture.
SMALL = ["--pattern", "causal", "--n", "64", "--block-m", "16", "--block-n", "16",
         "--head-dim", "16"]

# Runs the CLI in a child and prints how many compilations missed Triton's cache: every real
# compilation passes through triton.compile, which reports to this listener.
COUNTING = """
import sys
import triton
from attnc.cli import main
misses = []
def listener(*, src, metadata, metadata_group, times, cache_hit):
    if not cache_hit:
        misses.append(metadata.get("name"))
triton.knobs.compilation.listener = listener
status = main(sys.argv[1:])
print(f"triton compilations: {len(misses)}")
sys.exit(status)
"""


def env_for(cache: Path, interpret: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATTNC_DEBUG", "TRITON_CACHE_DIR")}
    env["ATTNC_CACHE_DIR"] = str(cache)
    env.pop("TRITON_INTERPRET", None)  # compile in the child itself (no grandchild)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def run(*args: str, cache: Path, counting: bool = False, cwd: Path | None = None):
    cmd = [sys.executable, "-c", COUNTING] if counting else [sys.executable, "-m", "attnc"]
    return subprocess.run(cmd + list(args), cwd=cwd or ROOT, env=env_for(cache),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One cold compile for sm_80 and sm_90 into a fresh cache (shared by the tests here)."""
    base = tmp_path_factory.mktemp("aot")
    r = run("compile", *SMALL, "-o", str(base / "out"), "--arch", "sm_80,sm_90", "--dtype",
            "bf16", cache=base / "cache", counting=True)
    assert r.returncode == 0, r.stderr
    return base, r


def test_manifest_sources_and_binaries(built):
    base, r = built
    assert "triton compilations: 2" in r.stdout, r.stdout
    m = json.loads((base / "out" / "manifest.json").read_text())
    assert m["pattern"] == "causal" and m["archs"] == ["sm_80", "sm_90"]
    assert m["dtypes"] == ["bf16"] and m["head_dims"] == [16]
    assert m["schedule"] == "(schedule :block_m 16 :block_n 16)"
    assert set(m["versions"]) >= {"attnc", "attnc_sources", "triton", "torch"}
    assert len(m["key"]) == 64
    (k,) = m["kernels"]
    assert k["ir"] == "(mask (le k q))\n(bias none)"
    source = (base / "out" / k["source"]).read_text()
    assert "def attnc_fwd(" in source
    assert k["source_sha256"] == cache.sha256(source)
    archs = {}
    for b in k["binaries"]:
        data = (base / "out" / b["file"]).read_bytes()
        assert data[:4] == b"\x7fELF"  # a cubin is an ELF file
        for name, info in b["files"].items():
            blob = (base / "out" / name).read_bytes()
            assert len(blob) == info["bytes"]
            assert cache.sha256(blob) == info["sha256"]
        meta = json.loads((base / "out" / b["file"].replace(".cubin", ".json")).read_text())
        archs[b["arch"]] = meta["target"]["arch"]
        assert b["signature"]["Q"] == "*bf16" and b["constexprs"]["HEAD_DIM"] == 16
        assert b["signature"]["HEAD_DIM"] == "constexpr"
        assert "Q" in b["aligned"] and b["options"]["num_warps"] >= 1
    assert archs == {"sm_80": 80, "sm_90": 90}
    # Different architectures are different binaries under different keys.
    assert len({b["key"] for b in k["binaries"]}) == 2


def test_second_compile_is_a_cache_hit(built, tmp_path):
    base, _ = built
    r = run("compile", *SMALL, "-o", str(tmp_path / "out"), "--arch", "sm_90,sm_80",
            cache=base / "cache", counting=True)
    assert r.returncode == 0, r.stderr
    assert "triton compilations: 0" in r.stdout
    assert r.stderr.count(": cached (key ") == 2, r.stderr
    first = json.loads((base / "out" / "manifest.json").read_text())
    again = json.loads((tmp_path / "out" / "manifest.json").read_text())
    keys = lambda m: sorted(b["key"] for k in m["kernels"] for b in k["binaries"])  # noqa: E731
    assert keys(first) == keys(again)


def test_plan_writes_one_kernel_per_layer(tmp_path):
    """Layer 1 mixes two patterns: one plan kernel; layers with one pattern get plain ones."""
    f = tmp_path / "p.attn"
    f.write_text("plan tiny(layers = 3, heads = 2) {\n    layers 0: dense\n"
                 "    layers 1 heads 0: streaming(sink = 2, window = 16)\n"
                 "    default: causal\n}\n")
    r = run("compile", str(f), "--plan", "tiny", "--n", "64", "-o", str(tmp_path / "out"),
            cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["plan"] == "tiny" and m["archs"] == []
    cells = {k["name"]: k["cells"] for k in m["kernels"]}
    assert cells == {"dense": [[0, 0], [0, 1]], "tiny-layer1": [[1, 0], [1, 1]],
                     "causal": [[2, 0], [2, 1]]}
    plan_kernel = next(k for k in m["kernels"] if k["name"] == "tiny-layer1")
    src = (tmp_path / "out" / plan_kernel["source"]).read_text()
    assert "pat = tl.load(PAT + h)" in src and "def attnc_block_1(" in src
    for k in m["kernels"]:
        assert (tmp_path / "out" / k["source"]).is_file() and k["binaries"] == []


@pytest.mark.parametrize(("args", "needle"), [
    (["--arch", "sm_99"], "unknown --arch 'sm_99'"),
    (["--arch", "sm_90", "--dtype", "int4"], "unknown --dtype 'int4'"),
    (["--head-dim", "48"], "bad --head-dim '48'"),
    # an empty item is a typo, not "no binaries" or "the default dtype"
    (["--arch", ""], "empty item in --arch ''"),
    (["--dtype", "bf16,,fp16"], "empty item in --dtype 'bf16,,fp16'"),
    (["--head-dim", "64,"], "empty item in --head-dim '64,'"),
])
def test_bad_input_is_one_line(tmp_path, args, needle):
    r = run("compile", *SMALL, "-o", str(tmp_path / "out"), *args, cache=tmp_path / "c")
    assert r.returncode == 1
    assert r.stderr.startswith(f"attnc: {needle}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_blocks_that_are_not_powers_of_two_are_refused_before_writing(tmp_path):
    """--block-m 100 draws and prints block masks, but no Triton tile has that size: with -o
    it is a usage error before anything is written, not an internal error while building."""
    r = run("compile", "--pattern", "causal", "--block-m", "100", "-o", str(tmp_path / "out"),
            "--arch", "sm_80", cache=tmp_path / "c")
    assert r.returncode == 2
    assert r.stderr == "attnc: --block-m 100: kernels (-o) need a power of two\n", r.stderr
    assert not (tmp_path / "out").exists()


def test_verify_without_stats_is_a_usage_error(tmp_path):
    r = run("compile", "--pattern", "causal", "--verify", cache=tmp_path / "c")
    assert r.returncode == 2 and r.stderr == "attnc: --verify applies to --emit stats\n", r.stderr
    r = run("compile", "--pattern", "causal", "--verify", "--emit", "stats", cache=tmp_path / "c")
    assert r.returncode == 0, r.stderr


def test_out_of_range_argument_is_one_diagnostic(tmp_path):
    """window = 0 breaks streaming's own range and, through it, window()'s: the user gets the
    first, at the argument, not a second one about the callee's parameter."""
    r = run("compile", "--pattern", "streaming", "--arg", "window=0", cache=tmp_path / "c")
    assert r.returncode == 1
    assert r.stderr.count("out of range") == 1, r.stderr
    assert "parameter 'window' of 'streaming' is 0, out of range 1.." in r.stderr


def test_missing_pattern_is_one_line(tmp_path):
    r = run("compile", "--pattern", "nope", "-o", str(tmp_path / "out"), "--arch", "sm_90",
            cache=tmp_path / "c")
    assert r.returncode == 1
    assert r.stderr.startswith("attnc: no pattern named 'nope'"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_pattern_without_a_kernel_form_is_one_line(tmp_path):
    """An integer ** the kernel printer cannot express: a one-line error, not an internal one."""
    f = tmp_path / "p.attn"
    f.write_text("pattern inv(e: int = -1) {\n    mask k <= q & (q - k) ** e == 0\n}\n")
    r = run("compile", str(f), "--pattern", "inv", "-o", str(tmp_path / "out"),
            cache=tmp_path / "c")
    assert r.returncode == 1
    assert r.stderr.startswith("attnc: the kernel cannot express integer (pow (sub q k) -1)"), \
        r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "internal error" not in r.stderr
    with pytest.raises(attnc.AttncError, match="the kernel cannot express"):
        attnc.load(f).compile("inv").source(16)



# ---------------------------------------------------------------- the kernel API


def _dense_reference(lib, name, args, q, k, v):
    H, n = q.shape[1], k.shape[2]
    ev = reference.evaluate(lib, name, n=n, heads=H, q_len=q.shape[2], args=args)
    G = H // k.shape[1]
    kk, vv = (x.repeat_interleave(G, 1).double() for x in (k, v))
    s = (q.double() @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if ev.bias is not None:
        s = s + ev.bias
    s = s.masked_fill(~ev.mask[None], float("-inf"))
    return torch.softmax(s, -1) @ vv, torch.logsumexp(s, -1)


@pytest.mark.parametrize(("name", "args", "H", "Hkv", "n", "q_len"), [
    ("streaming", {"sink": 3, "window": "n // 4"}, 2, 1, 50, 50),
    ("alibi", {"heads": 2}, 2, 2, 40, 24),
])
def test_load_compile_call_matches_reference(tmp_path, monkeypatch, name, args, H, Hkv, n,
                                             q_len):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors: the interpreter, also on a GPU host
    f = tmp_path / "lib.attn"
    f.write_text("pattern mine(w: int = 8) { mask causal & q - k < w }\n")
    lib = attnc.load(f)
    assert isinstance(lib, attnc.Program)
    kern = lib.compile(name, block_m=16, block_n=16, **args)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, H, q_len, 16, generator=g)
    k, v = (torch.randn(1, Hkv, n, 16, generator=g) for _ in range(2))
    out, lse = kern(q, k, v, return_lse=True)
    ref_args = {a: (n // 4 if x == "n // 4" else x) for a, x in args.items()}
    ref_out, ref_lse = _dense_reference(lib, name, ref_args, q, k, v)
    assert torch.allclose(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    # The same size reuses its block mask; the local pattern compiles too.
    assert kern.blockmask(n, q_len, H) is kern.blockmask(n, q_len, H)
    assert torch.isfinite(lib.compile("mine", w=4, block_m=16, block_n=16)(q, k, v)).all()


def test_api_errors_are_attnc_errors():
    lib = attnc.loads("")
    with pytest.raises(attnc.AttncError, match="no pattern named 'streamin'"):
        lib.compile("streamin")
    with pytest.raises(attnc.AttncError, match="block_m must be a positive int"):
        lib.compile("causal", block_m=0)
    # arguments are range-checked (as in a file and on the command line), and may use n and h
    # only: no silent empty window, no KeyError from a stray name
    # what needs no problem size is refused by compile itself, not at the first call
    with pytest.raises(attnc.AttncError, match="parameter 'size' of 'window' is 0, out of range"):
        lib.compile("window", size=0)
    with pytest.raises(attnc.AttncError, match="'streaming' has no parameter 'windw'"):
        lib.compile("streaming", windw=3)
    with pytest.raises(attnc.AttncError, match="'window' of 'streaming' must be an int, not 1.5"):
        lib.compile("streaming", window=1.5)
    with pytest.raises(attnc.AttncError, match="'vertical' of 'vertical_slash' is -5, out of"):
        lib.compile("vertical_slash", vertical=-5)
    with pytest.raises(attnc.AttncError, match="pattern 'req' needs argument 'w'"):
        attnc.loads("pattern req(w: int) { mask q - k < w }").compile("req")
    with pytest.raises(attnc.AttncError, match="block_m 100 is not supported"):
        lib.compile("causal", block_m=100)
    with pytest.raises(attnc.AttncError, match="'size' of 'window' is 0 at n = 16, out of range"):
        lib.compile("window", size="n // 32").blockmask(16)
    with pytest.raises(attnc.AttncError, match="cannot use 'q': arguments may depend on n and h"):
        lib.compile("window", size="q + 1").blockmask(16)
    with pytest.raises(attnc.AttncError, match="unknown name 'wnd'"):
        lib.compile("window", size="wnd").blockmask(16)
    with pytest.raises(attnc.AttncError, match="cannot use 'causal'"):
        lib.compile("window", size="1 + causal.bias").blockmask(16)
    with pytest.raises(attnc.AttncError, match="cannot call 'sink'"):
        lib.compile("window", size="sink(2).bias").blockmask(16)
    assert lib.compile("window", size="max(n // 8, h + 1)").blockmask(16, heads=2) is not None
    # the launch's shape checks are AttncErrors too, like the API's own
    kern = lib.compile("causal", block_m=16, block_n=16)
    q, kv = torch.randn(1, 4, 16, 16), torch.randn(1, 3, 16, 16)
    with pytest.raises(attnc.AttncError, match="multiple of the key/value heads"):
        kern(q, kv, kv)
    with pytest.raises(attnc.AttncError, match="do not agree"):
        kern(q, kv[:, :2], torch.randn(1, 2, 16, 8))


GPU_RUN = """
import sys, torch, triton, attnc
misses = []
def listener(*, src, metadata, metadata_group, times, cache_hit):
    if not cache_hit:
        misses.append(1)
triton.knobs.compilation.listener = listener
kern = attnc.loads("").compile("streaming", sink=4, window=256)
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, generator=g)
           for _ in range(3))
out = kern(q, k, v)
torch.cuda.synchronize()
print(len(misses), float(out.float().abs().sum()))
"""


@pytest.mark.gpu
def test_warm_cache_launches_without_compiling(tmp_path):
    """Two processes share ATTNC_CACHE_DIR: the first compiles, the second compiles nothing."""
    runs = []
    for _ in range(2):
        env = env_for(tmp_path)
        r = subprocess.run([sys.executable, "-c", GPU_RUN], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        runs.append(r.stdout.split())
    assert int(runs[0][0]) >= 1 and int(runs[1][0]) == 0
    assert runs[0][1] == runs[1][1]
    assert any((tmp_path / "triton").iterdir())
