"""Golden tests of the front end: AST dumps of valid files and the full text of diagnostics.

tests/golden/parse/NAME.attn  is parsed; its AST, dumped by `dump_ast` below (spans left out),
                              must equal NAME.ast. Every parse file must also load (check) cleanly.
tests/golden/errors/NAME.attn is loaded with `attnc.load("tests/golden/errors/NAME.attn")` from
                              the repository root; the AttncError text (every diagnostic, with its
                              quoted line and caret) must equal NAME.err. Files whose name starts
                              with '_' are only imported by others and are not tests themselves.

After a deliberate change of the AST or of a message, regenerate the expected files with

    ATTNC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

and review the diff before committing: every changed line is a change users will see.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

import attnc
from attnc import AttncError

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
PARSE_DIR = GOLDEN / "parse"
ERROR_DIR = GOLDEN / "errors"
UPDATE = os.environ.get("ATTNC_UPDATE_GOLDEN") == "1"

# Fields that hold source positions or raw text, not structure.
_SKIPPED_FIELDS = {"span", "name_span", "type_span", "attr_span", "file", "source"}


def _fields(node) -> list[tuple[str, object]]:
    return [
        (f.name, getattr(node, f.name))
        for f in dataclasses.fields(node)
        if f.name not in _SKIPPED_FIELDS
    ]


def _is_node(value) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _is_node_tuple(value) -> bool:
    return isinstance(value, tuple) and any(_is_node(v) for v in value)


def _dump(node, indent: str, lines: list[str], first: str) -> None:
    """Append `node` as a header line (class name and scalar fields) plus indented children."""
    fields = _fields(node)
    scalars = [f"{k}={v!r}" for k, v in fields if not (_is_node(v) or _is_node_tuple(v))]
    lines.append(f"{first}{type(node).__name__}" + (" " + " ".join(scalars) if scalars else ""))
    child_indent = indent + "  "
    for key, value in fields:
        if _is_node(value):
            _dump(value, child_indent, lines, f"{child_indent}{key}: ")
        elif _is_node_tuple(value):
            lines.append(f"{child_indent}{key}:")
            for item in value:
                _dump(item, child_indent + "  ", lines, f"{child_indent}- ")


def dump_ast(module) -> str:
    """A deterministic, indented dump of a module (comments included), spans left out."""
    lines: list[str] = []
    _dump(module, "", lines, "")
    return "\n".join(lines) + "\n"


def _cases(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.attn") if not p.name.startswith("_"))


def _compare(actual: str, expected_path: Path) -> None:
    if UPDATE:
        expected_path.write_text(actual)
        return
    assert expected_path.exists(), (
        f"{expected_path.relative_to(ROOT)} is missing; create it with ATTNC_UPDATE_GOLDEN=1"
    )
    assert actual == expected_path.read_text()


@pytest.fixture
def at_root(monkeypatch):
    """Run from the repository root so every diagnostic shows a path relative to it."""
    monkeypatch.chdir(ROOT)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path", _cases(PARSE_DIR), ids=lambda p: p.stem)
def test_parse_golden(path: Path) -> None:
    module = attnc.parse(path.read_text(), _rel(path))
    _compare(dump_ast(module), path.with_suffix(".ast"))


@pytest.mark.parametrize("path", _cases(PARSE_DIR), ids=lambda p: p.stem)
def test_parse_golden_files_check(path: Path, at_root) -> None:
    attnc.load(_rel(path))  # the AST corpus is made of valid programs


@pytest.mark.parametrize("path", _cases(ERROR_DIR), ids=lambda p: p.stem)
def test_error_golden(path: Path, at_root) -> None:
    with pytest.raises(AttncError) as info:
        attnc.load(_rel(path))
    assert str(info.value) == info.value.render()
    # Messages about missing imports show the absolute path that was looked for.
    text = str(info.value).replace(str(ROOT) + os.sep, "<repo>/")
    _compare(text + "\n", path.with_suffix(".err"))


@pytest.mark.parametrize(
    ("directory", "suffix"), [(PARSE_DIR, ".ast"), (ERROR_DIR, ".err")], ids=["ast", "err"]
)
def test_no_orphan_expected_files(directory: Path, suffix: str) -> None:
    orphans = [
        p.name
        for p in sorted(directory.glob("*" + suffix))
        if not p.with_suffix(".attn").exists() or p.name.startswith("_")
    ]
    assert not orphans, f"expected files without a test input: {orphans}"
