"""Layout transforms: token permutations under which congruence patterns visit full blocks.

A dilated pattern keeps (q, k) only when (q - k) % d == 0, so in the natural order every block it
visits is partial. Grouping positions by residue (all p = 0 mod d, then 1 mod d, ...) puts the
pairs it keeps into diagonal segments where they are contiguous: position p moves to
(p % d) * M + p // d, with each class padded to M positions, a multiple of both block sizes, so
that no block straddles two classes. Strided shards ((k // B + c) % m == r) permute only the
keys: pattern blocks are grouped by j % m. The transformed pattern is the original one with q and
k replaced by their original positions (plus a validity test for the padding), so it is
classified, materialised and evaluated by the same machinery, and keeps exactly the same pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .ir import Const, Node, Op, PatternIR, Sel, Var, free_vars, op, substitute, walk
from .rules import rewrite
from .support import dnf, linear


@dataclass(frozen=True)
class Layout:
    """A permutation of query and/or key positions.

    kind 'diagonal': q and k both move, p -> (p % d) * seg + p // d.
    kind 'key_classes': only keys move; pattern block j = k // block goes to class j % d, and
    within a class blocks keep their order: k -> (j % d) * seg + (j // d) * block + k % block.
    """

    kind: str
    d: int
    seg: int  # padded length of one class
    n: int  # original length
    block: int = 1  # pattern block (key_classes)

    @property
    def n_perm(self) -> int:
        return self.d * self.seg

    def text(self) -> str:
        extra = f" :block {self.block}" if self.kind == "key_classes" else ""
        return f"(layout {self.kind} :d {self.d}{extra} :segment {self.seg} :n {self.n})"

    def original(self, p: Node) -> Node:
        """Original position of permuted position p (IR)."""
        seg, d = Const(self.seg), Const(self.d)
        cls, idx = op("fdiv", p, seg), op("mod", p, seg)
        if self.kind == "diagonal":
            return op("add", op("mul", idx, d), cls)
        b = Const(self.block)
        j = op("add", op("mul", op("fdiv", idx, b), d), cls)
        return op("add", op("mul", j, b), op("mod", idx, b))

    def perm(self) -> np.ndarray:
        """perm[p'] = original position of permuted slot p', or -1 for padding."""
        p = np.arange(self.n_perm, dtype=np.int64)
        cls, idx = p // self.seg, p % self.seg
        if self.kind == "diagonal":
            orig = idx * self.d + cls
        else:
            j = (idx // self.block) * self.d + cls
            orig = j * self.block + idx % self.block
        return np.where(orig < self.n, orig, -1)

    def inverse(self) -> np.ndarray:
        """inverse[p] = permuted slot of original position p."""
        perm = self.perm()
        inv = np.empty(self.n, dtype=np.int64)
        valid = perm >= 0
        inv[perm[valid]] = np.nonzero(valid)[0]
        return inv

    def moves_queries(self) -> bool:
        return self.kind == "diagonal"


def _segment(count: int, align: int) -> int:
    return max(align, -(-count // align) * align)


def _diagonal_modulus(atom: Node) -> int | None:
    """d for an atom (q - k) % d == 0 (either sign, d > 1 constant), else None."""
    if not (isinstance(atom, Op) and atom.op == "eq"):
        return None
    a, b = atom.args
    if isinstance(a, Const):
        a, b = b, a
    if not (b == Const(0) and isinstance(a, Op) and a.op == "mod"):
        return None
    m = a.args[1]
    if not (isinstance(m, Const) and isinstance(m.value, int) and m.value > 1):
        return None
    lf = linear(a.args[0])
    if lf is None or lf.coefs not in ({"k": -1}, {"k": 1}):
        return None
    rest = rewrite(lf.rest)
    sign = -lf.coefs["k"]
    if rewrite(op("sub", rest, Var("q") if sign == 1 else op("neg", Var("q")))) != Const(0):
        return None
    return m.value


def _key_class(atom: Node) -> tuple[int, int] | None:
    """(block, m) for an atom (k // block + c) % m == r with c free of q and k."""
    if not (isinstance(atom, Op) and atom.op == "eq"):
        return None
    a, b = atom.args
    if isinstance(a, Const):
        a, b = b, a
    if not (isinstance(a, Op) and a.op == "mod" and not ({"q", "k"} & free_vars(b))):
        return None
    m = a.args[1]
    if not (isinstance(m, Const) and isinstance(m.value, int) and m.value > 1):
        return None
    lf = linear(a.args[0])
    if lf is None or len(lf.coefs) != 1 or "q" in free_vars(lf.rest):
        return None
    (key, c), = lf.coefs.items()
    if key == "k" or c not in (1, -1):
        return None
    return key[1], m.value


def candidates(mask: Node, n: int, block_m: int, block_n: int) -> list[Layout]:
    """Layouts suggested by congruence atoms of the mask (h may still be free)."""
    out: list[Layout] = []
    conj = dnf(rewrite(mask)) or []
    align = block_m * block_n // math.gcd(block_m, block_n)
    seen = set()
    for c in conj:
        for a in c:
            d = _diagonal_modulus(a)
            if d is not None and ("diagonal", d) not in seen:
                seen.add(("diagonal", d))
                out.append(Layout("diagonal", d, _segment(-(-n // d), align), n))
            kc = _key_class(a)
            if kc is not None and ("key", kc) not in seen:
                seen.add(("key", kc))
                blk, m = kc
                pattern_blocks = -(-n // blk)
                per_class = -(-pattern_blocks // m) * blk
                out.append(Layout("key_classes", m, _segment(per_class, block_n), n, blk))
    return out


def for_length(lay: Layout, n: int, block_m: int, block_n: int) -> Layout:
    """The same permutation family for another length (segments re-padded)."""
    if lay.kind == "diagonal":
        align = block_m * block_n // math.gcd(block_m, block_n)
        return Layout("diagonal", lay.d, _segment(-(-n // lay.d), align), n)
    pattern_blocks = -(-n // lay.block)
    per_class = -(-pattern_blocks // lay.d) * lay.block
    return Layout("key_classes", lay.d, _segment(per_class, block_n), n, lay.block)


def transform(pattern: PatternIR, layout: Layout) -> PatternIR:
    """The pattern over permuted positions: same kept pairs, padding slots never kept.

    n keeps its meaning (the original length) inside the mask; the permuted problem has
    layout.n_perm positions.
    """
    if any(isinstance(x, Sel) for x in walk(pattern.mask)):
        raise ValueError("layout transforms apply to static patterns")
    qv, kv = Var("q"), Var("k")
    env = {"k": layout.original(kv)}
    valid = [op("lt", env["k"], Var("n"))]
    if layout.moves_queries():
        env["q"] = layout.original(qv)
        valid.append(op("lt", env["q"], Var("n")))
    mask = rewrite(Op("and", tuple(valid) + (substitute(pattern.mask, env),)))
    bias = rewrite(substitute(pattern.bias, env)) if pattern.bias is not None else None
    return PatternIR(f"{pattern.name}@{layout.kind}{layout.d}", mask, bias)


__all__ = ["Layout", "candidates", "for_length", "transform"]
