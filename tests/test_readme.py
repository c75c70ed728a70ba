"""The README's Quickstart is what CI runs: .ci/run holds exactly its commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the Quickstart needs a ```bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_has_two_commands():
    cmds = quickstart_commands()
    assert len(cmds) == 2
    assert "pip install" in cmds[0] and "pytest" in cmds[1]


def test_ci_runs_exactly_the_quickstart():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    body = [
        line for line in ci
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert body == quickstart_commands()
