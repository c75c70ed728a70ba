"""Golden IR dumps of every library pattern at its default arguments.

tests/golden/ir/NAME.txt holds, for library pattern NAME, the texts of the compiler stages
(compiler.stages.compile_pattern(...).texts):

  lower      the inlined Pattern IR,
  simplify   the IR after the rule tables, its structural key and the rules that fired (the
             rule table itself, the same for every pattern, is left out),
  blockmask  for static patterns only: the symbolic block-mask IR at n = 1000, heads = 2,
             64 x 64 blocks, layout chosen automatically.

A change in lowering, in the rules, in the key or in the key ranges shows up as a diff here.
After a deliberate change, regenerate the expected files with

    ATTNC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_ir.py

and review the diff before committing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from attnc.compiler.blockmask import Schedule
from attnc.compiler.stages import compile_pattern

import attnc

ROOT = Path(__file__).resolve().parent.parent
IR_DIR = ROOT / "tests" / "golden" / "ir"
UPDATE = os.environ.get("ATTNC_UPDATE_GOLDEN") == "1"

LIB = attnc.loads("")
NAMES = sorted(LIB.patterns)
N, HEADS, BLOCK = 1000, 2, 64


def _without_rule_table(text: str) -> str:
    out, skipping = [], False
    for line in text.splitlines():
        if line == "# rule table:":
            skipping = True
            continue
        if skipping and line.startswith("#   "):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out)


def render(name: str) -> str:
    p = LIB.pattern(name)
    c = compile_pattern(p, {}, n=N, heads=HEADS, schedule=Schedule(BLOCK, BLOCK))
    parts = [f"# {name} ({'dynamic' if p.dynamic else 'static'}), default arguments",
             "", "== lower", c.texts["lower"],
             "", "== simplify", _without_rule_table(c.texts["simplify"])]
    if not p.dynamic:
        parts += ["", f"== blockmask (n = {N}, heads = {HEADS}, block {BLOCK} x {BLOCK}, "
                      "layout auto)", c.texts["blockmask"]]
    return "\n".join(parts).rstrip() + "\n"


@pytest.mark.parametrize("name", NAMES)
def test_golden_ir(name):
    path = IR_DIR / f"{name}.txt"
    got = render(name)
    if UPDATE:
        IR_DIR.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != got:
            path.write_text(got)
        return
    assert path.exists(), f"{path} is missing; run ATTNC_UPDATE_GOLDEN=1 pytest {__file__}"
    assert got == path.read_text(), f"{path.name} changed; review and regenerate (see the " \
        "module docstring)"


def test_no_stale_golden_ir():
    files = {p.stem for p in IR_DIR.glob("*.txt")}
    if UPDATE:
        for stale in files - set(NAMES):
            (IR_DIR / f"{stale}.txt").unlink()
        return
    assert files == set(NAMES), f"stale or missing: {sorted(files ^ set(NAMES))}"


def test_rule_table_is_left_out():
    text = render("streaming")
    assert "# rule table:" not in text and "# rules fired:" in text and "# key " in text
