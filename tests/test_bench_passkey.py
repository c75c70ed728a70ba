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


class CachedScripted(Scripted):
    """Scripted, with a KV cache: the cache is the prefix it has seen; counts forward calls."""

    def __init__(self, start: int, script: str):
        super().__init__(start, script)
        self.calls = 0

    def __call__(self, ids, use_cache=False, past_key_values=None):
        self.calls += 1
        seen = [] if past_key_values is None else past_key_values
        full = torch.tensor([seen + ids[0].tolist()])
        out = super().__call__(full)
        logits = out.logits[:, -ids.shape[1]:]
        return SimpleNamespace(logits=logits,
                               past_key_values=full[0].tolist() if use_cache else None)


def test_passkey_cached_decoding_matches_and_stops_early():
    tok, t = Tok(), _trial(48213)
    for script in (" 48213", "48213x", "\n48213", " 48218", " xx", " 482139", " 4829x9",
                   "x 48213"):
        plain = bench.passkey_accuracy(CachedScripted(5, script), [t], tok)
        m = CachedScripted(5, script)
        cached = bench.passkey_accuracy(m, [t], tok, cache=True)
        assert cached == plain, script
    # " 4829x9": teacher forcing stops at the wrong "9"; the first number "4829" is complete
    # at the decoded "x", so decoding stops there: one teacher-forced pass plus one decoding
    # step, not up to answer length + 4 tokens.
    for cache in (False, True):
        m = CachedScripted(5, " 4829x9")
        r = bench.passkey_accuracy(m, [t], tok, cache=cache)
        assert r["hits"] == [False] and r["answers"] == [" 4829x"] and m.calls == 2


def test_passkey_cached_decoding_on_a_static_plan(tiny):
    """A real (tiny) Llama under a static plan: greedy decoding with the KV cache gives the
    same tokens as a full forward pass per token."""
    from attnc.autotune import apply as ap_
    from attnc.autotune.candidates import candidate

    model = tiny
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (70,), generator=g)
    # The answer: 6 tokens the random model will not produce, so decoding runs to the end.
    trial = (ids, 64, ids[64:].tolist(), 99999, 0.5)

    class Tok256:
        def decode(self, toks):
            return "".join(chr(65 + t % 26) for t in toks)

    cells = {(ly, h): candidate("streaming", sink=4, window=16) for ly in range(2)
             for h in range(4)}
    ap_.apply(model, cells)
    try:
        plain = bench.passkey_accuracy(model, [trial], Tok256())
        cached = bench.passkey_accuracy(model, [trial], Tok256(), cache=True)
    finally:
        ap_.remove(model)
    assert len(plain["answers"][0]) == 10  # answer length + 4: no early stop
    assert cached["answers"] == plain["answers"]
