"""Forward attention kernels generated from the block-mask IR: one skeleton, a few hooks.

The skeleton is FlexAttention's: per query block, loops over FULL key blocks (no mask) and over
PARTIAL key blocks (the pattern's predicate and bias inlined as Triton code), online softmax in
base 2, output 0 and LSE -inf for rows that keep nothing. Hooks: the predicate, the bias, the
key-block schedule (ranges computed in the kernel from the rules' closed forms, or index
lists), the layout (original positions of permuted rows, loaded and stored in place) and the
dynamic selectors' side tensor. Launch options (Config) choose the loads (pointers or, on
Hopper, TMA descriptors) and whether full and partial blocks share one loop. launch_args()
builds a launch as data; attention() runs it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import torch
from attnc.compiler import absint
from attnc.compiler.blockmask import BlockMaskIR
from attnc.compiler.ir import INT, type_of, walk
from attnc.compiler.rules import rewrite
from attnc.compiler.support import derive_with_mask

from attnc.settings import settings

from .expr import PRELUDE, print_expr

TEMPLATE = """{header}
import triton
import triton.language as tl
{prelude}

@triton.jit
def attnc_orig(p, N, SEG, LD, LBLK, LAYOUT: tl.constexpr, IS_KEY: tl.constexpr):
    # Original position of grid position p (the identity without a layout transform).
    if LAYOUT == 1:
        return (p % SEG) * LD + p // SEG
    elif LAYOUT == 2 and IS_KEY:
        idx = p % SEG
        return ((idx // LBLK) * LD + p // SEG) * LBLK + idx % LBLK
    else:
        return p


@triton.jit
def attnc_orig_block(p0, offs, SEG, LD, LBLK, LAYOUT: tl.constexpr, IS_KEY: tl.constexpr):
    # attnc_orig for the block of grid positions p0 + offs. A layout's segment is a multiple
    # of the block sizes, so the class (and the block's start in it) is one scalar division
    # per block instead of an int64 division per row.
    if LAYOUT == 1:
        cls = p0 // SEG
        return (p0 - cls * SEG + offs) * LD + cls
    elif LAYOUT == 2 and IS_KEY:
        cls = p0 // SEG
        idx = p0 - cls * SEG + offs
        return ((idx // LBLK) * LD + cls) * LBLK + idx % LBLK
    else:
        return p0 + offs


{blocks}

@triton.jit
def attnc_fwd(
    Q, K, V, O, LSE,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, SIDE, PAT,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m, sl_b, sl_h,
    s_num_h, s_idx_h, s_idx_m, s_fnum_h, s_fidx_h, s_fidx_m, s_side_h, s_side_s,
    sm_scale, Q_LEN, N_CTX, N_VAR, Q_START, H, GROUP, N_ORIG, SEG, LD, LBLK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, LAYOUT: tl.constexpr, POS32: tl.constexpr,
    TMA: tl.constexpr = 0, ONE_LOOP: tl.constexpr = False,
):
    # Last query blocks first: under causal-like masks they visit the most keys, so the final
    # wave of programs holds short ones (less tail).
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    # Row of k / v in the [B * Hkv, n, D] view that TMA descriptors address.
    kv_row = (b * (H // GROUP) + hk).to(tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    # The predicate's integers: int32 where the compiler proved every value fits (half the
    # registers of int64 tiles), else int64.
    if POS32:
        q_pos = (Q_START + offs_m).to(tl.int32)[:, None]
        hp = h.to(tl.int32)
        n_var = N_VAR.to(tl.int32)
    else:
        q_pos = (Q_START + offs_m).to(tl.int64)[:, None]
        hp = h
        n_var = N_VAR.to(tl.int64)
    # Rows of the q / o tensors: the original positions, counted from the first query.
    q_orig = attnc_orig((Q_START + offs_m).to(tl.int64), N_ORIG, SEG, LD, LBLK, LAYOUT, False)
    if LAYOUT == 1:
        q_row = q_orig
    else:
        q_row = q_orig - (N_ORIG - Q_LEN)
    row_ok = (offs_m < Q_LEN) & (q_orig < N_ORIG)
    if TMA == 2:
        # Q and O through descriptors over [B * H, Lq, D] too (natural layout: q_row is
        # offs_m); rows past Lq load as zeros and are not stored.
        q = Q.load([(b * H + h).to(tl.int32), pid_m * BLOCK_M, 0]).reshape([BLOCK_M, HEAD_DIM])
    else:
        q = tl.load(Q + b * sq_b + h * sq_h + q_row[:, None] * sq_m + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    LOG2E: tl.constexpr = 1.4426950408889634
    qk_scale = sm_scale * LOG2E
{schedule}
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out = tl.where(empty[:, None], 0.0, out)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / LOG2E)
    if TMA == 2:
        O.store([(b * H + h).to(tl.int32), pid_m * BLOCK_M, 0],
                out.to(O.dtype).reshape([1, BLOCK_M, HEAD_DIM]))
    else:
        tl.store(O + b * so_b + h * so_h + q_row[:, None] * so_m + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b * sl_b + h * sl_h + q_row, lse, mask=row_ok)
"""

_CALL = ("attnc_block{suffix}(acc, l_i, m_i, q, kb, q_pos, hp, hk, b, n_var, qk_scale, K, V, "
         "sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, N_CTX, N_ORIG, SEG, LD, LBLK, SIDE, s_side_h, "
         "s_side_s, kv_row, {part}, {m}, BLOCK_N, HEAD_DIM, UPCAST, IEEE, LAYOUT, POS32, TMA)")


def _loop(indent: str, header: str, masked: bool, index: str | None = None,
          suffix: str = "") -> list[str]:
    call = _CALL.format(m="1" if masked else "0", suffix=suffix, part="False")
    out = [f"{indent}{header}"]
    if index is not None:
        out.append(f"{indent}    kb = {index}")
    out.append(f"{indent}    acc, l_i, m_i = {call}")
    return out


def _csr_schedule(suffix: str = "") -> str:
    return "\n".join(
        ["    # Key blocks from the index lists: full (no mask), then partial."]
        + ["    n_full = tl.load(FULL_NUM + h * s_fnum_h + pid_m)"]
        + _loop("    ", "for i in range(0, n_full):", False,
                "tl.load(FULL_IDX + h * s_fidx_h + pid_m * s_fidx_m + i).to(tl.int64)", suffix)
        + ["    n_part = tl.load(KV_NUM + h * s_num_h + pid_m)"]
        + _loop("    ", "for i in range(0, n_part):", True,
                "tl.load(KV_IDX + h * s_idx_h + pid_m * s_idx_m + i).to(tl.int64)", suffix))


_NAMES = {"q": "q_pos", "k": "k_pos", "h": "h", "n": "n_var"}


_RANGE_NAMES = {"q0": "q0", "q1": "q1", "n": "n_var", "kmax": "kmax", "h": "h"}
MAX_ARITH_RULES = 4


def arithmetic_rules(bm: BlockMaskIR):
    """Rules the kernel can turn into key-block ranges itself (no index loads): bounds with at
    most one strided rule, no guards or tested atoms. Head classes that differ only through h
    use the rules derived with h free, so one kernel serves every head."""
    if bm.layout is not None or bm.pattern.dynamic:
        return None
    if len(bm.classes) == 1:
        rules, exact = bm.classes[0].rules, bm.classes[0].exact_rules
    else:
        derived = derive_with_mask(rewrite(bm.pattern.mask), bm.schedule.block_n)
        if derived is None:
            return None
        rules, exact = derived[0], True
    if not exact or not rules or len(rules) > MAX_ARITH_RULES:
        return None
    if sum(r.stride is not None for r in rules) > 1:
        return None
    for r in rules:
        if r.guards or r.impure or r.full_lo is None:
            return None
        if r.stride is not None and r.stride.block % bm.schedule.block_n:
            return None
    return rules


def _segments_loop(segs: list[tuple[str, str, int]], tag: str, masked: bool | int,
                   suffix: str, ind: str = "    ") -> list[str]:
    """One loop over the concatenation of segments (start, count, step): the block index of
    step t is the start of the last segment whose offset t has reached, plus step times the
    rest. masked: True or False for every block, or an int j: segments from j on are
    partial (one loop for both kinds, the mask applied under a scalar branch). ind: the
    indentation of the generated lines."""
    L = [f"{ind}{tag}o0 = tl.zeros([], tl.int64)"]
    for j, (_, cnt, _) in enumerate(segs):
        L.append(f"{ind}{tag}o{j + 1} = {tag}o{j} + tl.maximum({cnt}, 0)")

    def at(j: int, t: str) -> str:
        start, _, step = segs[j]
        return f"{start} + {t}" if step == 1 else f"{start} + ({t}) * {step}"

    L += [f"{ind}for t in range(0, {tag}o{len(segs)}):", f"{ind}    kb = {at(0, 't')}"]
    for j in range(1, len(segs)):
        L.append(f"{ind}    kb = tl.where(t >= {tag}o{j}, {at(j, f't - {tag}o{j}')}, kb)")
    if masked is True or masked is False:
        call = _CALL.format(m="1" if masked else "0", suffix=suffix, part="False")
    else:
        call = _CALL.format(m="2", suffix=suffix, part=f"t >= {tag}o{masked}")
    return L + [f"{ind}    acc, l_i, m_i = {call}"]


def _arith_schedule(rules, block_n: int, suffix: str = "") -> str:
    """Key-block ranges from the rules' closed forms (arith_ranges). All full segments run in
    one loop and all partial ones in another (fixed bodies, which Triton can
    software-pipeline), so a program restarts the pipeline twice, not once per piece."""
    L, full, part, nested = arith_ranges(rules, block_n, suffix)
    L.append("    if ONE_LOOP:")
    L += _segments_loop(full + part, "u", len(full), suffix, "        ")
    L.append("    else:")
    L += _segments_loop(full, "f", False, suffix, "        ")
    L += _segments_loop(part, "p", True, suffix, "        ")
    return "\n".join(L + nested)


Segment = tuple[str, str, int]  # (first block, block count, step) as source expressions


def arith_ranges(rules, block_n: int, suffix: str = ""
                 ) -> tuple[list[str], list[Segment], list[Segment], list[str]]:
    """Source lines that compute a program's key-block ranges from the rules' closed forms
    (scalars only, from pid_m, Q_START, Q_LEN, N_CTX, BLOCK_M, BLOCK_N, h and n_var; `tl.`
    names that Gluon has too), and the ranges as full and partial
    segments. Interval rules are sorted by their first block and trimmed so that none
    overlaps an earlier one (each block is processed once); each interval splits into
    partial, full and partial segments. A strided rule visits every step-th block of the
    gaps between the intervals, split the same way. Strided pieces whose pattern blocks span
    several key blocks come as nested loops (the last item, source lines) instead."""
    P = lambda e: print_expr(e, _RANGE_NAMES)  # noqa: E731
    L = [
        "    # Key-block ranges computed from the block-mask IR's closed forms (no index loads).",
        "    q0 = (Q_START + pid_m * BLOCK_M).to(tl.int64)",
        "    q1 = tl.minimum(q0 + BLOCK_M - 1, Q_START + Q_LEN - 1).to(tl.int64)",
        "    kmax = (N_CTX - 1).to(tl.int64)",
        "    complete = (q0 + BLOCK_M - 1) <= (Q_START + Q_LEN - 1)",
        "    last_full = N_CTX // BLOCK_N - 1",
    ]
    intervals = [r for r in rules if r.stride is None]
    strided = [r for r in rules if r.stride is not None]
    for i, r in enumerate(intervals):
        L += [
            f"    lo{i} = tl.maximum({P(r.visit_lo)}, 0)",
            f"    hi{i} = tl.minimum({P(r.visit_hi)}, kmax)",
            f"    a{i} = lo{i} // BLOCK_N",
            f"    z{i} = tl.where(hi{i} >= lo{i}, hi{i} // BLOCK_N, a{i} - 1)",
            f"    fa{i} = (tl.maximum({P(r.full_lo)}, 0) + BLOCK_N - 1) // BLOCK_N",
            f"    fz{i} = (tl.minimum({P(r.full_hi)}, kmax) + 1) // BLOCK_N - 1",
            f"    fz{i} = tl.where(complete, tl.minimum(fz{i}, last_full), fa{i} - 1)",
        ]
    R = len(intervals)
    # Sorting network on (a, z, fa, fz) by a: fixed code, any order at run time.
    for i in range(R):
        for j in range(R - 1 - i):
            x, y = j, j + 1
            L.append(f"    sw = a{y} < a{x}")
            for v in ("a", "z", "fa", "fz"):
                L.append(f"    {v}{x}, {v}{y} = tl.where(sw, {v}{y}, {v}{x}), "
                         f"tl.where(sw, {v}{x}, {v}{y})")
    L.append("    end = tl.zeros([], tl.int64) - 1  # last block processed so far")
    for i in range(R):
        L += [
            f"    a{i} = tl.maximum(a{i}, end + 1)",
            "    # an empty interval sits at the running end, so the gaps stay disjoint",
            f"    e = z{i} < a{i}",
            f"    a{i} = tl.where(e, end + 1, a{i})",
            f"    z{i} = tl.where(e, end, z{i})",
            f"    fa{i} = tl.maximum(fa{i}, a{i})",
            f"    fz{i} = tl.minimum(fz{i}, z{i})",
            f"    e = fz{i} < fa{i}",
            f"    fa{i} = tl.where(e, z{i} + 1, fa{i})",
            f"    fz{i} = tl.where(e, z{i}, fz{i})",
            f"    gap{i} = end + 1",
            f"    end = tl.maximum(end, z{i})",
        ]
    full = [(f"fa{i}", f"fz{i} - fa{i} + 1", 1) for i in range(R)]
    part = [seg for i in range(R) for seg in ((f"a{i}", f"fa{i} - a{i}", 1),
                                             (f"fz{i} + 1", f"z{i} - fz{i}", 1))]
    nested: list[str] = []  # strided pieces whose pattern blocks span several key blocks
    for r in strided:
        st = r.stride
        ratio = st.block // block_n  # key blocks per pattern block
        L += [
            f"    slo = tl.maximum({P(r.visit_lo)}, 0)",
            f"    shi = tl.minimum({P(r.visit_hi)}, kmax)",
            "    sa = slo // BLOCK_N",
            "    sz = tl.where(shi >= slo, shi // BLOCK_N, sa - 1)",
            f"    sfa = (tl.maximum({P(r.full_lo)}, 0) + BLOCK_N - 1) // BLOCK_N",
            f"    sfz = (tl.minimum({P(r.full_hi)}, kmax) + 1) // BLOCK_N - 1",
            "    sfz = tl.where(complete, tl.minimum(sfz, last_full), sfa - 1)",
            f"    soff = {P(st.offset)}",
        ]
        # Gaps between the intervals: [gap_i, a_i - 1] for each i, then [end + 1, ...]; each
        # splits into partial, full and partial pieces.
        gaps = [(f"gap{i}", f"a{i} - 1") for i in range(R)] + [("end + 1", "sz")]
        for g, (glo, ghi) in enumerate(gaps):
            L += [
                f"    g_lo = tl.maximum({glo}, sa)",
                f"    g_hi = tl.minimum({ghi}, sz)",
                "    g_fa = tl.maximum(sfa, g_lo)",
                "    g_fz = tl.minimum(sfz, g_hi)",
                "    e = g_fz < g_fa",
                "    g_fa = tl.where(e, g_hi + 1, g_fa)",
                "    g_fz = tl.where(e, g_hi, g_fz)",
            ]
            for p, (lo, hi, masked) in enumerate((("g_lo", "g_fa - 1", True),
                                                  ("g_fa", "g_fz", False),
                                                  ("g_fz + 1", "g_hi", True))):
                # Pattern block j = kb // ratio is kept when (j - soff) % step == 0.
                L += [f"    jb = ({lo}) // {ratio}",
                      f"    jb = jb + _mod(soff - jb, {st.step})"]
                if ratio == 1:
                    # Kept blocks jb, jb + step, ... up to hi: a segment of the merged loops.
                    v = f"s{len(full) + len(part)}"
                    L += [f"    {v}a = jb",
                          f"    {v}n = tl.where(jb <= {hi}, ({hi} - jb) // {st.step} + 1, 0)"]
                    (part if masked else full).append((f"{v}a", f"{v}n", st.step))
                else:
                    # Save the piece's bounds for its nested loops after the merged ones.
                    v = f"r{g}_{p}_{len(nested)}"
                    L += [f"    {v}b = jb * {ratio}", f"    {v}lo = {lo}", f"    {v}hi = {hi}"]
                    nested.append(f"    for j0 in range({v}b, {v}hi + 1, {st.step * ratio}):")
                    nested += _loop("        ", f"for kb in range(tl.maximum(j0, {v}lo), "
                                    f"tl.minimum(j0 + {ratio}, {v}hi + 1)):", masked, None,
                                    suffix)
    return L, full, part, nested


INT32_MAX = 2**31 - 1


def fits_int32(bm: BlockMaskIR) -> bool:
    """True when every integer the predicate and bias compute stays inside int32 for every
    query and key slot the kernel can touch (interval analysis over the whole grid, padding
    included): then the kernel evaluates them in int32."""
    if isinstance(bm, PlanMask):
        return all(fits_int32(v) for v in bm.variants)
    if bm.pattern.dynamic:
        return False
    BM, BN = bm.schedule.block_m, bm.schedule.block_n
    qmax = bm.q_start + -(-bm.q_len // BM) * BM
    kmax = -(-bm.n // BN) * BN
    if max(qmax, kmax, bm.n_var, bm.heads) > INT32_MAX // 4:
        return False
    one = np.array([0], dtype=np.int64)
    ev = absint.Evaluator(one, one + qmax, one, one + kmax, 0, bm.n_var)
    ev.env["h"] = absint.interval(one, one + max(bm.heads, 1) - 1)
    exprs = [rewrite(bm.pattern.mask)]
    if bm.pattern.bias is not None:
        exprs.append(rewrite(bm.pattern.bias))
    for e in exprs:
        for x in walk(e):
            if type_of(x) != INT:
                continue
            v = ev.eval(x)
            lo, hi = float(np.min(v.lo)), float(np.max(v.hi))
            if not (-INT32_MAX <= lo and hi <= INT32_MAX):
                return False
    return True


BLOCK_TEMPLATE = """@triton.jit
def attnc_block{suffix}(acc, l_i, m_i, q, kb, q_pos, h, hk, b, n_var, qk_scale,
                K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, N_CTX, N_ORIG, SEG, LD, LBLK,
                SIDE, s_side_h, s_side_s, kv_row, part,
                APPLY_MASK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr, LAYOUT: tl.constexpr,
                POS32: tl.constexpr, TMA: tl.constexpr):
    LOG2E: tl.constexpr = 1.4426950408889634
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    if TMA:
        # K and V are tensor descriptors over [B * Hkv, n, D] (natural layout only): one bulk
        # copy per tile, rows past n come back as zeros.
        k = K.load([kv_row, (kb * BLOCK_N).to(tl.int32), 0]).reshape([BLOCK_N, HEAD_DIM])
        v = V.load([kv_row, (kb * BLOCK_N).to(tl.int32), 0]).reshape([BLOCK_N, HEAD_DIM])
        if APPLY_MASK:
            col_ok = offs_n < N_CTX
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        rows = attnc_orig_block(kb * BLOCK_N, tl.arange(0, BLOCK_N).to(tl.int64), SEG, LD,
                                LBLK, LAYOUT, True)
        k_ptr = K + b * sk_b + hk * sk_h + rows[:, None] * sk_n + offs_d[None, :]
        v_ptr = V + b * sv_b + hk * sv_h + rows[:, None] * sv_n + offs_d[None, :]
        if APPLY_MASK:
            # Partial blocks may run past the keys (or onto a layout's padding slots).
            col_ok = (offs_n < N_CTX) & (rows < N_ORIG)
            k = tl.load(k_ptr, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptr, mask=col_ok[:, None], other=0.0)
        else:
            # Full blocks are complete and hold real keys only: unmasked loads.
            k = tl.load(k_ptr)
            v = tl.load(v_ptr)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # float32 inputs get float32 products (not TF32): the error bound is PyTorch's.
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
{bias}
    # APPLY_MASK 1: a partial block; 2: the one-loop schedule, partial when `part` (a scalar
    # branch after the product, so full and partial blocks share one software pipeline).
    if APPLY_MASK != 0:
        # Bound outside the runtime branch: a bias may have bound k_pos as int64 already, and
        # a branch must not change a variable's type.
        if POS32:
            k_pos = offs_n.to(tl.int32)[None, :]
        else:
            k_pos = offs_n[None, :]
    if APPLY_MASK == 1:
        s = tl.where(col_ok[None, :] & ({mask}), s, float("-inf"))
    elif APPLY_MASK == 2:
        if part:
            s = tl.where(col_ok[None, :] & ({mask}), s, float("-inf"))
    # Full blocks keep every score, so their rows always have a finite maximum.
    return attnc_update(acc, l_i, m_i, s, v, scale, APPLY_MASK != 0, IEEE)
"""


def _variant(bm: BlockMaskIR, arithmetic: bool | None, suffix: str) -> tuple[str, str, bool]:
    """(block helper source, schedule source, uses index lists) of one pattern."""
    sel = None
    if bm.pattern.dynamic:
        from .dynamic import selector_printer

        sel = selector_printer(bm.pattern)
    mask = rewrite(bm.pattern.mask)
    mask_src = print_expr(mask, _NAMES, sel)
    if bm.pattern.bias is not None:
        bias = rewrite(bm.pattern.bias)
        # A bias adds to scaled scores: scale here and let the update multiply by one.
        bias_src = (f"    k_pos = offs_n[None, :]\n"
                    f"    s = s * qk_scale + ({print_expr(bias, _NAMES, sel)}) * LOG2E\n"
                    f"    scale = 1.0")
    else:
        bias_src = "    scale = qk_scale"
    rules = arithmetic_rules(bm)
    use_arith = rules is not None if arithmetic is None else (arithmetic and rules is not None)
    schedule = (_arith_schedule(rules, bm.schedule.block_n, suffix) if use_arith
                else _csr_schedule(suffix))
    block = BLOCK_TEMPLATE.format(suffix=suffix, mask=mask_src, bias=bias_src)
    return block, schedule, not use_arith


def _finish(header: str, blocks: list[str], schedule: str) -> str:
    out = TEMPLATE.format(header=header, prelude=PRELUDE, blocks="\n\n".join(blocks),
                          schedule=schedule)
    # Long generated lines are fine for Triton; keep the file free of trailing blanks.
    return "\n".join(line.rstrip() for line in out.splitlines()) + "\n"


def kernel_source(bm: BlockMaskIR, arithmetic: bool | None = None, source: str = "") -> str:
    """Deterministic Triton source for a block mask's pattern. With arithmetic ranges (the
    default when the rules allow it) the kernel needs no index lists. Dynamic selectors read
    the side tensor their builders fill (codegen.dynamic)."""
    if isinstance(bm, PlanMask):
        return plan_source(bm, arithmetic, source)
    block, schedule, lists = _variant(bm, arithmetic, "")
    mode = "index lists" if lists else "arithmetic ranges"
    header = (f'"""attnc generated kernel. pattern: {bm.pattern.name}; key {bm.pattern.key}; '
              f'schedule: {mode}\n\nattnc {_version()}; source: {source or "(not recorded)"}\n'
              f'{bm.schedule.text()}\n"""')
    return _finish(header, [block], schedule)


@dataclass
class PlanMask:
    """The heads of one layer, each with its own pattern, run by one kernel: variant i is a
    block mask over all heads (built with heads = H, no layout, one shared schedule), and
    head_variant[h] says which variant head h runs."""

    variants: list[BlockMaskIR]
    head_variant: list[int]

    def __post_init__(self):
        first = self.variants[0]
        for v in self.variants:
            if v.layout is not None:
                raise ValueError("plan kernels run patterns in their natural order (no layout)")
            if (v.n, v.q_len, v.q_start, v.n_var, v.schedule) != \
                    (first.n, first.q_len, first.q_start, first.n_var, first.schedule):
                raise ValueError("every pattern of a plan kernel needs the same n, q_len and "
                                 "schedule")
        if sorted(set(self.head_variant)) != list(range(len(self.variants))):
            raise ValueError("head_variant must use every variant")

    # The attributes launch_args reads, shared by every variant.
    @property
    def schedule(self):
        return self.variants[0].schedule

    @property
    def n(self) -> int:
        return self.variants[0].n

    @property
    def n_var(self) -> int:
        return self.variants[0].n_var

    @property
    def q_len(self) -> int:
        return self.variants[0].q_len

    @property
    def q_start(self) -> int:
        return self.variants[0].q_start

    @property
    def heads(self) -> int:
        return len(self.head_variant)

    layout = None

    @property
    def key(self) -> str:
        text = "plan " + " ".join(v.pattern.key for v in self.variants) + " heads " + \
            " ".join(map(str, self.head_variant))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def pattern(self) -> PlanLabel:
        """What manifests and logs show for the kernel: its variants by name, the plan key."""
        return PlanLabel("plan(" + ", ".join(v.pattern.name for v in self.variants) + ")",
                         self.key, any(v.pattern.dynamic for v in self.variants))

    def text(self) -> str:
        return "\n".join([f"plan kernel: heads -> variant {self.head_variant}"]
                         + [f"variant {i}:\n" + v.text() for i, v in enumerate(self.variants)])

    def materialize(self):
        """One CSR over all heads: head h's rows come from its variant (padded to the widest)."""
        csrs = [v.materialize() for v in self.variants]
        H = self.heads
        QB = csrs[0].num_q_blocks
        out = {}
        for name, wide in (("kv_num_blocks", None), ("kv_indices", "kv_indices"),
                           ("full_kv_num_blocks", None), ("full_kv_indices", "full_kv_indices")):
            arrs = [getattr(c, name) for c in csrs]
            if wide is None:
                out[name] = np.stack([arrs[i][h if arrs[i].shape[0] > 1 else 0]
                                      for h, i in enumerate(self.head_variant)])
            else:
                W = max(max(a.shape[2] for a in arrs), 1)
                m = np.zeros((H, QB, W), dtype=np.int32)
                for h, i in enumerate(self.head_variant):
                    a = arrs[i][h if arrs[i].shape[0] > 1 else 0]
                    m[h, :, : a.shape[1]] = a
                out[name] = m
        return _PlanCSR(**out)


@dataclass(frozen=True)
class PlanLabel:
    name: str
    key: str
    dynamic: bool


@dataclass
class _PlanCSR:
    kv_num_blocks: np.ndarray
    kv_indices: np.ndarray
    full_kv_num_blocks: np.ndarray
    full_kv_indices: np.ndarray


def plan_layer(plan, layer: int, *, n: int, q_len: int | None = None,
               schedule=None) -> BlockMaskIR | PlanMask:
    """The kernel input for one layer of a checked plan (dsl PlanInfo): a PlanMask over its
    heads' distinct patterns, or a plain block mask when the layer uses one pattern."""
    from attnc.compiler.lower import lower_plan

    cells = lower_plan(plan)
    irs = [cells[(layer, h)] for h in range(plan.heads)]
    if any(ir.dynamic for ir in irs) and len({ir.key for ir in irs}) > 1:
        raise ValueError("a plan kernel runs static patterns; this layer mixes in a dynamic "
                         "one (run it per pattern with codegen.dynamic)")
    if not any(ir.dynamic for ir in irs):
        # Range checks and requirements of elastic arguments at this n (one query row), which
        # the block mask alone would not make (a window of n // 200 at n = 100 is empty).
        from attnc import reference

        reference.evaluate_plan(plan, layer=layer, n=n, q_len=1)
    return heads_kernel(irs, n=n, q_len=q_len, schedule=schedule)


def heads_kernel(irs, *, n: int, q_len: int | None = None,
                 schedule=None) -> BlockMaskIR | PlanMask:
    """The kernel input for heads with patterns irs[h]: one block mask per distinct pattern
    (over all heads), dispatched per head by a PlanMask when there are several."""
    from attnc.compiler.blockmask import build

    keys = list(dict.fromkeys(ir.key for ir in irs))
    first = {ir.key: ir for ir in reversed(irs)}
    variants = [build(first[key], n=n, heads=len(irs), q_len=q_len, schedule=schedule)
                for key in keys]
    if len(variants) == 1:
        return variants[0]
    return PlanMask(variants, [keys.index(ir.key) for ir in irs])


def plan_source(plan: PlanMask, arithmetic: bool | None = None, source: str = "") -> str:
    """One kernel for a layer's heads: each pattern's block helper and schedule, dispatched on
    the head's variant (read once per program)."""
    blocks, branches, modes = [], [], []
    for i, bm in enumerate(plan.variants):
        block, schedule, lists = _variant(bm, arithmetic, f"_{i}")
        blocks.append(block)
        modes.append("index lists" if lists else "arithmetic ranges")
        body = "\n".join("    " + line if line.strip() else line
                         for line in schedule.splitlines())
        branches.append(("if" if i == 0 else "elif") + f" pat == {i}:\n{body}")
    schedule = "    pat = tl.load(PAT + h)\n" + "\n".join(
        "    " + line if line.strip() else line for b in branches for line in b.splitlines())
    names = ", ".join(f"{i}: {bm.pattern.name} ({m})" for i, (bm, m) in
                      enumerate(zip(plan.variants, modes, strict=True)))
    header = (f'"""attnc generated kernel. plan of {len(plan.variants)} patterns; key '
              f'{plan.key}; schedule: per head\n\nvariants {names}\nheads -> variant '
              f'{plan.head_variant}\nattnc {_version()}; source: {source or "(not recorded)"}'
              f'\n{plan.schedule.text()}\n"""')
    return _finish(header, blocks, schedule)


def _version() -> str:
    from attnc import __version__

    return __version__


def load_kernel(source: str, interpret: bool | None = None):
    """The generated module's `attnc_fwd`, imported from attnc's content-addressed cache
    (Triton's JIT needs a real file); one module per source text and mode."""
    from .cache import load_kernel as cached

    return cached(source, interpret)


@dataclass
class Output:
    out: torch.Tensor
    lse: torch.Tensor


@dataclass(frozen=True)
class Config:
    """Launch options that do not change the block mask (block sizes live in its Schedule)."""

    num_warps: int = 4
    num_stages: int = 2
    # Hopper (sm_90+): tiles through TMA tensor descriptors, one bulk copy per tile instead
    # of per-thread address arithmetic and loads (natural layout only). 1: K and V; 2: Q and
    # O as well.
    tma: int = 0
    # Arithmetic-range kernels: full and partial blocks in one loop (one software pipeline
    # per program instead of two; the mask under a scalar branch).
    one_loop: bool = False
    # Hopper (sm_90): the warp-specialised Gluon kernel (codegen.hopper) instead of the Triton
    # skeleton: 1, a TMA producer warp and two consumer warpgroups with num_stages K/V
    # stages; 2, the same with the warpgroups taking turns to issue their products.
    ws: int = 0

    def text(self) -> str:
        extra = (f" :tma {self.tma}" if self.tma else "") + \
            (" :one_loop true" if self.one_loop else "") + (f" :ws {self.ws}" if self.ws else "")
        return f"(launch :num_warps {self.num_warps} :num_stages {self.num_stages}{extra})"

    def label(self) -> str:
        """Short form for tables and tuning records: w8/s3, w8/s3/tma, w8/s3/tma2+one,
        w4/s2/ws, w4/s2/wspp."""
        flags = ([{1: "tma"}.get(self.tma, f"tma{self.tma}")] if self.tma else []) + \
            (["one"] if self.one_loop else []) + \
            ([{1: "ws", 2: "wspp"}.get(self.ws, f"ws{self.ws}")] if self.ws else [])
        return f"w{self.num_warps}/s{self.num_stages}" + ("/" + "+".join(flags) if flags else "")


def default_config(bm: BlockMaskIR, head_dim: int) -> Config:
    """A sensible launch for the block sizes: 8 warps once a tile holds 128 x 128 x D work."""
    s = bm.schedule
    big = s.block_m * max(s.block_n, head_dim) >= 128 * 128
    return Config(num_warps=8 if big else 4, num_stages=3 if head_dim <= 128 else 2)


def _tma_by_default(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout) -> bool:
    """TMA loads without a tuning record: on Hopper and newer, 16-bit inputs, head dims up to
    128, natural layout (on an H200: 9-16% faster in every head-dim-128 case measured; at head
    dim 64 from 1% slower to 10% faster, docs/BENCHMARKS.md), and bases TMA can address."""
    return (q.device.type == "cuda" and layout is None and q.shape[-1] <= 128
            and q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(q.device)[0] >= 9
            and _tma_aligned(q, k, v))


def _tma_aligned(*ts: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases; a contiguous view into a larger buffer may not be (a
    non-contiguous one is copied, and the copy is)."""
    return not any(t.is_contiguous() and t.data_ptr() % 16 for t in ts)


WS_DEFAULT_MIN_N = 16384


def _ws_by_default(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMaskIR) -> bool:
    """The warp-specialised Gluon kernel (2 stages) without a tuning record: on sm_90 with
    16-bit inputs, head dim 128 and at least 16k keys, wherever it runs the block mask. On an
    H200 it beat the Triton skeleton with TMA on causal, streaming, a_shape and shards at 32k
    and 128k (except causal at 128k: 2% slower); at 8k its 2-stage launch lost on three of
    four, and at head dim 64 it was level (docs/BENCHMARKS.md): the tuner decides there."""
    if not (q.device.type == "cuda" and q.shape[-1] == 128 and bm.n >= WS_DEFAULT_MIN_N
            and q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(q.device)[0] == 9):
        return False
    if not _tma_aligned(q, k, v):
        return False
    from . import hopper

    return hopper.supported(bm, q.dtype, q.shape[-1]) is None


_LAYOUT_CODE = {None: 0, "diagonal": 1, "key_classes": 2}


def _prepared(bm: BlockMaskIR, arithmetic: bool | None, dev) -> tuple:
    """(kernel source, index-list tensors or None, int32 predicates) for a block mask, built
    once per block mask and device."""
    cache = bm.__dict__.setdefault("_kernel_launch", {})
    key = (arithmetic, str(dev))
    if key not in cache:
        src = kernel_source(bm, arithmetic)
        t = None
        if "KV_IDX + " in src:
            csr = bm.materialize()
            t = {name: torch.as_tensor(getattr(csr, name), device=dev).contiguous()
                 for name in _CSR_NAMES}
        cache[key] = (src, t, fits_int32(bm))
    return cache[key]


@dataclass
class Launch:
    """One kernel launch as data: the generated source, the grid and the arguments of its
    `attnc_fwd` (keyword arguments hold constexprs and launch options). codegen.artifact
    compiles ahead of time from the same data, so the two never drift apart."""

    source: str
    grid: tuple
    args: tuple
    kwargs: dict
    out: torch.Tensor
    lse: torch.Tensor


_CSR_NAMES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
_PLACEHOLDERS: dict[str, torch.Tensor] = {}


def _placeholder(dev) -> torch.Tensor:
    """A [1, 1, 1] int32 zero per device for arguments a kernel never reads (made once: a
    fresh one per launch would add a fill kernel to every call)."""
    key = str(dev)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.zeros((1, 1, 1), device=dev, dtype=torch.int32)
    return _PLACEHOLDERS[key]


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def launch_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMaskIR, *,
                sm_scale: float | None = None, arithmetic: bool | None = None,
                block_mask: dict[str, torch.Tensor] | None = None,
                side: torch.Tensor | None = None, config: Config | None = None,
                interpret: bool = False, poison: bool = False) -> Launch:
    """Check shapes and build the launch attention() makes, without launching and without a
    device check (tensors may live on the meta device for ahead-of-time builds).
    interpret: the interpreter's bf16/fp16 dot products need upcast operands."""
    B, H, Lq, D = q.shape
    Bk, Hkv, n, Dk = k.shape
    lay = bm.layout
    grid_q = bm.q_len  # query slots in the (possibly permuted) grid
    want = (bm.n_var - bm.q_len if lay is None else bm.n_var - Lq, bm.n_var)
    if H % Hkv:
        raise ValueError(f"q has {H} heads, k and v {Hkv}: the query heads must be a multiple "
                         "of the key/value heads (GQA)")
    if Dk != D or v.shape != k.shape or Bk != B:
        raise ValueError(f"shapes q {list(q.shape)} k {list(k.shape)} v {list(v.shape)} do not "
                         "agree: k and v need the same shape, and the batch and head dim of q")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v are {q.dtype}, {k.dtype}, {v.dtype}: they need one dtype, "
                         "float32, float16 or bfloat16")
    if D < 1 or D & (D - 1):
        raise ValueError(f"head dim {D} is not supported: the kernel needs a power of two")
    for name in ("block_m", "block_n"):
        b = getattr(bm.schedule, name)
        if b & (b - 1):
            raise ValueError(f"{name} {b} is not supported: the kernel needs a power of two")
    if (n - Lq, n) != want:
        raise ValueError(f"shapes q {list(q.shape)} k {list(k.shape)} v {list(v.shape)} do not "
                         f"fit the block mask (q_len {bm.q_len}, n {bm.n_var})")
    if lay is not None and lay.moves_queries() and Lq != n:
        raise ValueError("a diagonal layout needs all n queries")
    if bm.heads not in (1, H):
        raise ValueError(f"the block mask has {bm.heads} heads, q has {H}")
    if config is None and block_mask is None and side is None and not interpret and \
            _ws_by_default(q, k, v, bm):
        config = Config(4, 2, ws=1)
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    if config is not None and config.ws:
        return _ws_launch(q, k, v, bm, sm_scale, config, interpret, poison, block_mask, side)
    dev = q.device
    num_q_blocks = -(-grid_q // bm.schedule.block_m)
    if block_mask is not None:
        src, _, pos32 = _prepared(bm, False, dev)
        t = {name: block_mask[name].to(device=dev, dtype=torch.int32).contiguous()
             for name in _CSR_NAMES}
    else:
        src, t, pos32 = _prepared(bm, arithmetic, dev)
    if t is None:  # arithmetic ranges: the index-list arguments are never read
        dummy = _placeholder(dev)
        t = {name: dummy for name in _CSR_NAMES}
    elif t["kv_num_blocks"].shape[-1] != num_q_blocks or \
            t["kv_num_blocks"].shape[0] not in (1, H):
        raise ValueError(f"block mask index lists have shape {list(t['kv_num_blocks'].shape)}, "
                         f"need [{H} or 1, {num_q_blocks}]")
    # Index lists with one head serve every head (head stride 0).
    hs = {name: (x.stride(0) if x.shape[0] > 1 else 0) for name, x in t.items()}
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), device=dev, dtype=torch.float32)
    if poison:
        o.fill_(float("nan"))
        lse.fill_(float("nan"))
    if side is None:
        side = _placeholder(dev)
    side = side.to(device=dev, dtype=torch.int32).contiguous()
    s_side_h = side.stride(0) if side.shape[0] > 1 else 0
    if isinstance(bm, PlanMask):
        pat = torch.tensor(bm.head_variant, dtype=torch.int32, device=dev)
    else:
        pat = side  # never read by a single-pattern kernel
    upcast = bool(interpret and q.dtype != torch.float32)
    cfg = config or default_config(bm, D)
    if config is None and _tma_by_default(q, k, v, lay):
        cfg = replace(cfg, tma=1)
    kd, vd = k, v
    if cfg.tma:
        if lay is not None:
            raise ValueError("TMA loads need the natural layout (a layout gathers rows)")
        from triton.tools.tensor_descriptor import TensorDescriptor

        blk = [1, bm.schedule.block_n, D]
        kd = TensorDescriptor.from_tensor(k.view(B * Hkv, n, D), blk)
        vd = TensorDescriptor.from_tensor(v.view(B * Hkv, n, D), blk)
    qd, od = q, o
    if cfg.tma == 2:
        blk = [1, bm.schedule.block_m, D]
        qd = TensorDescriptor.from_tensor(q.view(B * H, Lq, D), blk)
        od = TensorDescriptor.from_tensor(o.view(B * H, Lq, D), blk)
    args = (
        qd, kd, vd, od, lse,
        t["kv_num_blocks"], t["kv_indices"], t["full_kv_num_blocks"], t["full_kv_indices"], side,
        pat,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1),
        hs["kv_num_blocks"], hs["kv_indices"], t["kv_indices"].stride(1),
        hs["full_kv_num_blocks"], hs["full_kv_indices"], t["full_kv_indices"].stride(1),
        s_side_h, side.stride(1),
        sm_scale, grid_q, bm.n, bm.n_var, bm.q_start, H, H // Hkv,
        n, lay.seg if lay else 1, lay.d if lay else 1, lay.block if lay else 1,
    )
    kwargs = dict(
        BLOCK_M=bm.schedule.block_m, BLOCK_N=bm.schedule.block_n, HEAD_DIM=D, UPCAST=upcast,
        IEEE=bool(q.dtype == torch.float32 or upcast), LAYOUT=_LAYOUT_CODE[lay and lay.kind],
        POS32=pos32, TMA=int(cfg.tma), ONE_LOOP=bool(cfg.one_loop), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return Launch(src, (num_q_blocks, B * H), args, kwargs, o, lse)


def _ws_launch(q, k, v, bm, sm_scale, cfg, interpret, poison, block_mask, side) -> Launch:
    """The launch of the warp-specialised Gluon kernel (codegen.hopper) for checked inputs."""
    from . import hopper

    if interpret:
        raise ValueError("the warp-specialised kernel is compiled Gluon: it does not run under "
                         "TRITON_INTERPRET")
    if block_mask is not None or side is not None:
        raise ValueError("the warp-specialised kernel computes its key-block ranges itself "
                         "(no index lists or side tensor)")
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] != 9:
        raise ValueError("the warp-specialised kernel uses Hopper's warpgroup MMA: sm_90 only")
    if cfg.num_warps != 4 or cfg.num_stages not in (2, 3) or cfg.ws not in (1, 2):
        raise ValueError(f"warp-specialised launch {cfg.label()}: it runs 4 warps per "
                         "consumer warpgroup (num_warps 4), 2 or 3 stages, ws 1 or 2")
    why = hopper.supported(bm, q.dtype, q.shape[-1])
    if why is not None:
        raise ValueError(f"the warp-specialised kernel does not run this launch: {why}")
    # Built once per block mask: the source, and the int32 proof (symbolic, a millisecond).
    cache = bm.__dict__.setdefault("_ws_source", {})
    if "src" not in cache:
        cache["src"] = hopper.kernel_source(bm)
        cache["pos32"] = fits_int32(bm)
    return hopper.launch_args(q, k, v, bm, sm_scale=sm_scale, stages=cfg.num_stages,
                              pingpong=cfg.ws == 2, pos32=cache["pos32"], src=cache["src"],
                              poison=poison)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMaskIR,
              sm_scale: float | None = None, poison: bool = False,
              arithmetic: bool | None = None,
              block_mask: dict[str, torch.Tensor] | None = None,
              side: torch.Tensor | None = None, config: Config | None = None) -> Output:
    """Sparse attention of q [B, H, Lq, D] over k, v [B, Hkv, n, D] with a block mask.

    Returns the output and the natural-log LSE ([B, H, Lq], -inf for rows that keep nothing).
    Under a layout transform q, k, v, the output and the LSE stay in the original order: the
    kernel loads and stores rows at their permuted positions.
    poison=True fills the outputs with NaN first (tests: every element must be written).
    block_mask: index lists computed elsewhere (dynamic patterns' builders), FlexAttention's
    layout without the batch dimension: kv_num_blocks [H|1, QB], kv_indices [H|1, QB, W],
    full_kv_num_blocks, full_kv_indices; they replace the block mask's own (index-list
    schedule), and the pattern's predicate is still applied in partial blocks.
    side: int32 [H|1, S, L], what dynamic selectors read in partial blocks (codegen.dynamic
    defines its layout).
    Compiled binaries go to Triton's cache inside attnc's cache (ATTNC_CACHE_DIR/triton), so
    another process with the same cache launches without compiling."""
    from .cache import triton_cache

    interpret = settings().triton_interpret
    if not interpret and q.device.type != "cuda":
        raise ValueError("the kernels run on a CUDA device (or on the CPU under "
                         "TRITON_INTERPRET=1); got tensors on " + str(q.device))
    L = launch_args(q, k, v, bm, sm_scale=sm_scale, arithmetic=arithmetic,
                    block_mask=block_mask, side=side, config=config, interpret=interpret,
                    poison=poison)
    fn = load_kernel(L.source, interpret)
    with triton_cache(interpret):
        fn[L.grid](*L.args, **L.kwargs)
    return Output(L.out, L.lse)


__all__ = ["Config", "Launch", "Output", "PlanMask", "attention", "default_config", "fits_int32",
           "heads_kernel", "kernel_source", "launch_args", "load_kernel", "plan_layer",
           "plan_source"]
