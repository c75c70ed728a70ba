"""The passkey metric of benchmarks/autotune.py on a scripted model (no weights needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

_spec = importlib.util.spec_from_file_location(
    "bench_autotune", Path(__file__).parents[1] / "benchmarks" / "autotune.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

VOCAB = [" ", "\n", "x"] + [str(d) for d in range(10)]  # token id = index


class Tok:
    def decode(self, ids):
        return "".join(VOCAB[i] for i in ids)


class Scripted:
    """Predicts, after a prefix of length p, script[p - start] (else "x")."""

    def __init__(self, start: int, script: str):
        self.start, self.script = start, [VOCAB.index(c) for c in script]

    def __call__(self, ids, use_cache=False):
        n = ids.shape[1]
        logits = torch.zeros(1, n, len(VOCAB))
        for p in range(1, n + 1):
            j = p - self.start
            logits[0, p - 1, self.script[j] if 0 <= j < len(self.script) else 2] = 1.0
        return SimpleNamespace(logits=logits)


def _trial(key: int, start: int = 5):
    ans = [VOCAB.index(c) for c in f" {key}"]
    ids = torch.tensor([2] * start + ans)
    return (ids, start, ans, key, 0.5)


def test_passkey_metric():
    tok, t = Tok(), _trial(48213)
    # the exact answer: both metrics pass
    r = bench.passkey_accuracy(Scripted(5, " 48213"), [t], tok)
    assert r["hits"] == [True] and r["strict_hits"] == [True] and r["answers"] == [" 48213x"]
    # the key without its leading space, or after a newline: found, but not strict
    for script in ("48213x", "\n48213"):
        r = bench.passkey_accuracy(Scripted(5, script), [t], tok)
        assert r["hits"] == [True] and r["strict_hits"] == [False], script
    # a wrong digit, no number: missed
    for script in (" 48218", " xx"):
        r = bench.passkey_accuracy(Scripted(5, script), [t], tok)
        assert r["hits"] == [False] and r["strict_hits"] == [False], script
    # a longer number is not the key (strict reads only the answer's tokens)
    r = bench.passkey_accuracy(Scripted(5, " 482139"), [t], tok)
    assert r["hits"] == [False] and r["strict_hits"] == [True]
    r = bench.passkey_accuracy(Scripted(5, ""), [], tok)
    assert r["hits"] == [] and r["passkey"] != r["passkey"]  # nan
