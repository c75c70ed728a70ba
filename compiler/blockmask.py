"""Block-mask IR: per head class, closed-form key-block ranges per query block; materialised on
demand as CSR arrays with FlexAttention's BlockMask layout and meaning.

Building the IR is symbolic (no block grid); evaluating its ranges costs O(query blocks); the CSR
costs O(visited blocks). No n x n or (n/B) x (n/B) array is ever formed (except by to_dense(),
which exists for tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import absint
from .absint import EMPTY, FULL, PARTIAL
from .ir import Const, Node, Op, PatternIR, Var, free_vars, substitute, to_text, walk
from .numeric import evaluate as num_eval
from .rules import rewrite
from .support import Rule, derive_with_mask, fallback_rule


@dataclass(frozen=True)
class Schedule:
    """How the kernel tiles the problem; the pattern does not choose it."""

    block_m: int = 128
    block_n: int = 128

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, not {v!r}")

    def text(self) -> str:
        return f"(schedule :block_m {self.block_m} :block_n {self.block_n})"

    def odd_tiles(self) -> list[tuple[str, int]]:
        """The (field, size) pairs a Triton kernel cannot tile with: its tiles are powers of
        two, while the block mask itself takes any size."""
        return [(name, b) for name, b in (("block_m", self.block_m), ("block_n", self.block_n))
                if b & (b - 1)]


@dataclass
class HeadClass:
    """Heads whose specialised mask is identical share one set of rules."""

    heads: list[int]
    mask: Node  # h substituted and folded
    rules: list[Rule]
    exact_rules: bool  # False when the DNF was too large and the fallback rule is used


@dataclass
class CSR:
    """FlexAttention's BlockMask layout and meaning (numpy, batch dimension dropped): partial and
    full key blocks of every query block, indices ascending. Rows are as wide as the longest row
    and padded with their last index; to_flex_block_mask() widens them to every key block, in
    create_block_mask's order, so all its tensors equal FlexAttention's."""

    kv_num_blocks: np.ndarray  # [H, QB] int32
    kv_indices: np.ndarray  # [H, QB, W] int32
    full_kv_num_blocks: np.ndarray  # [H, QB] int32
    full_kv_indices: np.ndarray  # [H, QB, WF] int32
    block_m: int
    block_n: int
    q_len: int
    n: int
    q_start: int

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.n // self.block_n)


@dataclass
class Stats:
    kept_pairs: int
    visited_blocks: int
    partial_blocks: int
    full_blocks: int
    total_pairs: int
    head_dim: int = 128

    @property
    def density(self) -> float:
        return self.kept_pairs / self.total_pairs if self.total_pairs else 0.0

    def useful_flops(self, head_dim: int | None = None) -> int:
        d = head_dim or self.head_dim
        return 4 * d * int(self.kept_pairs)  # QK^T and PV, 2 flops per multiply-add each

    def executed_flops(self, block_m: int, block_n: int, head_dim: int | None = None) -> int:
        d = head_dim or self.head_dim
        return 4 * d * block_m * block_n * int(self.visited_blocks)


@dataclass
class BlockMaskIR:
    pattern: PatternIR
    n: int  # keys in the grid (n_perm under a layout transform)
    heads: int
    q_len: int
    q_start: int
    schedule: Schedule
    classes: list[HeadClass] = field(default_factory=list)
    n_var: int = -1  # the value of the pattern's n (the sequence length); -1: same as n
    layout: object = None  # a compiler.layout.Layout, when the grid is permuted
    _csr: CSR | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.n_var < 0:
            self.n_var = self.n

    # -- the symbolic form
    def text(self) -> str:
        s = self.schedule
        lines = [f"blockmask {self.pattern.name} key {self.pattern.key[:16]}",
                 f"  n = {self.n_var}, grid keys 0..{self.n - 1} (kmax = {self.n - 1}), "
                 f"queries {self.q_start}..{self.q_start + self.q_len - 1}, heads {self.heads}, "
                 f"{s.text()}"]
        if self.layout is not None:
            lines.append(f"  {self.layout.text()}")
        lines += [
                 "  ranges are inclusive key positions for a query block [q0, q1]; a key block "
                 "kb covers [kb * block_n, kb * block_n + block_n - 1]"]
        for c in self.classes:
            lines.append(f"  heads {ranges_text(c.heads)}:")
            if not c.exact_rules:
                lines.append("    (no DNF within limits: every key is visited)")
            for i, r in enumerate(c.rules):
                lines.append(f"    rule {i}:")
                lines += ["      " + x for x in r.text().splitlines()]
        return "\n".join(lines)

    # -- evaluation per query block
    def _q_blocks(self):
        BM = self.schedule.block_m
        QB = -(-self.q_len // BM)
        qb = np.arange(QB, dtype=np.int64)
        q0 = self.q_start + qb * BM
        q1 = np.minimum(q0 + BM - 1, self.q_start + self.q_len - 1)
        complete = (q0 + BM - 1) <= (self.q_start + self.q_len - 1)
        return qb, q0, q1, complete

    def _class_blocks(self, c: HeadClass, h: int):
        """(qb, kb, cls) of every visited block of one head of class c, deduplicated."""
        BN = self.schedule.block_n
        n = self.n
        KB = -(-n // BN)
        last_full_kb = n // BN - 1  # a padded last key block is never full
        qb, q0, q1, complete = self._q_blocks()
        env = {"q0": q0, "q1": q1, "n": np.int64(self.n_var), "kmax": np.int64(n - 1)}
        # Sources of candidate blocks: (qs, ks, verdict, final). A verdict of -1 is unknown;
        # FULL from a rule's full range is proven; "final" verdicts come from the whole mask.
        sources: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []
        hull_lo = np.full(qb.shape, KB, dtype=np.int64)
        hull_hi = np.full(qb.shape, -1, dtype=np.int64)
        for r in c.rules:
            lo = np.broadcast_to(num_eval(r.visit_lo, env), qb.shape).astype(np.int64)
            hi = np.broadcast_to(num_eval(r.visit_hi, env), qb.shape).astype(np.int64)
            lo = np.maximum(lo, 0)
            hi = np.minimum(hi, n - 1)
            ok = lo <= hi
            g_true = np.ones_like(ok)
            for g in r.guards:
                ab = absint.Evaluator(q0, q1, 0, 0, h, self.n_var).eval(g)
                ok &= np.broadcast_to(ab.t, ok.shape)
                g_true &= np.broadcast_to(~ab.f, ok.shape)
            kb_lo = np.where(ok, lo // BN, 0)
            kb_hi = np.where(ok, hi // BN, -1)
            if r.stride is None and r.impure:
                # Atoms the rule cannot place (congruences, log-bands, ...): searched below.
                hull_lo = np.minimum(hull_lo, np.where(ok, kb_lo, hull_lo))
                hull_hi = np.maximum(hull_hi, np.where(ok, kb_hi, hull_hi))
                continue
            if r.stride is not None:
                qs, ks = _strided(qb, kb_lo, kb_hi, r.stride, env, BN, KB)
            else:
                qs, ks = _expand(qb, kb_lo, kb_hi)
            verdict = np.full(qs.size, -1, dtype=np.int8)
            if r.full_lo is not None:
                flo = np.broadcast_to(num_eval(r.full_lo, env), qb.shape).astype(np.int64)
                fhi = np.broadcast_to(num_eval(r.full_hi, env), qb.shape).astype(np.int64)
                f_lo = -((-np.maximum(flo, 0)) // BN)  # ceil
                f_hi = (np.minimum(fhi, n - 1) + 1) // BN - 1
                f_hi = np.minimum(f_hi, last_full_kb)
                f_hi = np.where(ok & g_true & complete, f_hi, -1)
                inside = (ks >= f_lo[qs]) & (ks <= f_hi[qs])
                if r.stride is not None:
                    # Inside the bounds the mask is the congruence alone: full when every
                    # pattern block of the key block is selected, else partial.
                    allsel = _stride_all(qs, ks, r.stride, env, BN)
                    verdict = np.where(inside, np.where(allsel, FULL, PARTIAL), -1)
                else:
                    verdict = np.where(inside, FULL, -1)
                verdict = verdict.astype(np.int8)
            sources.append((qs, ks, verdict, False))
        if np.any(hull_lo <= hull_hi):
            # One search over the hull of those rules' ranges, by halving with the whole
            # mask, so cost follows the visited blocks, not the ranges.
            qs, ks, cl = self._descend(c.mask, qb, hull_lo, hull_hi, h)
            sources.append((qs, ks, cl, True))
        qs, ks, cls = _merge(sources, KB)
        todo = cls < 0
        if np.any(todo):
            cls[todo] = self._classify(c.mask, qs[todo], ks[todo], h)
        keep = cls != EMPTY
        return qs[keep], ks[keep], cls[keep]

    def _descend(self, mask: Node, qb, kb_lo, kb_hi, h: int):
        """Visited blocks of [kb_lo, kb_hi] per query block by dyadic search: a group of key
        blocks proven EMPTY is dropped, FULL is kept whole, PARTIAL is halved."""
        BM, BN = self.schedule.block_m, self.schedule.block_n
        last_q = self.q_start + self.q_len - 1
        qs, a, b = qb[kb_lo <= kb_hi], kb_lo[kb_lo <= kb_hi], kb_hi[kb_lo <= kb_hi]
        out_q, out_k, out_c = [], [], []
        while qs.size:
            q0 = self.q_start + qs * BM
            q1 = np.minimum(q0 + BM - 1, last_q)
            k0 = a * BN
            k1 = np.minimum(b * BN + BN - 1, self.n - 1)
            cls = absint.classify(mask, q0, q1, k0, k1, h, self.n_var)
            full = cls == FULL
            if np.any(full):
                fq, fk = _expand(qs[full], a[full], b[full])
                out_q.append(fq)
                out_k.append(fk)
                out_c.append(self._demote(fq, fk))
            single = (cls == PARTIAL) & (a == b)
            if np.any(single):
                out_q.append(qs[single])
                out_k.append(a[single])
                out_c.append(self._classify(mask, qs[single], a[single], h))
            split = (cls == PARTIAL) & (a < b)
            mid = (a + b) // 2
            qs = np.concatenate([qs[split], qs[split]])
            a, b = np.concatenate([a[split], mid[split] + 1]), np.concatenate([mid[split],
                                                                                b[split]])
        z = np.zeros(0, dtype=np.int64)
        return (np.concatenate(out_q + [z]), np.concatenate(out_k + [z]),
                np.concatenate(out_c + [np.zeros(0, dtype=np.int8)]))

    def _demote(self, qs, ks) -> np.ndarray:
        """FULL, except blocks holding padding (the last query or key block), which are
        PARTIAL as in FlexAttention."""
        *_, padded = self._boxes(qs, ks)
        return np.where(padded, PARTIAL, FULL).astype(np.int8)

    def _boxes(self, qs, ks):
        BM, BN = self.schedule.block_m, self.schedule.block_n
        last_q = self.q_start + self.q_len - 1
        q0 = self.q_start + qs * BM
        q1 = np.minimum(q0 + BM - 1, last_q)
        k0 = ks * BN
        k1 = np.minimum(k0 + BN - 1, self.n - 1)
        padded = (q0 + BM - 1 > last_q) | (k0 + BN - 1 > self.n - 1)
        return q0, q1, k0, k1, padded

    def _classify(self, mask: Node, qs, ks, h: int) -> np.ndarray:
        q0, q1, k0, k1, padded = self._boxes(qs, ks)
        cls = refine(mask, q0, q1, k0, k1, h, self.n_var)
        return np.where(padded & (cls == FULL), PARTIAL, cls).astype(np.int8)

    # -- materialisation
    def materialize(self) -> CSR:
        """CSR arrays in FlexAttention's BlockMask layout for every head (computed once: stats,
        pictures, tests and kernels all read the same arrays)."""
        if self._csr is None:
            self._csr = self._materialize()
        return self._csr

    def _materialize(self) -> CSR:
        qb, _, _, _ = self._q_blocks()
        QB = qb.size
        KB = -(-self.n // self.schedule.block_n)
        rows = []
        for c in self.classes:
            # The class mask has h substituted: one evaluation serves all its heads.
            blocks = self._class_blocks(c, c.heads[0])
            rows += [(h, blocks) for h in c.heads]
        rows.sort(key=lambda t: t[0])
        H = len(rows)
        counts_p = np.zeros((H, QB), dtype=np.int32)
        counts_f = np.zeros((H, QB), dtype=np.int32)
        per_head = []
        for i, (_, (qs, ks, cls)) in enumerate(rows):
            part = cls == PARTIAL
            counts_p[i] = np.bincount(qs[part], minlength=QB)[:QB]
            counts_f[i] = np.bincount(qs[~part], minlength=QB)[:QB]
            per_head.append((qs, ks, part))
        W = int(max(1, counts_p.max(initial=0)))
        WF = int(max(1, counts_f.max(initial=0)))
        kv_idx = np.zeros((H, QB, W), dtype=np.int32)
        fkv_idx = np.zeros((H, QB, WF), dtype=np.int32)
        for i, (qs, ks, part) in enumerate(per_head):
            for sel, cnt, out in ((part, counts_p[i], kv_idx[i]), (~part, counts_f[i],
                                                                    fkv_idx[i])):
                q_sel, k_sel = qs[sel], ks[sel]  # sorted by (qb, kb) already
                start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
                pos = np.arange(q_sel.size) - start[q_sel]
                out[q_sel, pos] = k_sel
        _pad_rows(kv_idx, counts_p, KB)
        _pad_rows(fkv_idx, counts_f, KB)
        return CSR(counts_p, kv_idx, counts_f, fkv_idx, self.schedule.block_m,
                   self.schedule.block_n, self.q_len, self.n, self.q_start)

    def to_flex_block_mask(self, device="cpu"):
        """A torch.nn.attention.flex_attention.BlockMask of this block mask (see codegen.flex)."""
        from attnc.codegen.flex import to_flex_block_mask

        return to_flex_block_mask(self, device=device)

    def block_classes(self) -> np.ndarray:
        """[H, QB, KB] EMPTY / PARTIAL / FULL (dense over blocks: for tests and pictures)."""
        csr = self.materialize()
        H, QB = csr.kv_num_blocks.shape
        out = np.zeros((H, QB, csr.num_kv_blocks), dtype=np.int8)
        for h in range(H):
            for qb in range(QB):
                out[h, qb, csr.kv_indices[h, qb, : csr.kv_num_blocks[h, qb]]] = PARTIAL
                out[h, qb, csr.full_kv_indices[h, qb, : csr.full_kv_num_blocks[h, qb]]] = FULL
        return out

    def inexact_blocks(self) -> tuple[int, int]:
        """(blocks called PARTIAL that are really FULL or EMPTY, blocks checked), against the
        element mask: the classifier's imprecision, for reports (costs O(visited x block))."""
        if self.pattern.dynamic:
            return 0, 0
        csr = self.materialize()
        BM, BN = self.schedule.block_m, self.schedule.block_n
        bad = checked = 0
        order = sorted((h, c) for c in self.classes for h in c.heads)
        for i, (h, c) in enumerate(order):
            qs = np.repeat(np.arange(csr.num_q_blocks), csr.kv_num_blocks[i])
            if qs.size == 0:
                continue
            ks = np.concatenate([csr.kv_indices[i, qb, : csr.kv_num_blocks[i, qb]]
                                 for qb in range(csr.num_q_blocks)]).astype(np.int64)
            q = self.q_start + qs.reshape(-1, 1, 1) * BM + np.arange(BM).reshape(1, -1, 1)
            k = ks.reshape(-1, 1, 1) * BN + np.arange(BN).reshape(1, 1, -1)
            valid = (q < self.q_start + self.q_len) & (k < self.n)
            m = np.broadcast_to(num_eval(c.mask, {"q": q, "k": k, "h": np.int64(h),
                                                  "n": np.int64(self.n_var)}), valid.shape)
            kept = (m & valid).sum(axis=(1, 2))
            padded = (self.q_start + qs * BM + BM > self.q_start + self.q_len) | (
                ks * BN + BN > self.n)
            full = (kept == BM * BN) & ~padded
            bad += int(((kept == 0) | full).sum())
            checked += qs.size
        return bad, checked

    def to_dense(self) -> np.ndarray:
        """[H, q_len, n] bool: full blocks all kept, partial blocks by the element predicate."""
        if self.pattern.dynamic:
            raise ValueError("to_dense() of a dynamic pattern needs its run-time selection")
        csr = self.materialize()
        BM, BN = self.schedule.block_m, self.schedule.block_n
        H = csr.kv_num_blocks.shape[0]
        out = np.zeros((H, self.q_len, self.n), dtype=bool)
        order = sorted((h, c) for c in self.classes for h in c.heads)
        for i, (h, c) in enumerate(order):
            for qb in range(csr.num_q_blocks):
                r0 = qb * BM
                r1 = min(r0 + BM, self.q_len)
                q = np.arange(self.q_start + r0, self.q_start + r1).reshape(-1, 1)
                for kb in csr.full_kv_indices[i, qb, : csr.full_kv_num_blocks[i, qb]]:
                    out[i, r0:r1, kb * BN: min((kb + 1) * BN, self.n)] = True
                for kb in csr.kv_indices[i, qb, : csr.kv_num_blocks[i, qb]]:
                    k = np.arange(kb * BN, min((kb + 1) * BN, self.n)).reshape(1, -1)
                    m = num_eval(c.mask, {"q": q, "k": k, "h": np.int64(h),
                                          "n": np.int64(self.n_var)})
                    out[i, r0:r1, kb * BN: min((kb + 1) * BN, self.n)] = np.broadcast_to(
                        m, (r1 - r0, k.size))
        return out

    def stats(self, head_dim: int = 128) -> Stats:
        """Kept pairs, visited / partial / full blocks over all heads, from the CSR and the
        element predicate on partial blocks only."""
        csr = self.materialize()
        BM, BN = self.schedule.block_m, self.schedule.block_n
        QB = csr.num_q_blocks
        rows = np.minimum((np.arange(QB) + 1) * BM, self.q_len) - np.arange(QB) * BM
        kept = 0
        # The CSR's rows are the heads in ascending order.
        row_of = {h: i for i, h in enumerate(sorted(h for c in self.classes for h in c.heads))}
        # Heads of one class share their rows: count one head, multiply by the class size.
        for c in self.classes:
            h = min(c.heads)
            i = row_of[h]
            nf = csr.full_kv_num_blocks[i]
            valid = np.arange(csr.full_kv_indices.shape[2]) < nf[:, None]
            qb_f, j = np.nonzero(valid)
            kb = csr.full_kv_indices[i, qb_f, j].astype(np.int64)
            cols = np.minimum((kb + 1) * BN, self.n) - kb * BN
            here = int((rows[qb_f] * cols).sum())
            p_q = np.repeat(np.arange(QB), csr.kv_num_blocks[i])
            if p_q.size and not self.pattern.dynamic:
                validp = np.arange(csr.kv_indices.shape[2]) < csr.kv_num_blocks[i][:, None]
                p_k = csr.kv_indices[i][validp]
                here += _count_kept(c.mask, p_q, p_k, h, self)
            kept += here * len(c.heads)
        partial = int(csr.kv_num_blocks.sum())
        full = int(csr.full_kv_num_blocks.sum())
        if self.layout is not None and self.layout.moves_queries():
            total = self.heads * self.n_var * self.n_var
        else:
            total = self.heads * self.q_len * self.n_var
        return Stats(kept, partial + full, partial, full, total, head_dim)


def _count_kept(mask: Node, qs, ks, h: int, bm: BlockMaskIR) -> int:
    BM, BN = bm.schedule.block_m, bm.schedule.block_n
    total = 0
    chunk = max(1, (1 << 22) // (BM * BN))
    for s in range(0, qs.size, chunk):
        q_b, k_b = qs[s: s + chunk], ks[s: s + chunk]
        q = bm.q_start + q_b.reshape(-1, 1, 1) * BM + np.arange(BM).reshape(1, -1, 1)
        k = k_b.reshape(-1, 1, 1) * BN + np.arange(BN).reshape(1, 1, -1)
        valid = (q < bm.q_start + bm.q_len) & (k < bm.n)
        m = num_eval(mask, {"q": q, "k": k, "h": np.int64(h), "n": np.int64(bm.n_var)})
        total += int((np.broadcast_to(m, valid.shape) & valid).sum())
    return total


def _pad_rows(idx: np.ndarray, counts: np.ndarray, KB: int) -> None:
    """Fill each row after its valid prefix with its last valid index (0 for an empty row).

    Kernels (FlexAttention's and ours) read only the prefix; repeating a valid index keeps rows
    non-decreasing and any prefetch in bounds, at O(rows x width) cost. (create_block_mask pads
    with the unused indices instead, which needs a sort per row.)"""
    H, QB, W = idx.shape
    if W == 0:
        return
    c = counts.astype(np.int64)
    last = np.take_along_axis(idx, np.clip(c - 1, 0, W - 1)[..., None], axis=2)
    last = np.where(c[..., None] > 0, last, 0)
    pad = np.arange(W)[None, None, :] >= c[..., None]
    idx[...] = np.where(pad, last, idx)


def _expand(qb, lo, hi):
    """All (qb, kb) with lo[qb] <= kb <= hi[qb]."""
    cnt = np.maximum(hi - lo + 1, 0)
    qs = np.repeat(qb, cnt)
    if qs.size == 0:
        return qs, qs.copy()
    start = np.repeat(lo, cnt)
    offs = np.arange(qs.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    return qs, start + offs


def _merge(sources, KB: int):
    """Deduplicate candidate blocks of several rules (sorted by query block, then key block).

    A block proven FULL by any rule is FULL; otherwise a final verdict (from the whole mask)
    stands; a block of one rule keeps that rule's verdict; a block that several rules reach
    without a proof is left to the classifier (-1), since their union may cover it."""
    z = np.zeros(0, dtype=np.int64)
    if not sources:
        return z, z.copy(), np.zeros(0, dtype=np.int8)
    if len(sources) == 1 and not sources[0][3]:
        qs, ks, v, _ = sources[0]
        return qs, ks, v.copy()
    keys = np.concatenate([q * KB + k for q, k, _, _ in sources])
    pre = np.concatenate([v for _, _, v, _ in sources]).astype(np.int8)
    fin = np.concatenate([np.full(v.size, f, dtype=bool) for _, _, v, f in sources])
    order = np.argsort(keys, kind="stable")
    keys, pre, fin = keys[order], pre[order], fin[order]
    if keys.size == 0:
        return z, z.copy(), np.zeros(0, dtype=np.int8)
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    best = np.maximum.reduceat(pre, starts)
    final = np.maximum.reduceat(np.where(fin, pre, -1).astype(np.int8), starts)
    any_final = np.maximum.reduceat(fin.astype(np.int8), starts).astype(bool)
    count = np.diff(np.concatenate([starts, [keys.size]]))
    cls = np.where(best == FULL, FULL,
                   np.where(any_final, final, np.where(count == 1, best, -1))).astype(np.int8)
    k = keys[starts]
    return k // KB, k % KB, cls


def _stride_all(qs, ks, stride, env, block_n: int):
    """Whether every pattern block that key block kb touches is selected."""
    off = np.broadcast_to(num_eval(stride.offset, env), env["q0"].shape).astype(np.int64)
    B, m = stride.block, stride.step
    j0 = (ks * block_n) // B
    j1 = (ks * block_n + block_n - 1) // B
    if m == 1:
        return np.ones(qs.shape, dtype=bool)
    # More than one pattern block in the key block and m > 1: some is unselected.
    return (j0 == j1) & (np.mod(j0 - off[qs], m) == 0)


def _strided(qb, lo, hi, stride, env, block_n: int, KB: int):
    """(qb, kb) of key blocks in [lo, hi] that meet a selected pattern block, ascending."""
    off = np.broadcast_to(num_eval(stride.offset, env), qb.shape).astype(np.int64)
    B, m = stride.block, stride.step
    j_lo = (lo * block_n) // B
    j_hi = (hi * block_n + block_n - 1) // B
    j_first = j_lo + np.mod(off - j_lo, m)
    cnt_j = np.where((j_first <= j_hi) & (hi >= lo), (j_hi - j_first) // m + 1, 0)
    qj, i = _expand(qb, np.zeros_like(cnt_j), cnt_j - 1)
    j = j_first[qj] + i * m
    kb_a = (j * B) // block_n
    kb_b = (j * B + B - 1) // block_n
    qs, ks = _expand(qj, kb_a, kb_b)
    inside = (ks >= lo[qs]) & (ks <= hi[qs])
    qs, ks = qs[inside], ks[inside]
    if m * B < 2 * block_n and qs.size:
        # Consecutive selected pattern blocks can share a key block.
        key = np.unique(qs * KB + ks)
        qs, ks = key // KB, key % KB
    return qs, ks


def refine(mask: Node, q0, q1, k0, k1, h: int, n: int, rounds: int = 2) -> np.ndarray:
    """Classify boxes; a PARTIAL verdict is retried on sub-boxes (split at the pattern's own
    block sizes, else in halves), which removes most imprecision of the interval domain. Each
    box is split on its own terms, so a verdict never depends on the other boxes."""
    q0, q1, k0, k1 = (np.asarray(x, dtype=np.int64) for x in (q0, q1, k0, k1))
    q0, q1, k0, k1 = np.broadcast_arrays(q0, q1, k0, k1)
    cls = absint.classify(mask, q0, q1, k0, k1, h, n)
    divs_q, divs_k = _divisors(mask)
    idx = np.nonzero(cls == PARTIAL)[0]
    for _ in range(rounds):
        if idx.size == 0:
            break
        any_t = np.zeros(idx.size, dtype=bool)
        any_f = np.zeros(idx.size, dtype=bool)
        for (a0, a1, av) in _split(q0[idx], q1[idx], divs_q):
            for (b0, b1, bv) in _split(k0[idx], k1[idx], divs_k):
                ok = av & bv
                if not np.any(ok):
                    continue
                c = absint.classify(mask, a0[ok], a1[ok], b0[ok], b1[ok], h, n)
                sel = np.nonzero(ok)[0]
                any_t[sel] |= c != EMPTY
                any_f[sel] |= c != FULL
        sub_cls = np.where(any_t & any_f, PARTIAL, np.where(any_t, FULL, EMPTY))
        cls[idx] = sub_cls
        idx = idx[sub_cls == PARTIAL]
        # Later rounds split the boxes that are still partial in halves, from scratch.
        divs_q, divs_k = [], []
    return cls


def _divisors(mask: Node) -> tuple[list[int], list[int]]:
    """Constants c of q // c and k // c (and % c) applied to q or k itself: cutting a box at
    multiples of c makes those terms constant on each piece."""
    dq, dk = set(), set()
    for x in walk(mask):
        if isinstance(x, Op) and x.op in ("fdiv", "mod") and isinstance(x.args[1], Const):
            c = x.args[1].value
            if isinstance(c, int) and not isinstance(c, bool) and c > 1:
                v = _base_var(x.args[0], c)
                if v == "q":
                    dq.add(c)
                elif v == "k":
                    dk.add(c)
    return sorted(dq), sorted(dk)


def _base_var(e: Node, c: int) -> str | None:
    """'q' or 'k' when e is that variable, or that variable % s with c | s (a permuted layout's
    position within its class); cutting at multiples of c then keeps e // c constant."""
    if isinstance(e, Var) and e.name in ("q", "k"):
        return e.name
    if (isinstance(e, Op) and e.op == "mod" and isinstance(e.args[0], Var)
            and e.args[0].name in ("q", "k") and isinstance(e.args[1], Const)
            and isinstance(e.args[1].value, int) and e.args[1].value % c == 0):
        return e.args[0].name
    return None


def _split(lo: np.ndarray, hi: np.ndarray, divs: list[int], max_pieces: int = 16):
    """Pieces (lo_i, hi_i, valid_i) of each interval: cut at multiples of the smallest divisor
    d with width <= d * max_pieces (so x // d is constant on a piece), else in two halves;
    chosen per interval."""
    width = hi - lo + 1
    choice = np.zeros(width.shape, dtype=np.int64)  # 0: halves
    for c in sorted(divs, reverse=True):
        choice = np.where((width <= c * max_pieces) & (width > 1), c, choice)
    d = np.where(choice > 0, choice, 1)
    first = (lo // d) * d
    out = []
    by_div = choice > 0
    mid = lo + (width - 1) // 2
    for i in range(max_pieces + 1):
        a = np.maximum(first + i * d, lo)
        b = np.minimum(first + (i + 1) * d - 1, hi)
        if i == 0:
            a = np.where(by_div, a, lo)
            b = np.where(by_div, b, mid)
            valid = np.where(by_div, a <= b, width >= 1)
        elif i == 1:
            a = np.where(by_div, a, mid + 1)
            b = np.where(by_div, b, hi)
            valid = np.where(by_div, a <= b, width >= 2)
        else:
            valid = by_div & (a <= b)
        out.append((a, b, valid))
    return out


def ranges_text(hs: list[int]) -> str:
    """Sorted ints as a compact list of runs: 0..3, 7, 9..11."""
    out, i = [], 0
    hs = sorted(hs)
    while i < len(hs):
        j = i
        while j + 1 < len(hs) and hs[j + 1] == hs[j] + 1:
            j += 1
        out.append(str(hs[i]) if i == j else f"{hs[i]}..{hs[j]}")
        i = j + 1
    return ", ".join(out)


def build(pattern: PatternIR, *, n: int, heads: int = 1, q_len: int | None = None,
          schedule: Schedule | None = None, layout=None) -> BlockMaskIR:
    """The symbolic block-mask IR of a pattern for key length n (queries: the last q_len).

    With a layout (compiler.layout), the pattern is transformed and the grid is permuted."""
    schedule = schedule or Schedule()
    q_len = n if q_len is None else q_len
    if n < 1 or not 1 <= q_len <= n:
        raise ValueError(f"need n >= 1 and 1 <= q_len <= n (n = {n}, q_len = {q_len})")
    if layout is not None:
        from .layout import transform

        if layout.n != n:
            raise ValueError(f"layout is for n = {layout.n}, not {n}")
        pattern = transform(pattern, layout)
        if layout.moves_queries():
            if q_len != n:
                raise ValueError("a diagonal layout needs all n queries (q_len == n)")
            bm = BlockMaskIR(pattern, layout.n_perm, heads, layout.n_perm, 0, schedule,
                             n_var=n, layout=layout)
        else:
            bm = BlockMaskIR(pattern, layout.n_perm, heads, q_len, n - q_len, schedule,
                             n_var=n, layout=layout)
    else:
        bm = BlockMaskIR(pattern, n, heads, q_len, n - q_len, schedule)
    mask = rewrite(pattern.mask)
    uses_h = "h" in free_vars(mask)
    groups: dict[str, HeadClass] = {}
    for h in range(heads) if uses_h else [None]:
        m = rewrite(substitute(mask, {"h": Const(h)})) if h is not None else mask
        key = to_text(m)
        if key in groups:
            groups[key].heads.append(h)
            continue
        derived = derive_with_mask(m, schedule.block_n)
        exact = derived is not None
        rules, m_clean = derived if exact else ([fallback_rule()], m)
        groups[key] = HeadClass([h] if h is not None else list(range(heads)), m_clean, rules,
                                exact)
    bm.classes = list(groups.values())
    return bm


__all__ = ["CSR", "BlockMaskIR", "HeadClass", "Schedule", "Stats", "build"]
