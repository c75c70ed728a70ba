"""Index builders on the device: last-rows column and diagonal scores, block scores, ranking."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _flags(x: torch.Tensor) -> tuple[bool, bool]:
    """(UPCAST, IEEE): the interpreter cannot do half-precision dots; float32 gets IEEE dots so
    near-ties rank as in float64 as far as float32 allows."""
    upcast = _interpret() and x.dtype != torch.float32
    return upcast, bool(x.dtype == torch.float32 or upcast)


# ---------------------------------------------------------------- last rows: LSE, cols, diagonals


@triton.jit
def _last_rows(Q, LQ, sq_h, sq_m, h, ROWS, Q_ABS0, BLOCK_R: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """The last rows of head h: row and dim offsets, which rows this head has (its own
    last_q), their absolute positions, and their queries."""
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, HEAD_DIM)
    lq = tl.load(LQ + h)
    row_ok = (r < ROWS) & (r >= ROWS - lq)
    q_abs = (Q_ABS0 + r).to(tl.int64)
    q = tl.load(Q + h * sq_h + r[:, None].to(tl.int64) * sq_m + d[None, :],
                mask=row_ok[:, None], other=0.0)
    return r, d, row_ok, q_abs, q


@triton.jit
def _rows_lse_kernel(Q, K, M_OUT, L_OUT, LQ, sq_h, sq_m, sk_h, sk_n, s_o_h, s_o_c,
                     N_CTX, Q_ABS0, ROWS, qk_scale, GROUP, CHUNK,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                     UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Partial (max, sum of exp2) per last row over one chunk of keys, causal (k <= q)."""
    h = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    hk = h // GROUP
    r, d, row_ok, q_abs, q = _last_rows(Q, LQ, sq_h, sq_m, h, ROWS, Q_ABS0, BLOCK_R, HEAD_DIM)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    k_lo = c * CHUNK
    k_hi = tl.minimum(k_lo + CHUNK, N_CTX)
    for k0 in range(k_lo, k_hi, BLOCK_N):
        kk = k0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = kk < k_hi
        k = tl.load(K + hk * sk_h + kk[:, None] * sk_n + d[None, :], mask=col_ok[:, None],
                    other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        ok = row_ok[:, None] & col_ok[None, :] & (kk[None, :] <= q_abs[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    tl.store(M_OUT + h * s_o_h + c * s_o_c + r, m_i)
    tl.store(L_OUT + h * s_o_h + c * s_o_c + r, l_i)


@triton.jit
def _lse_combine_kernel(M, LS, LSE2, s_h, s_c, CHUNKS, BLOCK_C: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    """Per head, the chunks' partial (max, sum of exp2) combined into each last row's log2
    sum of exp2 (+inf for a row with no key, so its probabilities are 0)."""
    h = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    ptr = h * s_h + c[:, None] * s_c + r[None, :]
    ok = (c < CHUNKS)[:, None]
    m = tl.load(M + ptr, mask=ok, other=float("-inf"))
    ls = tl.load(LS + ptr, mask=ok, other=0.0)
    mx = tl.max(m, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    tot = tl.sum(ls * tl.exp2(m - mx_safe[None, :]), 0)
    lse2 = tl.where(tot > 0, mx_safe + tl.log2(tl.maximum(tot, 1e-38)), float("inf"))
    tl.store(LSE2 + h * BLOCK_R + r, lse2)


@triton.jit
def _rows_probs_kernel(Q, K, LSE2, LQ, P, COL, sq_h, sq_m, sk_h, sk_n, s_p_h, s_p_r,
                       N_CTX, Q_ABS0, ROWS, qk_scale, GROUP,
                       BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                       UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Causal softmax probabilities of the last rows for one key tile: stored in P, and summed
    per key column (the same reduction for every column, so equal columns give equal sums)."""
    h = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1).to(tl.int64)
    hk = h // GROUP
    r, d, row_ok, q_abs, q = _last_rows(Q, LQ, sq_h, sq_m, h, ROWS, Q_ABS0, BLOCK_R, HEAD_DIM)
    lse2 = tl.load(LSE2 + h * BLOCK_R + r)
    kk = kb * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = kk < N_CTX
    k = tl.load(K + hk * sk_h + kk[:, None] * sk_n + d[None, :], mask=col_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, tl.trans(k)) * qk_scale
    ok = row_ok[:, None] & col_ok[None, :] & (kk[None, :] <= q_abs[:, None])
    p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
    tl.store(P + h * s_p_h + r[:, None].to(tl.int64) * s_p_r + kk[None, :], p,
             mask=col_ok[None, :])
    tl.store(COL + h * N_CTX + kk, tl.sum(p, 0), mask=col_ok)


@triton.jit
def _diag_sums_kernel(P, DIAG, s_p_h, s_p_r, N_CTX, Q_ABS0, ROWS,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per diagonal offset dd = q - k: the sum over the last rows of P[r, q_r - dd] (the same
    reduction for every offset)."""
    h = tl.program_id(0).to(tl.int64)
    db = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    dd = db * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    kk = (Q_ABS0 + r).to(tl.int64)[:, None] - dd[None, :]
    ok = (r < ROWS)[:, None] & (kk >= 0) & (dd < N_CTX)[None, :]
    p = tl.load(P + h * s_p_h + r[:, None].to(tl.int64) * s_p_r + tl.where(ok, kk, 0), mask=ok,
                other=0.0)
    tl.store(DIAG + h * N_CTX + dd, tl.sum(p, 0), mask=dd < N_CTX)


def last_rows_scores(q: torch.Tensor, k: torch.Tensor, last_q: torch.Tensor, q_start: int,
                     sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal scores of top_columns / top_diagonals for one batch element.

    q [H, Lq, D], k [Hkv, n, D]; last_q [H] int (rows per head, clamped to Lq). Per head, the
    last last_q query rows are softmaxed over their causal keys; returns (column sums [H, n],
    diagonal sums [H, n] by offset q - k), float32."""
    H, Lq, D = q.shape
    Hkv, n, _ = k.shape
    lq = last_q.to(dtype=torch.int32).clamp(0, Lq).contiguous()
    rows = int(lq.max().item()) if H else 0  # free for a host last_q (the builders pass one)
    lq = to_device(lq, q.device)
    if rows == 0 or n == 0:
        z = torch.zeros(H, n, device=q.device, dtype=torch.float32)
        return z, z.clone()
    # Every entry is written below: the probabilities kernel writes each column's sum, the
    # diagonal kernel each offset's.
    col = torch.empty(H, n, device=q.device, dtype=torch.float32)
    diag = torch.empty(H, n, device=q.device, dtype=torch.float32)
    BR = max(16, triton.next_power_of_2(rows))
    qr = q[:, Lq - rows:, :]
    if qr.stride(-1) != 1:
        qr = qr.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_abs0 = q_start + Lq - rows
    upcast, ieee = _flags(q)
    scale2 = sm_scale * LOG2E
    BN = 64 if _interpret() else 128
    chunks = max(1, min(triton.cdiv(n, BN), 64 if not _interpret() else 4))
    chunk = triton.cdiv(triton.cdiv(n, chunks), BN) * BN
    chunks = triton.cdiv(n, chunk)
    m = torch.empty(H, chunks, BR, device=q.device, dtype=torch.float32)
    ls = torch.empty_like(m)
    group = H // Hkv
    _rows_lse_kernel[(H, chunks)](
        qr, k, m, ls, lq, qr.stride(0), qr.stride(1), k.stride(0), k.stride(1), m.stride(0),
        m.stride(1), n, q_abs0, rows, scale2, group, chunk,
        BLOCK_R=BR, BLOCK_N=BN, HEAD_DIM=D, UPCAST=upcast, IEEE=ieee)
    lse2 = torch.empty(H, BR, device=q.device, dtype=torch.float32)
    _lse_combine_kernel[(H,)](m, ls, lse2, m.stride(0), m.stride(1), chunks,
                              BLOCK_C=triton.next_power_of_2(chunks), BLOCK_R=BR)
    p = torch.empty(H, BR, n, device=q.device, dtype=torch.float32)
    _rows_probs_kernel[(H, triton.cdiv(n, BN))](
        qr, k, lse2, lq, p, col, qr.stride(0), qr.stride(1), k.stride(0), k.stride(1),
        p.stride(0), p.stride(1), n, q_abs0, rows, scale2, group,
        BLOCK_R=BR, BLOCK_N=BN, HEAD_DIM=D, UPCAST=upcast, IEEE=ieee)
    BD = 64 if _interpret() else 256
    _diag_sums_kernel[(H, triton.cdiv(n, BD))](
        p, diag, p.stride(0), p.stride(1), n, q_abs0, rows, BLOCK_R=BR, BLOCK_D=BD)
    return col, diag


# ---------------------------------------------------------------- pooled block scores


@triton.jit
def _pool_kernel(X, OUT, s_x_h, s_x_m, s_o_h, s_o_b, X_ABS0, X_LEN, BLOCK,
                 ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Mean over the rows of one absolute block (positions j*BLOCK .. j*BLOCK+BLOCK-1 that
    exist: X holds positions X_ABS0 .. X_ABS0 + X_LEN - 1), float32."""
    h = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    lo = tl.maximum(j * BLOCK, X_ABS0)
    hi = tl.minimum(j * BLOCK + BLOCK, X_ABS0 + X_LEN)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for r0 in range(lo, hi, ROWS):
        rr = r0 + tl.arange(0, ROWS).to(tl.int64)
        ok = rr < hi
        x = tl.load(X + h * s_x_h + (rr - X_ABS0)[:, None] * s_x_m + d[None, :],
                    mask=ok[:, None], other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    cnt = tl.maximum(hi - lo, 1).to(tl.float32)
    tl.store(OUT + h * s_o_h + j * s_o_b + d, acc / cnt)


@triton.jit
def _rank_key(s, idx):
    """rank_keys in Triton: float32 scores to int64 keys (order-preserving float bits in the
    high word, the complement of the index in the low word: ties to the lower index), with
    -0.0 ranked as 0.0."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
    return key * 4294967296 + (4294967295 - idx.to(tl.int64))


@triton.jit
def _block_keys_kernel(QM, KM, OUT, QB_ABS, Q_LAST, s_q_h, s_q_b, s_k_h, s_o_h, s_o_m, NBQ, NBK,
                       BLOCK, sm_scale, GROUP, CAUSAL: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, HEAD_DIM: tl.constexpr,
                       DK: tl.constexpr):
    """Mean block scores QM . KM * scale as rankable int64 keys: the float32 bits (order
    preserving) in the high word, the complement of the key block in the low word (ties: lower
    block first); ineligible blocks score -inf."""
    h = tl.program_id(0).to(tl.int64)
    hk = h // GROUP
    i = tl.program_id(1) * BM + tl.arange(0, BM)
    j = tl.program_id(2) * BN + tl.arange(0, BN)
    # The float32 product a slice of the head dim at a time: whole 64 x 128 float32 tiles do
    # not fit the registers of one program, and their spills made this kernel 60% of block
    # top-k's time at 128k (H200, measured).
    s = tl.zeros([BM, BN], tl.float32)
    for d0 in tl.static_range(0, HEAD_DIM, DK):
        d = d0 + tl.arange(0, DK)
        qm = tl.load(QM + h * s_q_h + (QB_ABS + i)[:, None].to(tl.int64) * s_q_b + d[None, :],
                     mask=(i < NBQ)[:, None], other=0.0)
        km = tl.load(KM + hk * s_k_h + j[:, None].to(tl.int64) * s_q_b + d[None, :],
                     mask=(j < NBK)[:, None], other=0.0)
        s += tl.dot(qm, tl.trans(km), input_precision="ieee")
    s = s * sm_scale
    if CAUSAL:
        last = tl.minimum((QB_ABS + i).to(tl.int64) * BLOCK + BLOCK - 1, Q_LAST)
        el = j[None, :].to(tl.int64) * BLOCK <= last[:, None]
        s = tl.where(el, s, float("-inf"))
    packed = _rank_key(s, j[None, :])
    ok = (i < NBQ)[:, None] & (j < NBK)[None, :]
    tl.store(OUT + h * s_o_h + i[:, None].to(tl.int64) * s_o_m + j[None, :], packed, mask=ok)


def pool_blocks(x: torch.Tensor, x_abs0: int, block: int, num_blocks: int) -> torch.Tensor:
    """x [H, L, D] holding absolute positions x_abs0.. ; mean per absolute block [H, nb, D]."""
    H, L, D = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.zeros(H, num_blocks, D, device=x.device, dtype=torch.float32)
    rows = 16 if _interpret() else 64
    _pool_kernel[(H, num_blocks)](x, out, x.stride(0), x.stride(1), out.stride(0),
                                  out.stride(1), x_abs0, L, block, ROWS=rows, HEAD_DIM=D)
    return out


def block_keys(q: torch.Tensor, k: torch.Tensor, q_start: int, block: int, causal: bool,
               sm_scale: float) -> tuple[torch.Tensor, int]:
    """Rankable keys [H, NBQ, NBK] of top_blocks for the query blocks holding evaluated queries
    (absolute blocks qb0 .. qb0 + NBQ - 1), and qb0."""
    H, Lq, D = q.shape
    Hkv, n, _ = k.shape
    nb = -(-n // block)
    qb0 = q_start // block
    nbq = nb - qb0
    qm = pool_blocks(q, q_start, block, nb)
    km = pool_blocks(k, 0, block, nb)
    out = torch.empty(H, nbq, nb, device=q.device, dtype=torch.int64)
    BM = BN = 32 if _interpret() else 64
    grid = (H, triton.cdiv(nbq, BM), triton.cdiv(nb, BN))
    _block_keys_kernel[grid](qm, km, out, qb0, q_start + Lq - 1, qm.stride(0), qm.stride(1),
                             km.stride(0), out.stride(0), out.stride(1), nbq, nb, block,
                             sm_scale, H // Hkv, CAUSAL=causal, BM=BM, BN=BN, HEAD_DIM=D,
                             DK=min(D, 32), num_warps=8 if not _interpret() else 4)
    return out, qb0


# ---------------------------------------------------------------- ranking


def rank_keys(score: torch.Tensor) -> torch.Tensor:
    """Float scores to int64 keys with the reference's order: larger score first, ties to the
    lower index (last dim); +inf ranks first, -0.0 equals 0.0."""
    s = score.to(torch.float32) + 0.0
    bits = s.view(torch.int32).to(torch.int64)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    idx = torch.arange(s.shape[-1], device=s.device, dtype=torch.int64)
    return key * 4294967296 + (4294967295 - idx)


@triton.jit
def _forced_keys_kernel(S, KEEP, OUT_S, OUT_K, N, BLOCK: tl.constexpr):
    """rank_keys of the scores [H, N] with each head's first KEEP[h] entries forced to +inf
    (top_columns' keep_first, top_diagonals' keep_near); the forced scores are stored too."""
    h = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    keep = tl.load(KEEP + h)
    s = tl.load(S + h * N + i, mask=ok, other=0.0)
    s = tl.where(i < keep, float("inf"), s)
    tl.store(OUT_S + h * N + i, s, mask=ok)
    tl.store(OUT_K + h * N + i, _rank_key(s, i), mask=ok)


def forced_keys(score: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(forced scores, rank keys) for float32 scores [H, n] whose first keep[h] entries (a
    host tensor) rank first: one launch for what is otherwise a dozen elementwise ops."""
    H, n = score.shape
    score = score.to(torch.float32).contiguous()
    keep = to_device(keep.to(torch.int64).clamp(min=0), score.device)
    out_s = torch.empty_like(score)
    out_k = torch.empty(H, n, dtype=torch.int64, device=score.device)
    if H and n:
        BLOCK = 1024
        _forced_keys_kernel[(H, triton.cdiv(n, BLOCK))](score, keep, out_s, out_k, n,
                                                         BLOCK=BLOCK)
    return out_s, out_k


_ON_DEVICE: dict[tuple, torch.Tensor] = {}


# Host sources and device copies that captured CUDA graphs read at every replay (a few small
# tensors per capture, kept for the life of the process).
_CAPTURED_SOURCES: list[torch.Tensor] = []


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor on the device without waiting for the device's queue (pinned
    staging, asynchronous copy). Per-head parameters repeat from call to call: small ones are
    copied once per device and reused (callers never write to them)."""
    dev = torch.device(device)
    if x.device.type != "cpu" or dev.type != "cuda":
        return x.to(dev)
    capturing = torch.cuda.is_current_stream_capturing()
    if x.numel() > 256 and not capturing:
        return x.pin_memory().to(dev, non_blocking=True)
    key = (str(dev), x.dtype, tuple(x.shape), tuple(x.reshape(-1).tolist()))
    if key not in _ON_DEVICE:
        if len(_ON_DEVICE) > 4096 and not capturing:
            _ON_DEVICE.clear()
        pinned = x.pin_memory()
        _ON_DEVICE[key] = pinned.to(dev, non_blocking=True)
        if capturing:  # every replay copies from this host buffer again
            _CAPTURED_SOURCES.append(pinned)
    if capturing:  # every replay reads this device tensor: clearing the cache must not free it
        _CAPTURED_SOURCES.append(_ON_DEVICE[key])
    return _ON_DEVICE[key]


def keep_top(keys: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Boolean [..., m]: per row the `count` (per leading row, broadcast) largest keys. A host
    `count` (the builders pass one) costs no wait for the device."""
    m = keys.shape[-1]
    count = count.to(torch.int64).clamp(0, m)
    kmax = int(count.max().item()) if count.numel() else 0
    # When every row keeps kmax, the order of the top kmax does not matter: unsorted topk
    # skips sorting them (on CUDA the sorted variant waited for the device, measured).
    uniform = bool((count == kmax).all())
    count = to_device(count, keys.device)
    out = torch.zeros(keys.shape, device=keys.device, dtype=torch.bool)
    if kmax == 0 or m == 0:
        return out
    top = torch.topk(keys, kmax, dim=-1, sorted=not uniform).indices
    if uniform:
        return out.scatter_(-1, top, True)
    rank_ok = torch.arange(kmax, device=keys.device) < count.reshape(
        *count.shape, *([1] * (keys.dim() - count.dim())))
    out.scatter_(-1, top, rank_ok.expand(top.shape))
    return out


# ---------------------------------------------------------------- the learned gate's pooling


@triton.jit
def _gate_pool_kernel(X, INV, OUT, sx_h, sx_l, so_h, so_b, L, START, B0, R, BLOCK, HF,
                      BP: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, UNROT: tl.constexpr):
    # One block and HP heads per program: the block's rows of x, the model's RoPE undone (pair
    # (d, d + R) turned back by its position's angle), then average / max / min over the
    # positions present. The angles depend on the position only, so their sines and cosines
    # (accurate ones: angles reach n radians) are computed once for all HP heads.
    blk = B0 + tl.program_id(0)
    h0 = tl.program_id(1).to(tl.int64) * HP
    i = tl.arange(0, BP)
    pos = blk.to(tl.int64) * BLOCK + i
    rows = pos - START
    ok = (i < BLOCK) & (rows >= 0) & (rows < L)
    d = tl.arange(0, D)
    first = d < R
    rot = d < 2 * R
    partner = tl.where(first, d + R, tl.where(rot, d - R, d))
    if UNROT:
        f = tl.load(INV + tl.where(first, d, d - R), mask=rot, other=0.0)
        # float32 position times float32 frequency: the angle transformers computes.
        ang = pos.to(tl.float32)[:, None] * f[None, :]
        c = tl.cos(ang)
        s = tl.sin(ang) * tl.where(first, 1.0, -1.0)[None, :]
    cnt = tl.sum(ok.to(tl.float32), axis=0)
    some = cnt > 0
    for j in range(HP):
        h = h0 + j
        # [D] all true for a real head: a tensor mask (the interpreter's bool tensor & bool
        # scalar gives integers, which loads refuse).
        hm = d < tl.where(h < HF, D, 0)
        base = X + h * sx_h + rows[:, None] * sx_l
        m2 = ok[:, None] & hm[None, :]
        x = tl.load(base + d[None, :], mask=m2, other=0.0).to(tl.float32)
        if UNROT:
            xp = tl.load(base + partner[None, :], mask=m2, other=0.0).to(tl.float32)
            x = tl.where(rot[None, :], x * c + xp * s, x)
        avg = tl.sum(tl.where(ok[:, None], x, 0.0), axis=0) / tl.maximum(cnt, 1.0)
        mx = tl.max(tl.where(ok[:, None], x, float("-inf")), axis=0)
        mn = tl.min(tl.where(ok[:, None], x, float("inf")), axis=0)
        out = OUT + h * so_h + blk.to(tl.int64) * so_b + d
        tl.store(out, tl.where(some, avg, 0.0), mask=hm)
        tl.store(out + D, tl.where(some, mx, 0.0), mask=hm)
        tl.store(out + 2 * D, tl.where(some, mn, 0.0), mask=hm)


def gate_pool(x: torch.Tensor, block: int, *, start: int = 0, nb: int | None = None,
              inv_freq: torch.Tensor | None = None,
              heads_per_program: int | None = None) -> torch.Tensor:
    """codegen.gate.gate_features in one pass over x [..., L, D] (D a power of two): the
    model's rotary embedding undone when `inv_freq` is given, then average / max / min pooled
    over absolute blocks: [..., nb, 3 D] float32. The torch version makes about ten full-size
    float32 temporaries; this reads x once (twice with the rotation's partner loads)."""
    *lead, L, D = x.shape
    nb = -(-(start + L) // block) if nb is None else nb
    if (start + L) > nb * block:
        raise ValueError(f"{nb} blocks of {block} do not hold positions {start}..{start + L - 1}")
    x3 = x.reshape(-1, L, D)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    Hf = x3.shape[0]
    out = torch.zeros(Hf, nb, 3 * D, dtype=torch.float32, device=x.device)
    b0 = start // block
    R = 0 if inv_freq is None else inv_freq.numel()
    inv = (inv_freq if inv_freq is not None else torch.zeros(1)).to(
        device=x.device, dtype=torch.float32).contiguous()
    if nb > b0 and Hf:
        # Heads per program: enough programs to fill the GPU (about 1024), the rest of the
        # heads share each program's sines and cosines.
        hp = heads_per_program or (
            1 if inv_freq is None else max(1, min(16, (Hf * (nb - b0)) // 1024, Hf)))
        hp = 1 << (hp.bit_length() - 1)
        _gate_pool_kernel[(nb - b0, triton.cdiv(Hf, hp))](
            x3, inv, out, x3.stride(0), x3.stride(1), out.stride(0), out.stride(1), L, start,
            b0, R, block, Hf, BP=triton.next_power_of_2(block), D=D, HP=hp,
            UNROT=inv_freq is not None, num_warps=4)
    return out.reshape(*lead, nb, 3 * D)


__all__ = ["block_keys", "forced_keys", "gate_pool", "keep_top", "last_rows_scores",
           "pool_blocks", "rank_keys", "to_device"]
