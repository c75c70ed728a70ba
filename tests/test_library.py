"""Every library pattern against an independent, hand-written mask written from its definition.

The hand-written masks below are plain Python loops over (head, query, key), written from the
method definitions cited in patterns/*.attn and the documented semantics of the dynamic
selectors in dsl/builtins.py; none of them calls the reference evaluator or its helpers. The
reference (attnc.reference.evaluate / evaluate_plan) must agree with them exactly.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from attnc.dsl.parser import parse_expr

import attnc
from attnc.reference import evaluate, evaluate_plan

LIB = attnc.loads("")


# --------------------------------------------------------------------------- harness


@dataclass(frozen=True)
class Elastic:
    """A parameter given as an expression in n and h: its source text and the same in Python."""

    text: str
    fn: object

    def __repr__(self) -> str:
        return f"<{self.text}>"


def _value(v, n: int, h: int):
    return v.fn(n, h) if isinstance(v, Elastic) else v


def _ref_args(args: dict) -> dict:
    return {k: parse_expr(v.text) if isinstance(v, Elastic) else v for k, v in args.items()}


@dataclass
class Ctx:
    """What a hand-written mask sees: sizes, head indices, query positions, run-time inputs."""

    n: int
    heads: list[int]
    qpos: list[int]
    args: dict
    defaults: dict
    scores: list | None = None  # [H][Lq][n] python floats
    gates: list | None = None  # [H][nb][nb] python floats
    segments: list | None = None  # [n] ints

    def p(self, name: str, h: int):
        """The value of parameter `name` for head h (given, else the pattern's default)."""
        return _value(self.args.get(name, self.defaults[name]), self.n, h)


def _grid(ctx: Ctx, pred) -> np.ndarray:
    """mask[i, r, k] = pred(i, h, q, k) for head i (index h), query row r (position q)."""
    out = np.zeros((len(ctx.heads), len(ctx.qpos), ctx.n), dtype=bool)
    for i, h in enumerate(ctx.heads):
        for r, q in enumerate(ctx.qpos):
            for k in range(ctx.n):
                out[i, r, k] = bool(pred(i, h, q, k))
    return out


HAND: dict = {}  # pattern name -> (defaults, function(ctx) -> (mask, bias or None))


def hand(name: str, **defaults):
    def deco(fn):
        HAND[name] = (defaults, fn)
        return fn

    return deco


# --------------------------------------------------------------------------- static patterns


@hand("dense")
def _dense(c):
    return _grid(c, lambda i, h, q, k: True), None


@hand("causal")
def _causal(c):
    return _grid(c, lambda i, h, q, k: k <= q), None


@hand("window", size=1024)
def _window(c):
    # the `size` most recent keys, the query itself included
    return _grid(c, lambda i, h, q, k: q - c.p("size", h) < k <= q), None


@hand("band", before=512, after=512)
def _band(c):
    def pred(i, h, q, k):
        return q - c.p("before", h) <= k <= q + c.p("after", h)

    return _grid(c, pred), None


@hand("sink", size=4)
def _sink(c):
    return _grid(c, lambda i, h, q, k: k <= q and k < c.p("size", h)), None


@hand("streaming", sink=4, window=1024)
def _streaming(c):
    def pred(i, h, q, k):
        if k > q:
            return False
        return k < c.p("sink", h) or q - k < c.p("window", h)

    return _grid(c, pred), None


@hand("a_shape", sink=64, local=1024)
def _a_shape(c):
    def pred(i, h, q, k):
        if k > q:
            return False
        return k < c.p("sink", h) or q - k < c.p("local", h)

    return _grid(c, pred), None


@hand("dilated", window=4096, dilation=4)
def _dilated(c):
    def pred(i, h, q, k):
        w, s = c.p("window", h), c.p("dilation", h)
        # the keys q, q - s, q - 2 s, ..., q - (w - 1) s
        return k <= q and (q - k) % s == 0 and (q - k) // s < w

    return _grid(c, pred), None


@hand("shards", stride=8, step=1, block=64, local=1024)
def _shards(c):
    def pred(i, h, q, k):
        if k > q:
            return False
        b, stride, step = c.p("block", h), c.p("stride", h), c.p("step", h)
        # head h owns the key blocks b' with (b' + h step) = 0 (mod stride)
        owned = (k // b + h * step) % stride == 0
        return owned or q - k < c.p("local", h)

    return _grid(c, pred), None


@hand("radial", block=64, dense=8, causal=True)
def _radial(c):
    def pred(i, h, q, k):
        if c.p("causal", h) and k > q:
            return False
        b, dense = c.p("block", h), c.p("dense", h)
        d = abs(q // b - k // b)
        if d < dense:
            return True
        # band r holds the distances dense * 2**r .. dense * 2**(r+1) - 1, kept 1 in 2**(r+1)
        r = 0
        while dense * 2 ** (r + 1) <= d:
            r += 1
        return d % 2 ** (r + 1) == 0

    return _grid(c, pred), None


@hand("power", block=64, local=2, sink=1)
def _power(c):
    powers = {2**j for j in range(20)}

    def pred(i, h, q, k):
        if k > q:
            return False
        b = c.p("block", h)
        d = q // b - k // b
        return d < c.p("local", h) or d in powers or k // b < c.p("sink", h)

    return _grid(c, pred), None


@hand("fixed_documents", length=2048)
def _fixed_documents(c):
    def pred(i, h, q, k):
        L = c.p("length", h)
        start = q - q % L  # first position of q's document
        return start <= k <= q

    return _grid(c, pred), None


@hand("prefix_lm", prefix=1024)
def _prefix_lm(c):
    # the prefix is bidirectional (and visible to everyone); the rest is causal
    return _grid(c, lambda i, h, q, k: k <= q or k < c.p("prefix", h)), None


@hand("alibi", heads=8)
def _alibi(c):
    mask = _grid(c, lambda i, h, q, k: k <= q)
    bias = np.zeros(mask.shape)
    for i, h in enumerate(c.heads):
        total = c.p("heads", h)
        # slopes 2^(-8/H), 2^(-16/H), ..., 2^(-8): a geometric sequence over the heads
        slope = 2.0 ** (-8.0 * (h + 1) / total)
        for r, q in enumerate(c.qpos):
            for k in range(c.n):
                bias[i, r, k] = -slope * (q - k)
    return mask, bias


@hand("document")
def _document(c):
    seg = c.segments
    return _grid(c, lambda i, h, q, k: k <= q and seg[q] == seg[k]), None


# --------------------------------------------------------------------------- dynamic selectors


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = sum(e)
    return [x / z for x in e]


def _last_rows(c: Ctx, last_q: int) -> list[int]:
    lq = len(c.qpos)
    return list(range(max(0, lq - last_q), lq))


def _keep_best(scores: dict, count: int, forced=()) -> set:
    """The `count` best keys of `scores` (forced keys first, then larger score, then lower
    key)."""
    order = sorted(scores, key=lambda j: (0 if j in forced else 1,
                                          0.0 if j in forced else -scores[j], j))
    return set(order[:count])


def hand_top_columns(c: Ctx, i: int, count: int, last_q: int, keep_first: int) -> set:
    col = dict.fromkeys(range(c.n), 0.0)
    for r in _last_rows(c, last_q):
        q = c.qpos[r]
        for k, pk in enumerate(_softmax(c.scores[i][r][: q + 1])):
            col[k] += pk
    return _keep_best(col, count, forced=set(range(min(keep_first, c.n))))


def hand_top_diagonals(c: Ctx, i: int, count: int, last_q: int, keep_near: int) -> set:
    diag = dict.fromkeys(range(c.n), 0.0)
    for r in _last_rows(c, last_q):
        q = c.qpos[r]
        for k, pk in enumerate(_softmax(c.scores[i][r][: q + 1])):
            diag[q - k] += pk
    return _keep_best(diag, count, forced=set(range(min(keep_near, c.n))))


def _query_blocks(c: Ctx, block: int) -> dict:
    """Absolute query block -> the rows of the evaluated queries in it."""
    out: dict = {}
    for r, q in enumerate(c.qpos):
        out.setdefault(q // block, []).append(r)
    return out


def _key_blocks(n: int, block: int) -> list[range]:
    return [range(s, min(n, s + block)) for s in range(0, n, block)]


def hand_top_blocks(c: Ctx, i: int, count: int, block: int, causal: bool) -> set:
    """Kept (query block, key block) pairs of head row i."""
    kept = set()
    for qb, rows in _query_blocks(c, block).items():
        last = max(c.qpos[r] for r in rows)
        means = {}
        for kb, keys in enumerate(_key_blocks(c.n, block)):
            if causal and keys[0] > last:
                continue
            total = sum(c.scores[i][r][k] for r in rows for k in keys)
            means[kb] = total / (len(rows) * len(keys))
        kept |= {(qb, kb) for kb in _keep_best(means, count)}
    return kept


def hand_gate(c: Ctx, i: int, block: int, topk: int, threshold: float, causal: bool) -> set:
    kept = set()
    for qb, rows in _query_blocks(c, block).items():
        last = max(c.qpos[r] for r in rows)
        g = {kb: c.gates[i][qb][kb] for kb, keys in enumerate(_key_blocks(c.n, block))
             if not causal or keys[0] <= last}
        best = _keep_best(g, topk) if topk > 0 else set(g)
        kept |= {(qb, kb) for kb in best if g[kb] >= threshold}
    return kept


@hand("vertical_slash", vertical=1000, slash=6096, last_q=64)
def _vertical_slash(c):
    cols, diags = {}, {}
    for i, h in enumerate(c.heads):
        cols[i] = hand_top_columns(c, i, c.p("vertical", h), c.p("last_q", h), 30)
        diags[i] = hand_top_diagonals(c, i, c.p("slash", h), c.p("last_q", h), 100)
    return _grid(c, lambda i, h, q, k: k <= q and (k in cols[i] or q - k in diags[i])), None


@hand("block_topk", topk=16, block=64)
def _block_topk(c):
    b = c.p("block", c.heads[0])
    kept = {i: hand_top_blocks(c, i, c.p("topk", h), b, True) for i, h in enumerate(c.heads)}
    return _grid(c, lambda i, h, q, k: k <= q and (q // b, k // b) in kept[i]), None


@hand("gated", block=64, topk=16, threshold=0.0)
def _gated(c):
    b = c.p("block", c.heads[0])
    kept = {i: hand_gate(c, i, b, c.p("topk", h), c.p("threshold", h), True)
            for i, h in enumerate(c.heads)}

    def pred(i, h, q, k):
        return k <= q and ((q // b, k // b) in kept[i] or q // b == k // b)

    return _grid(c, pred), None


@hand("duo", sink=64, window=1024, threshold=0.5)
def _duo(c):
    # one gate score per head: a retrieval head (score >= threshold) attends causally to
    # everything, a streaming head to its sinks and a causal window
    def pred(i, h, q, k):
        if k > q:
            return False
        if c.gates[i][0][0] >= c.p("threshold", h):
            return True
        return k < c.p("sink", h) or q - k < c.p("window", h)

    return _grid(c, pred), None


# --------------------------------------------------------------------------- cases


def E(text: str, fn) -> Elastic:  # noqa: N802 - short constructor for the case table
    return Elastic(text, fn)


# (pattern, n, heads (count or list), q_len, args, inputs); inputs says how to draw the
# run-time data: "randn" (continuous), "int" (integer-valued: ties), "const" (all equal),
# "sorted" / "shuffled" (segments).
CASES = [
    ("dense", 1, 1, None, {}, None),
    ("dense", 7, 2, 3, {}, None),
    ("dense", 50, 1, None, {}, None),
    ("causal", 1, 1, None, {}, None),
    ("causal", 33, 2, None, {}, None),
    ("causal", 40, 1, 5, {}, None),
    ("window", 1, 1, None, {}, None),
    ("window", 50, 1, None, {}, None),
    ("window", 20, 1, None, {"size": 1}, None),
    ("window", 37, 2, 10, {"size": 5}, None),
    ("window", 64, 1, None, {"size": E("n // 4 + 1", lambda n, h: n // 4 + 1)}, None),
    ("window", 30, 3, 7, {"size": E("h * 3 + 1", lambda n, h: h * 3 + 1)}, None),
    ("band", 40, 1, None, {}, None),
    ("band", 1, 1, None, {"before": 0, "after": 0}, None),
    ("band", 33, 1, None, {"before": 3, "after": 0}, None),
    ("band", 33, 2, 9, {"before": 0, "after": 2}, None),
    ("band", 45, 3, None,
     {"before": E("n // 5", lambda n, h: n // 5), "after": E("h + 1", lambda n, h: h + 1)},
     None),
    ("sink", 20, 1, None, {}, None),
    ("sink", 1, 1, None, {}, None),
    ("sink", 20, 1, None, {"size": 0}, None),
    ("sink", 31, 2, 6, {"size": 7}, None),
    ("sink", 49, 1, None, {"size": E("n // 3", lambda n, h: n // 3)}, None),
    ("streaming", 50, 1, None, {}, None),
    ("streaming", 1, 1, None, {}, None),
    ("streaming", 41, 2, None, {"sink": 2, "window": 5}, None),
    ("streaming", 41, 1, 11, {"sink": 0, "window": 3}, None),
    ("streaming", 60, 2, None,
     {"sink": E("n // 20", lambda n, h: n // 20),
      "window": E("n // 6 + h", lambda n, h: n // 6 + h)}, None),
    ("a_shape", 100, 1, None, {}, None),
    ("a_shape", 1, 1, None, {}, None),
    ("a_shape", 53, 2, None, {"sink": 3, "local": 4}, None),
    ("a_shape", 53, 1, 13, {"sink": 0, "local": 1}, None),
    ("a_shape", 70, 3, None,
     {"sink": E("h", lambda n, h: h), "local": E("n // 8 + 1", lambda n, h: n // 8 + 1)}, None),
    ("dilated", 50, 1, None, {}, None),
    ("dilated", 1, 1, None, {}, None),
    ("dilated", 40, 1, None, {"window": 3, "dilation": 2}, None),
    ("dilated", 40, 2, 9, {"window": 5, "dilation": 1}, None),
    ("dilated", 61, 1, None, {"window": 4, "dilation": 7}, None),
    ("dilated", 80, 2, None,
     {"window": E("n // 10 + 1", lambda n, h: n // 10 + 1),
      "dilation": E("h + 2", lambda n, h: h + 2)}, None),
    ("shards", 300, 8, 64, {}, None),
    ("shards", 1, 1, None, {}, None),
    ("shards", 75, 6, None, {"stride": 4, "step": 1, "block": 8, "local": 3}, None),
    ("shards", 75, 3, None, {"stride": 3, "step": 0, "block": 8, "local": 2}, None),
    ("shards", 70, 4, 20, {"stride": 4, "step": 2, "block": 16, "local": 0}, None),
    ("shards", 5, 2, None, {"stride": 2, "block": 8, "local": 1}, None),
    ("shards", 50, [1, 4, 6], None, {"stride": 3, "block": 4, "local": 2}, None),
    ("shards", 90, 3, None,
     {"stride": 2, "block": E("n // 8 + 1", lambda n, h: n // 8 + 1), "local": 0}, None),
    ("radial", 300, 1, 40, {}, None),
    ("radial", 1, 1, None, {}, None),
    ("radial", 130, 1, None, {"block": 4, "dense": 1}, None),
    ("radial", 150, 1, None, {"block": 2, "dense": 3}, None),
    ("radial", 100, 2, None, {"block": 3, "dense": 2, "causal": False}, None),
    ("radial", 100, 1, 30, {"block": 1, "dense": 1, "causal": False}, None),
    ("radial", 4, 1, None, {"block": 5, "dense": 3}, None),
    ("radial", 200, 1, None,
     {"block": E("n // 32 + 1", lambda n, h: n // 32 + 1), "dense": 2}, None),
    ("power", 300, 1, 50, {}, None),
    ("power", 1, 1, None, {}, None),
    ("power", 150, 1, None, {"block": 4, "local": 1, "sink": 0}, None),
    ("power", 100, 2, 20, {"block": 3, "local": 2, "sink": 2}, None),
    ("power", 140, 1, None, {"block": 1, "local": 3, "sink": 0}, None),
    ("power", 5, 1, None, {"block": 7}, None),
    ("power", 200, 1, None,
     {"block": E("n // 40 + 1", lambda n, h: n // 40 + 1), "local": 1}, None),
    ("fixed_documents", 50, 1, None, {}, None),
    ("fixed_documents", 1, 1, None, {}, None),
    ("fixed_documents", 50, 1, None, {"length": 7}, None),
    ("fixed_documents", 23, 2, None, {"length": 1}, None),
    ("fixed_documents", 47, 1, 12, {"length": 10}, None),
    ("fixed_documents", 64, 1, None, {"length": E("n // 3 + 1", lambda n, h: n // 3 + 1)}, None),
    ("prefix_lm", 50, 1, None, {}, None),
    ("prefix_lm", 1, 1, None, {}, None),
    ("prefix_lm", 30, 1, None, {"prefix": 0}, None),
    ("prefix_lm", 30, 2, 12, {"prefix": 10}, None),
    ("prefix_lm", 41, 1, None, {"prefix": E("n // 2", lambda n, h: n // 2)}, None),
    ("alibi", 20, 8, None, {}, None),
    ("alibi", 1, 1, None, {}, None),
    ("alibi", 17, 3, 5, {"heads": 3}, None),
    ("alibi", 12, [1, 3], None, {"heads": 4}, None),
    ("alibi", 16, 2, None, {"heads": E("n // 4 + 1", lambda n, h: n // 4 + 1)}, None),
    ("document", 1, 1, None, {}, "sorted"),
    ("document", 60, 1, None, {}, "sorted"),
    ("document", 60, 2, 17, {}, "sorted"),
    ("document", 45, 1, None, {}, "shuffled"),
    ("block_topk", 300, 1, 70, {}, "randn"),
    ("block_topk", 1, 1, None, {}, "randn"),
    ("block_topk", 100, 2, None, {"topk": 2, "block": 16}, "randn"),
    ("block_topk", 90, 2, 30, {"topk": 3, "block": 8}, "randn"),
    ("block_topk", 90, 1, 5, {"topk": 1, "block": 8}, "randn"),
    ("block_topk", 5, 2, None, {"topk": 1, "block": 8}, "randn"),
    ("block_topk", 64, 2, None, {"topk": 2, "block": 8}, "int"),
    ("block_topk", 75, 1, 40, {"topk": 3, "block": 7}, "int"),
    ("block_topk", 50, 2, None, {"topk": 2, "block": 6}, "const"),
    ("block_topk", 110, 3, None,
     {"topk": E("h + 1", lambda n, h: h + 1), "block": E("n // 10 + 1", lambda n, h: n // 10 + 1)},
     "randn"),
    ("gated", 100, 1, None, {}, "randn"),
    ("gated", 1, 1, None, {}, "randn"),
    ("gated", 100, 2, None, {"block": 16, "topk": 2}, "randn"),
    ("gated", 77, 2, 20, {"block": 8, "topk": 0, "threshold": 0.3}, "randn"),
    ("gated", 77, 2, None, {"block": 8, "topk": 3, "threshold": -0.5}, "randn"),
    ("gated", 64, 2, None, {"block": 8, "topk": 2, "threshold": 1.0}, "int"),
    ("gated", 50, 1, 13, {"block": 5, "topk": 4, "threshold": 0.0}, "const"),
    ("gated", 6, 1, None, {"block": 8, "topk": 1}, "randn"),
    ("gated", 96, 3, None,
     {"block": E("n // 12", lambda n, h: n // 12), "topk": E("h", lambda n, h: h)}, "randn"),
    ("duo", 100, 4, None, {}, "randn"),
    ("duo", 1, 2, None, {}, "randn"),
    ("duo", 60, 4, None, {"sink": 2, "window": 5, "threshold": 0.0}, "randn"),
    ("duo", 60, 3, 15, {"sink": 0, "window": 1, "threshold": -0.2}, "randn"),
    ("duo", 40, 4, None, {"sink": 1, "window": 4, "threshold": 1.0}, "int"),
    ("duo", 80, 3, None,
     {"sink": E("n // 40", lambda n, h: n // 40), "window": E("n // 8", lambda n, h: n // 8)},
     "randn"),
    ("vertical_slash", 100, 1, None, {}, "randn"),
    ("vertical_slash", 1, 1, None, {}, "randn"),
    ("vertical_slash", 100, 2, None, {"vertical": 3, "slash": 4, "last_q": 8}, "randn"),
    ("vertical_slash", 120, 2, None, {"vertical": 40, "slash": 2, "last_q": 16}, "randn"),
    ("vertical_slash", 150, 1, 50, {"vertical": 0, "slash": 105, "last_q": 16}, "randn"),
    ("vertical_slash", 60, 2, 10, {"vertical": 35, "slash": 3}, "randn"),
    ("vertical_slash", 200, 2, None, {"vertical": 34, "slash": 102, "last_q": 1}, "int"),
    ("vertical_slash", 220, 1, 100, {"vertical": 33, "slash": 102, "last_q": 5}, "const"),
    ("vertical_slash", 140, 3, None,
     {"vertical": E("n // 4", lambda n, h: n // 4), "slash": E("h + 99", lambda n, h: h + 99),
      "last_q": E("n // 20 + h", lambda n, h: n // 20 + h)}, "randn"),
]


def _case_id(case) -> str:
    name, n, heads, q_len, args, inputs = case
    a = ",".join(f"{k}={v!r}" for k, v in args.items())
    return f"{name}-n{n}-h{heads}-q{q_len}-{a}-{inputs}".replace(" ", "")


def _generator(case_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(case_id.encode()))


def _draw(kind: str, shape, g: torch.Generator) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    if kind == "int":
        return torch.randint(-1, 2, shape, generator=g).to(torch.float64)
    if kind == "const":
        return torch.full(shape, 0.5, dtype=torch.float64)
    raise AssertionError(kind)


def _inputs(name: str, n: int, H: int, Lq: int, args: dict, kind, g) -> dict:
    """The run-time data a pattern reads, drawn fresh for this case."""
    if name == "document":
        if kind == "sorted":  # packed documents: nondecreasing ids with random boundaries
            ids = torch.cumsum((torch.rand(n, generator=g) < 0.15).to(torch.int64), 0)
        else:  # any ids: only equality matters
            ids = torch.randint(0, 3, (n,), generator=g)
        return {"segments": ids}
    if name in ("block_topk", "vertical_slash"):
        return {"scores": _draw(kind, (H, Lq, n), g)}
    if name in ("gated", "duo"):
        if name == "duo":
            block = n
        else:
            block = _value(args.get("block", HAND[name][0]["block"]), n, 0)
        nb = -(-n // block)
        return {"gates": _draw(kind, (H, nb, nb), g)}
    return {}


def _check(got: torch.Tensor, want: np.ndarray, heads, qpos) -> None:
    got = got.numpy()
    assert got.shape == want.shape
    bad = np.argwhere(got != want)
    if len(bad):
        i, r, k = bad[0]
        pytest.fail(f"{len(bad)} mismatches; first at head {heads[i]}, q {qpos[r]}, k {k}: "
                    f"reference {bool(got[i, r, k])}, by hand {bool(want[i, r, k])}")


def _ctx(name, n, heads, q_len, args, inputs) -> Ctx:
    defaults = HAND[name][0]
    q_len = n if q_len is None else q_len
    c = Ctx(n, list(heads), list(range(n - q_len, n)), args, defaults)
    if "scores" in inputs:
        c.scores = inputs["scores"].tolist()
    if "gates" in inputs:
        c.gates = inputs["gates"].tolist()
    if "segments" in inputs:
        c.segments = inputs["segments"].tolist()
    return c


# --------------------------------------------------------------------------- tests


def test_every_library_pattern_has_a_hand_written_mask():
    lib = set(LIB.patterns)
    assert lib - set(HAND) == set(), "library patterns without a hand-written counterpart"
    assert set(HAND) - lib == set(), "hand-written masks for patterns not in the library"
    assert {c[0] for c in CASES} == lib, "every library pattern needs test cases"


def test_hand_defaults_match_the_library():
    """The hand-written masks assume the library's defaults; keep them in step."""
    for name, (defaults, _) in HAND.items():
        params = LIB.pattern(name).params
        assert [p.name for p in params] == list(defaults), name
        for p in params:
            lit = p.default.value  # every library default is a literal
            assert lit == defaults[p.name] and type(lit) is type(defaults[p.name]), (name, p)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_library_pattern(case):
    name, n, heads, q_len, args, kind = case
    head_list = list(range(heads)) if isinstance(heads, int) else list(heads)
    Lq = n if q_len is None else q_len
    g = _generator(_case_id(case))
    inputs = _inputs(name, n, len(head_list), Lq, args, kind, g)
    ev = evaluate(LIB, name, n=n, heads=heads, q_len=q_len, args=_ref_args(args), **inputs)
    want_mask, want_bias = HAND[name][1](_ctx(name, n, head_list, q_len, args, inputs))
    assert ev.q_positions.tolist() == list(range(n - Lq, n))
    _check(ev.mask, want_mask, head_list, ev.q_positions.tolist())
    if want_bias is None:
        assert ev.bias is None
    else:
        assert ev.bias is not None
        np.testing.assert_allclose(ev.bias.numpy(), want_bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,missing", [
    ("vertical_slash", "scores"), ("block_topk", "scores"), ("gated", "gates"),
    ("duo", "gates"), ("document", "segments"),
])
def test_missing_runtime_input_is_a_plain_error(name, missing):
    with pytest.raises(attnc.AttncError, match=missing):
        evaluate(LIB, name, n=16, heads=2)


def test_wrongly_shaped_scores_are_a_plain_error():
    with pytest.raises(attnc.AttncError, match="scores must have shape"):
        evaluate(LIB, "block_topk", n=16, heads=2, scores=torch.zeros(2, 16, 15))
    with pytest.raises(attnc.AttncError, match="gate scores"):
        evaluate(LIB, "gated", n=16, heads=2, args={"block": 4}, gates=torch.zeros(2, 3, 3))


def test_bad_elastic_arguments_are_plain_errors():
    # an elastic parameter that leaves its range for some head or some n
    with pytest.raises(attnc.AttncError, match="out of range"):
        evaluate(LIB, "a_shape", n=16, heads=2, args={"local": parse_expr("h")})
    with pytest.raises(attnc.AttncError, match="out of range"):
        evaluate(LIB, "window", n=3, args={"size": parse_expr("n // 4")})
    # an argument naming q, k or an unknown name (not a KeyError from the evaluator)
    with pytest.raises(attnc.AttncError, match="cannot use 'k': arguments may depend on n and h"):
        evaluate(LIB, "window", n=8, args={"size": parse_expr("k + 1")})
    with pytest.raises(attnc.AttncError, match="unknown name 'foo'"):
        evaluate(LIB, "window", n=8, args={"size": parse_expr("foo")})
    # the block of a block selector must not vary per head
    with pytest.raises(attnc.AttncError, match="same for every head"):
        evaluate(LIB, "block_topk", n=16, heads=2, args={"block": parse_expr("h + 4")},
                 scores=torch.zeros(2, 16, 16))


def test_expression_strings_are_arguments_as_in_compile():
    """evaluate takes "n // 8" as attnc.load(...).compile and --arg do, not only parsed
    expressions; the string's own errors point into it."""
    a = evaluate(LIB, "window", n=64, args={"size": "n // 8"}).mask
    assert torch.equal(a, evaluate(LIB, "window", n=64, args={"size": 8}).mask)
    with pytest.raises(attnc.AttncError, match="argument size:1:5: unexpected end"):
        evaluate(LIB, "window", n=64, args={"size": "n //"})
    with pytest.raises(attnc.AttncError, match="cannot use 'q'"):
        evaluate(LIB, "window", n=64, args={"size": "q"})


# --------------------------------------------------------------------------- selectors directly
# The library fixes keep_first = 30, keep_near = 100 and causal = true; a small program reaches
# the other settings of the selectors.

SELECTORS = attnc.loads("""
pattern cols(count: int, last_q: int, keep_first: int) {
    mask k in top_columns(count, last_q, keep_first)
}
pattern diags(count: int, last_q: int, keep_near: int) {
    mask q - k in top_diagonals(count, last_q, keep_near)
}
pattern blocks(count: int, block: int, causal: bool) {
    mask top_blocks(count, block, causal)
}
pattern gates(block: int, topk: int, threshold: float, causal: bool) {
    mask gate(block, topk, threshold, causal)
}
""")

SELECTOR_CASES = [
    ("cols", 40, 2, None, dict(count=5, last_q=4, keep_first=0), "randn"),
    ("cols", 40, 2, 10, dict(count=7, last_q=30, keep_first=3), "randn"),
    ("cols", 33, 2, None, dict(count=6, last_q=1, keep_first=2), "int"),
    ("cols", 33, 1, 9, dict(count=4, last_q=3, keep_first=1), "const"),
    ("cols", 12, 1, None, dict(count=20, last_q=5, keep_first=0), "randn"),
    ("cols", 1, 1, None, dict(count=1, last_q=1, keep_first=0), "randn"),
    ("diags", 40, 2, None, dict(count=5, last_q=4, keep_near=0), "randn"),
    ("diags", 40, 2, 10, dict(count=6, last_q=30, keep_near=2), "randn"),
    ("diags", 35, 2, None, dict(count=5, last_q=1, keep_near=1), "int"),
    ("diags", 35, 1, 12, dict(count=3, last_q=4, keep_near=0), "const"),
    ("blocks", 50, 2, None, dict(count=2, block=6, causal=False), "randn"),
    ("blocks", 50, 2, 17, dict(count=3, block=4, causal=False), "int"),
    ("blocks", 47, 1, 20, dict(count=2, block=5, causal=True), "randn"),
    ("blocks", 30, 1, None, dict(count=2, block=4, causal=False), "const"),
    ("gates", 50, 2, None, dict(block=6, topk=2, threshold=-0.3, causal=False), "randn"),
    ("gates", 50, 2, 17, dict(block=4, topk=0, threshold=0.0, causal=False), "int"),
    ("gates", 43, 1, 20, dict(block=5, topk=3, threshold=0.0, causal=True), "int"),
    # (q_start, q_len): a query window that ends inside a block
    ("blocks", 40, 2, (5, 14), dict(count=3, block=4, causal=True), "randn"),
    ("gates", 40, 2, (5, 14), dict(block=4, topk=3, threshold=-9.0, causal=True), "randn"),
    ("cols", 40, 2, (3, 20), dict(count=5, last_q=6, keep_first=1), "randn"),
    ("diags", 40, 2, (3, 20), dict(count=5, last_q=6, keep_near=1), "randn"),
]


def _hand_selector(name, c: Ctx, a: dict) -> np.ndarray:
    if name == "cols":
        sel = {i: hand_top_columns(c, i, a["count"], a["last_q"], a["keep_first"])
               for i in range(len(c.heads))}
        return _grid(c, lambda i, h, q, k: k in sel[i])
    if name == "diags":
        sel = {i: hand_top_diagonals(c, i, a["count"], a["last_q"], a["keep_near"])
               for i in range(len(c.heads))}
        return _grid(c, lambda i, h, q, k: q - k in sel[i])
    b = a["block"]
    if name == "blocks":
        sel = {i: hand_top_blocks(c, i, a["count"], b, a["causal"]) for i in range(len(c.heads))}
    else:
        sel = {i: hand_gate(c, i, b, a["topk"], a["threshold"], a["causal"])
               for i in range(len(c.heads))}
    return _grid(c, lambda i, h, q, k: (q // b, k // b) in sel[i])


@pytest.mark.parametrize("case", SELECTOR_CASES, ids=[_case_id(c) for c in SELECTOR_CASES])
def test_selector(case):
    name, n, H, q_len, args, kind = case
    q_start = None
    if isinstance(q_len, tuple):
        q_start, q_len = q_len
    Lq = n if q_len is None else q_len
    g = _generator(_case_id(case))
    if name == "gates":
        nb = -(-n // args["block"])
        inputs = {"gates": _draw(kind, (H, nb, nb), g)}
    else:
        inputs = {"scores": _draw(kind, (H, Lq, n), g)}
    ev = evaluate(SELECTORS, name, n=n, heads=H, q_len=q_len, q_start=q_start, args=args,
                  **inputs)
    c = _ctx("dense", n, range(H), q_len, {}, inputs)
    if q_start is not None:
        c.qpos = list(range(q_start, q_start + Lq))
    _check(ev.mask, _hand_selector(name, c, args), list(range(H)), ev.q_positions.tolist())


def test_tie_breaking_prefers_lower_indices():
    """Equal scores everywhere: the lowest columns / nearest diagonals / first blocks win."""
    n = 20
    flat = torch.zeros(1, n, n, dtype=torch.float64)
    m = evaluate(SELECTORS, "cols", n=n, args=dict(count=3, last_q=1, keep_first=0),
                 scores=flat).mask
    assert m[0, -1].nonzero().flatten().tolist() == [0, 1, 2]
    m = evaluate(SELECTORS, "diags", n=n, args=dict(count=2, last_q=1, keep_near=0),
                 scores=flat).mask
    assert m[0, -1].nonzero().flatten().tolist() == [n - 2, n - 1]
    m = evaluate(SELECTORS, "blocks", n=n, args=dict(count=2, block=4, causal=False),
                 scores=flat).mask
    assert m[0, -1].nonzero().flatten().tolist() == list(range(8))
    m = evaluate(SELECTORS, "gates", n=n, args=dict(block=4, topk=2, threshold=0.0,
                                                    causal=False),
                 gates=torch.zeros(1, 5, 5)).mask
    assert m[0, 0].nonzero().flatten().tolist() == list(range(8))


# --------------------------------------------------------------------------- plans

PLAN = attnc.loads("""
plan p(layers = 2, heads = 4, kv_heads = 2) {
    layers 0 heads 0..1: window(size = 3)
    layers 0 kv_heads 1: sink(2)
    default: causal
}
plan q(layers = 3, heads = 6, kv_heads = 3) {
    layers 0, 2 heads 1..3: shards(stride = 3, block = 4, local = 2)
    layers 1 kv_heads 0, 2: alibi(heads = 6)
    layers 2 heads 4: window(size = n // 4)
    layers 2 heads 5: block_topk(topk = 2, block = 8)
    default: a_shape(sink = 2, local = n // 5 + 1)
}
plan r(layers = 1, heads = 4) {
    heads 2..3: gated(block = 4, topk = 1)
    default: causal
}
""")


def _plan_heads(cells: dict, n: int, q_len: int | None, H: int, scores=None):
    """Assemble a layer by hand: cells maps each head to (pattern, args)."""
    qpos = list(range(n - (n if q_len is None else q_len), n))
    mask = np.zeros((H, len(qpos), n), dtype=bool)
    bias = np.zeros((H, len(qpos), n))
    has_bias = False
    for h in range(H):
        name, args = cells[h]
        c = Ctx(n, [h], qpos, args, HAND[name][0])
        if scores is not None:
            c.scores = scores[h : h + 1].tolist()
        m, b = HAND[name][1](c)
        mask[h] = m[0]
        if b is not None:
            bias[h], has_bias = b[0], True
    return mask, (bias if has_bias else None)


@pytest.mark.parametrize("n,q_len", [(1, None), (9, None), (23, 7)])
def test_plan_p(n, q_len):
    for layer in range(2):
        ev = evaluate_plan(PLAN, "p", layer=layer, n=n, q_len=q_len)
        if layer == 0:
            cells = {0: ("window", {"size": 3}), 1: ("window", {"size": 3}),
                     2: ("sink", {"size": 2}), 3: ("sink", {"size": 2})}
        else:
            cells = dict.fromkeys(range(4), ("causal", {}))
        want, _ = _plan_heads(cells, n, q_len, 4)
        _check(ev.mask, want, list(range(4)), ev.q_positions.tolist())
        assert ev.bias is None


@pytest.mark.parametrize("n,q_len", [(1, None), (37, None), (60, 25)])
def test_plan_q(n, q_len):
    Lq = n if q_len is None else q_len
    scores = torch.randn(6, Lq, n, generator=_generator(f"plan-q-{n}-{q_len}"),
                         dtype=torch.float64)
    shards = ("shards", {"stride": 3, "block": 4, "local": 2})
    a_shape = ("a_shape", {"sink": 2, "local": n // 5 + 1})
    alibi = ("alibi", {"heads": 6})
    layers = {
        0: {0: a_shape, 1: shards, 2: shards, 3: shards, 4: a_shape, 5: a_shape},
        # kv heads 0 and 2 are query heads 0, 1 and 4, 5
        1: {0: alibi, 1: alibi, 2: a_shape, 3: a_shape, 4: alibi, 5: alibi},
        2: {0: a_shape, 1: shards, 2: shards, 3: shards, 4: ("window", {"size": max(n // 4, 1)}),
            5: ("block_topk", {"topk": 2, "block": 8})},
    }
    for layer, cells in layers.items():
        if layer == 2 and n // 4 < 1:
            with pytest.raises(attnc.AttncError, match="out of range"):
                evaluate_plan(PLAN, "q", layer=layer, n=n, q_len=q_len, scores=scores)
            continue
        ev = evaluate_plan(PLAN, "q", layer=layer, n=n, q_len=q_len, scores=scores)
        want, want_bias = _plan_heads(cells, n, q_len, 6, scores=scores)
        _check(ev.mask, want, list(range(6)), ev.q_positions.tolist())
        if want_bias is None:
            assert ev.bias is None
        else:
            np.testing.assert_allclose(ev.bias.numpy(), want_bias, rtol=1e-12, atol=1e-12)


def test_plan_head_subset():
    """heads= evaluates some query heads, in the order given; scores have one row per head."""
    n, wanted = 40, [5, 1, 3]
    scores = torch.randn(3, n, n, generator=_generator("plan-q-subset"), dtype=torch.float64)
    ev = evaluate_plan(PLAN, "q", layer=2, n=n, heads=wanted, scores=scores)
    assert ev.heads.tolist() == wanted
    cells = {5: ("block_topk", {"topk": 2, "block": 8}),
             1: ("shards", {"stride": 3, "block": 4, "local": 2}),
             3: ("shards", {"stride": 3, "block": 4, "local": 2})}
    qpos = list(range(n))
    want = np.zeros((3, n, n), dtype=bool)
    for i, h in enumerate(wanted):
        name, args = cells[h]
        c = Ctx(n, [h], qpos, args, HAND[name][0], scores=scores[i : i + 1].tolist())
        want[i] = HAND[name][1](c)[0][0]
    _check(ev.mask, want, wanted, qpos)


def test_plan_dynamic_needs_scores():
    with pytest.raises(attnc.AttncError, match="scores"):
        evaluate_plan(PLAN, "q", layer=2, n=16)


def test_plan_gates_are_per_plan_head():
    n, H = 12, 4
    gates = torch.randn(H, 3, 3, generator=_generator("plan-r"), dtype=torch.float64)
    ev = evaluate_plan(PLAN, "r", layer=0, n=n, gates=gates)
    qpos = list(range(n))
    want = np.zeros((H, n, n), dtype=bool)
    for h in range(H):
        if h < 2:
            c = Ctx(n, [h], qpos, {}, HAND["causal"][0])
            want[h] = HAND["causal"][1](c)[0][0]
        else:
            c = Ctx(n, [h], qpos, {"block": 4, "topk": 1}, HAND["gated"][0])
            c.gates = gates[h : h + 1].tolist()
            want[h] = HAND["gated"][1](c)[0][0]
    _check(ev.mask, want, list(range(H)), qpos)
