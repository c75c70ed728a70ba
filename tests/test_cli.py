"""The attnc command line, run as a user would: in a subprocess, checking exit codes and output."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path | None = None, env: dict | None = None, stdin: str | None = None):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("ATTNC_DEBUG", None) if env is None or "ATTNC_DEBUG" not in env else None
    return subprocess.run(
        [sys.executable, "-m", "attnc", *args],
        cwd=cwd or ROOT,
        env=full_env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


GOOD = """\
# a comment
pattern local(size: int in 1.. = 8) {
    mask causal & q - k < size
}

plan tiny(layers = 2, heads = 2) {
    layers 0: dense
    default: local(size = 4 + n // 16)
}
"""

BAD = """\
pattern local(size: int = 8) {
    mask causal & q - k < sise
}
"""


def test_check_ok_is_silent(tmp_path):
    f = tmp_path / "good.attn"
    f.write_text(GOOD)
    r = run("check", str(f))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""


def test_check_library_directory():
    r = run("check", "patterns")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


def test_check_error_has_location_caret_and_no_traceback(tmp_path):
    f = tmp_path / "bad.attn"
    f.write_text(BAD)
    r = run("check", str(f))
    assert r.returncode == 1
    assert r.stderr == (
        f"{f}:2:27: unknown name 'sise'; did you mean 'size'?\n"
        "        mask causal & q - k < sise\n"
        "                              ^~~~\n"
    )
    assert "Traceback" not in r.stderr


def test_check_reports_every_file(tmp_path):
    (tmp_path / "a.attn").write_text(BAD)
    (tmp_path / "b.attn").write_text("pattern x { mask q < }\n")
    (tmp_path / "c.attn").write_text(GOOD)
    r = run("check", str(tmp_path))
    assert r.returncode == 1
    assert "a.attn:2:27:" in r.stderr and "b.attn:1:22: unexpected '}'" in r.stderr
    assert "c.attn" not in r.stderr


def test_check_missing_file():
    r = run("check", "no/such/file.attn")
    assert r.returncode == 1
    assert "no such file" in r.stderr and "Traceback" not in r.stderr


def test_check_missing_file_beside_a_bad_one_and_stdin(tmp_path):
    (tmp_path / "b.attn").write_text("pattern x { mask q < }\n")
    r = run("check", str(tmp_path / "b.attn"), "no/such/file.attn")
    assert r.returncode == 1
    assert "b.attn:1:22: unexpected '}'" in r.stderr and "no such file" in r.stderr
    r = run("check", "-", stdin="pattern x { mask q < }\n")
    assert r.returncode == 1 and "<stdin>:1:22: unexpected '}'" in r.stderr
    assert run("check", "-", stdin=GOOD).returncode == 0


def test_debug_env_shows_traceback(tmp_path):
    f = tmp_path / "bad.attn"
    f.write_text(BAD)
    r = run("check", str(f), env={"ATTNC_DEBUG": "1"})
    assert r.returncode != 0
    # check reports diagnostics itself; show raises through main, so use show for a traceback.
    r = run("show", str(f), "--pattern", "local", env={"ATTNC_DEBUG": "1"})
    assert "Traceback" in r.stderr


def test_fmt_check_and_rewrite(tmp_path):
    f = tmp_path / "messy.attn"
    f.write_text("pattern   w( size:int=8 ){mask ((causal))&(q-k<size)}  # keep me\n")
    f.chmod(0o640)
    r = run("fmt", "--check", str(f))
    assert r.returncode == 1 and "would reformat" in r.stderr
    assert f.read_text().startswith("pattern   w(")  # --check changes nothing
    r = run("fmt", "--diff", str(f))  # --diff alone shows the changes and makes none
    assert r.returncode == 1 and "+    mask causal & q - k < size  # keep me" in r.stderr
    assert f.read_text().startswith("pattern   w(")
    r = run("fmt", str(f))
    assert r.returncode == 0, r.stderr
    assert f.read_text() == (
        "pattern w(size: int = 8) {\n    mask causal & q - k < size  # keep me\n}\n"
    )
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert run("fmt", "--check", str(f)).returncode == 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_fmt_library_is_canonical():
    r = run("fmt", "--check", "patterns")
    assert r.returncode == 0, r.stderr


def test_fmt_stdin_and_syntax_error(tmp_path):
    r = run("fmt", "-", stdin="pattern x{mask true}")
    assert r.returncode == 0 and r.stdout == "pattern x {\n    mask true\n}\n"
    f = tmp_path / "broken.attn"
    f.write_text("pattern x { mask (q < k }\n")
    r = run("fmt", str(f))
    assert r.returncode == 1 and f"{f}:1:" in r.stderr and "Traceback" not in r.stderr
    assert f.read_text() == "pattern x { mask (q < k }\n"


def test_show_ascii_and_density():
    r = run("show", "--pattern", "streaming", "--n", "256", "--arg", "sink=4",
            "--arg", "window=32", "--rows", "8", "--width", "16", "--no-blocks")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "+" + "-" * 16 + "+" and len(lines) == 8 + 3
    # n = 256, sink 4, window 32: kept pairs counted exactly.
    kept = sum(min(q + 1, 32) + max(0, min(4, q + 1 - 32)) for q in range(256))
    assert f"kept {kept} of {256 * 256} pairs" in lines[-1]
    assert "density" in lines[-1]


def test_show_block_mask_beside_element_mask():
    # n = 256, blocks 64: window 64 + sink 4 -> per query block, diagonal and previous block
    # partial, nothing full except none; check the panel and the counts line.
    r = run("show", "--pattern", "window", "--n", "256", "--arg", "size=128", "--rows", "4",
            "--width", "4", "--block-m", "64", "--block-n", "64")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "+----+   +----+"
    # query block i: block i partial (diagonal), i - 1 full, i - 2 partial (window edge)
    assert [x[:6] for x in lines[1:5]] == ["|+   |", "|#+  |", "|+#+ |", "| +#+|"]
    assert "blocks 64x64: visited 9 of 16 (3 full '#', 6 partial '+'" in r.stdout


def test_show_elastic_arg_and_file(tmp_path):
    f = tmp_path / "good.attn"
    f.write_text(GOOD)
    r = run("show", str(f), "--pattern", "local", "--n", "64", "--arg", "size=n // 8")
    assert r.returncode == 0, r.stderr
    kept = sum(min(q + 1, 8) for q in range(64))
    assert f"kept {kept} of 4096 pairs" in r.stdout


def test_show_plan_head_and_layer(tmp_path):
    f = tmp_path / "good.attn"
    f.write_text(GOOD)
    r = run("show", str(f), "--plan", "tiny", "--layer", "1", "--head", "1", "--n", "32")
    assert r.returncode == 0, r.stderr
    kept = sum(min(q + 1, 4 + 32 // 16) for q in range(32))
    assert f"kept {kept} of 1024 pairs" in r.stdout
    r = run("show", str(f), "--plan", "tiny", "--layer", "0", "--n", "32")
    assert "kept 1024 of 1024 pairs" in r.stdout


def test_show_png(tmp_path):
    out = tmp_path / "mask.png"
    r = run("show", "--pattern", "dilated", "--n", "512", "--arg", "window=32",
            "--arg", "dilation=4", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "density" in r.stdout


def test_show_dynamic_uses_synthetic_scores():
    r = run("show", "--pattern", "vertical_slash", "--n", "256", "--arg", "vertical=8",
            "--arg", "slash=8", "--arg", "last_q=16")
    assert r.returncode == 0, r.stderr
    assert "density" in r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--pattern", "nope"], "no pattern named 'nope'"),
        (["--pattern", "streaming", "--arg", "windw=3"], "did you mean 'window'"),
        (["--pattern", "streaming", "--arg", "window=1.5"], "must be int, not float"),
        (["--pattern", "streaming", "--arg", "window=0"], "out of range 1.."),
        (["--pattern", "streaming", "--n", "64", "--arg", "window=n // 128"],
         "is 0 at n = 64, out of range 1.."),
        (["--pattern", "streaming", "--arg", "window"], "--arg takes NAME=VALUE"),
        (["--pattern", "streaming", "--arg", "window=max(k, 2)"], "cannot use 'k'"),
        (["--pattern", "streaming", "--arg", "window=(3"], "expected ')'"),
        (["--pattern", "streaming", "--n", "0"], "--n must be at least 1"),
        (["--pattern", "streaming", "--head", "-1"], "--head must be >= 0"),
        (["--pattern", "vertical_slash", "--n", "100000"], "needs n <= 4096"),
        ([], "name the pattern to show with --pattern"),
    ],
)
def test_show_bad_input(args, needle):
    r = run("show", *args)
    assert r.returncode in (1, 2)
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_show_plan_cell_outside_the_plan(tmp_path):
    """A layer or head past the plan's shape is named as such, not as a missing pattern."""
    f = tmp_path / "good.attn"
    f.write_text(GOOD)
    for args, needle in [(["--layer", "2"], "attnc: plan 'tiny' has layers 0..1, not 2"),
                         (["--head", "2"], "attnc: --head must be in 0..1, not 2")]:
        r = run("show", str(f), "--plan", "tiny", "--n", "64", *args)
        assert r.returncode == 1 and r.stderr.strip() == needle, r.stderr


def test_list_library():
    r = run("list")
    assert r.returncode == 0
    for name in ("streaming(sink: int in 0.. = 4, window: int in 1.. = 1024)", "vertical_slash"):
        assert name in r.stdout


def test_usage_errors_exit_2():
    r = run()
    assert r.returncode == 2
    r = run("frobnicate")
    assert r.returncode == 2


def test_compile_emits_every_stage(tmp_path):
    r = run("compile", "--pattern", "streaming", "--arg", "sink=64", "--arg", "window=1024",
            "--n", "8192", "--emit", "blockmask")
    assert r.returncode == 0, r.stderr
    assert "visit k in [(max (sub q0 1023) 0), (min kmax q1)]" in r.stdout
    r = run("compile", "--pattern", "streaming", "--n", "8192", "--emit", "ir")
    assert r.returncode == 0 and "# key " in r.stdout
    r = run("compile", "--pattern", "window", "--arg", "size=n // 8", "--n", "4096",
            "--emit", "csr", "--rows-shown", "3")
    assert r.returncode == 0, r.stderr
    assert "h0 qb2: partial [2] full [0..1]" in r.stdout
    r = run("compile", "--pattern", "dilated", "--arg", "window=512", "--arg", "dilation=4",
            "--n", "8192", "--emit", "stats", "--verify", "--dump-ir", str(tmp_path / "ir"))
    assert r.returncode == 0, r.stderr
    assert "exactness         0 of" in r.stdout
    assert "decode KV entries h0: 512" in r.stdout
    names = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert names == ["01-source.attn", "02-lower.txt", "03-simplify.txt", "04-layout.txt",
                     "05-blockmask.txt", "06-heads.txt"]
    assert "(layout diagonal :d 4" in (tmp_path / "ir" / "04-layout.txt").read_text()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--pattern", "streaming", "--n", "0"], "--n must be at least 1"),
        (["--pattern", "streaming", "--block-m", "0"], "block_m must be a positive int"),
        (["--pattern", "streaming", "--n", "64", "--arg", "window=n // 128"],
         "is 0 at n = 64, out of range 1.."),
        (["--pattern", "streaming", "--q-len", "9999", "--n", "64"], "--q-len must be between"),
        (["--pattern", "streaming", "--emit", "csr", "--rows-shown", "-1"],
         "--rows-shown must be >= 0, not -1"),
        (["--pattern", "nope"], "no pattern named 'nope'"),
        (["--pattern", "streaming", "--n", "64", "--arg", "window=q + 1"],
         "argument 'window' cannot use 'q': arguments may depend on n and h only"),
    ],
)
def test_compile_bad_input(args, needle):
    r = run("compile", *args)
    assert r.returncode in (1, 2)
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_output_is_one_line(tmp_path):
    """-o under a regular file: the OS's reason and the path, exit 1, no internal error."""
    (tmp_path / "f").write_text("")
    r = run("compile", "--pattern", "causal", "-o", str(tmp_path / "f" / "out"),
            env={"ATTNC_CACHE_DIR": str(tmp_path / "c")})
    assert r.returncode == 1
    assert r.stderr.startswith("attnc: Not a directory: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "internal error" not in r.stderr


def test_empty_arg_value_quotes_no_wrapper_text():
    """An empty --arg value: the error names the argument, without quoting the parser's
    internal wrapper (`pattern __expr__ { let value =`)."""
    r = run("compile", "--pattern", "streaming", "--n", "64", "--arg", "window=")
    assert r.returncode == 1
    assert r.stderr.startswith("--arg window:1:1: unexpected end of expression"), r.stderr
    assert "__expr__" not in r.stderr
