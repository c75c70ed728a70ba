"""Shipped tuner text: the Python-docs split (disjoint, deduplicated, balanced), text choice."""

from __future__ import annotations

import sys

import pytest
from attnc.autotune import text


def _paras(s: str, min_chars: int = 100) -> list[str]:
    return [p.strip() for p in s.split("\n\n") if len(p.strip()) >= min_chars]


_P = {c: f"Paragraph {c}: " + " ".join([c * 7] * 20) for c in "abcdefgh"}


def test_python_docs_split_keeps_shared_topics_together_and_dedupes():
    topics = {
        "big": "\n\n".join([_P["a"], _P["b"], _P["c"]]),  # contains `part` and `sub`
        "part": "\n\n".join([_P["b"], "short line", _P["d"]]),
        "sub": _P["c"],
        "lone1": "\n\n".join([_P["e"], _P["f"]]),
        "lone2": _P["g"],
        "lone3": _P["h"],
    }
    groups = sorted(sorted(g) for g in text._docs_groups(topics))
    assert groups == [["big", "part", "sub"], ["lone1"], ["lone2"], ["lone3"]]
    calib, held = text.python_docs(topics)
    pc, ph = _paras(calib), _paras(held)
    # every long paragraph appears exactly once over both sides
    assert sorted(pc + ph) == sorted(p.strip() for p in _P.values())
    assert not set(pc) & set(ph)
    # the group (a, b, c, d) is on one side, dealt first (largest); the rest balance it
    side = calib if _P["a"] in calib else held
    assert all(_P[c] in side for c in "abcd")
    assert "short line" in side
    assert abs(len(calib) - len(held)) < len(_P["a"]) * 3


def test_shipped_texts_are_disjoint_and_long_enough():
    c, h = text.shipped_text("docs")
    assert len(c) > 150_000 and len(h) > 150_000  # several 8k-token segments each
    assert not set(_paras(c)) & set(_paras(h))
    # repeats across topics are dropped; one traceback example repeats inside its own topic
    for side in (c, h):
        assert len(_paras(side)) - len(set(_paras(side))) <= 1
    assert text.shipped_text("chronicle") == (text.shipped("calib.txt"),
                                              text.shipped("heldout.txt"))
    assert (text.data_dir() / "NOTICE.txt").read_text().count("Python Software Foundation")
    with pytest.raises(ValueError, match="unknown text"):
        text.shipped_text("wiki")


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7),
                    reason="the shipped docs come from CPython 3.11.7's pydoc_data")
def test_shipped_docs_regenerate_from_pydoc_data():
    assert text.python_docs() == text.shipped_text("docs")


def test_cli_text_choice_defaults_to_docs():
    import argparse

    from attnc.cli_tune import register

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    assert ap.parse_args(["tune", "--model", "m"]).text == "docs"
    assert ap.parse_args(["tune", "--model", "m", "--text", "chronicle"]).text == "chronicle"


def test_passkey_prompt_places_the_key_at_its_depth():
    for depth in (0.0, 0.5, 0.9):
        p = text.passkey_prompt(48213, 400, depth, seed=1)
        assert p.endswith("The pass key is") and p.count("48213") == 2
        at = p.index("48213") / len(p)
        assert abs(at - depth) < 0.05
