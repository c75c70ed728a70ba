"""Warp-specialised Hopper kernels in Gluon: a TMA producer warp and two consumer warpgroups.

FlashAttention-3's schedule for the arithmetic-range patterns: one warp issues the TMA copies
of Q and of each key block's K and V into a ring of shared-memory stages (mbarriers say when a
stage is full and when both consumers are done with it); each consumer warpgroup owns 64 of
the program's 128 query rows and issues the next block's Q K^T before the softmax of the
current one, whose P V runs on the tensor cores meanwhile (intra-warpgroup overlap). The
two warpgroups can also take turns issuing their products (`pingpong`). The softmax, the
pattern's predicate and bias hooks and the range arithmetic are the Triton skeleton's
(codegen.kernel), printed for Gluon; full and partial key blocks share one loop, the mask
applied under a scalar branch. Triton 3.6 or newer on sm_90 only (Gluon is compiled, never
interpreted): codegen.kernel routes a launch here when its Config asks for `ws`.
"""

from __future__ import annotations

import torch
from attnc.compiler.blockmask import BlockMaskIR
from attnc.compiler.rules import rewrite

from .expr import INT_HELPERS, print_expr

HEADER = '''import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

# The predicate and range printers write tl.* calls; Gluon has each of those names.
tl = gl
# TMA copies: async_load / async_store since Triton 3.7, the older names before.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
'''

BODY = '''

@gluon.jit
def attnc_ranges(pid_m, h, Q_START, Q_LEN, N_CTX, N_VAR, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr):
    # The program's key-block segments: (first blocks, offsets of each segment in the step
    # count, number of full steps, total steps). Every partition computes the same.
    n_var = N_VAR.to(gl.int64)
{ranges}
    # Step counts in int32: stage indices must be.
    return ({starts}), ({offsets}), {n_full}.to(gl.int32), {total}.to(gl.int32)


@gluon.jit
def attnc_kb(t, starts, offsets):
    # Key block of step t: the start of the last segment whose offset t has reached, plus
    # the segment's step times the rest.
{kb}
    return kb


@gluon.jit
def attnc_scores(s, part, kb, q_pos, h, n_var, qk_scale, N_CTX, BLOCK_N: gl.constexpr,
                 POS32: gl.constexpr, cols: gl.constexpr):
    # The pattern's hooks on a [64, BLOCK_N] tile of raw scores: bias (then the scores come
    # back scaled) and, in partial blocks, the predicate and the key bound.
    LOG2E: gl.constexpr = 1.4426950408889634
    offs_n = kb * BLOCK_N + gl.arange(0, BLOCK_N, layout=cols).to(gl.int64)
{bias}
    # Bound outside the runtime branch: a branch must not change a variable's type.
    if POS32:
        k_pos = offs_n.to(gl.int32)[None, :]
    else:
        k_pos = offs_n[None, :]
    if part:
        s = gl.where((offs_n < N_CTX)[None, :] & ({mask}), s, float("-inf"))
    return s


@gluon.jit
def attnc_producer(args, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                   POS32: gl.constexpr):
    (q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty,
     v_ready, v_empty, turn, LSE, pid_m, bh, kv_row, Q_LEN, Q_START, N_CTX, N_VAR, h, hp,
     qk_scale) = args
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    BM: gl.constexpr = q_desc.block_type.shape[1]
    starts, offsets, n_full, total = attnc_ranges(pid_m, h, Q_START, Q_LEN, N_CTX, N_VAR,
                                                  2 * BM, BLOCK_N)
    # Q rows past Q_LEN come back as zeros (the descriptor is [B * H, Q_LEN, D]).
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [bh, pid_m * 2 * BM, 0], q_bar, q_smem.index(0))
    _tma_load(q_desc, [bh, pid_m * 2 * BM + BM, 0], q_bar, q_smem.index(1))
    for t in range(0, total):
        st = t % STAGES
        ph = (t // STAGES) & 1
        kb = attnc_kb(t, starts, offsets)
        row = (kb * BLOCK_N).to(gl.int32)
        mbarrier.wait(k_empty.index(st), ph ^ 1)
        mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
        _tma_load(k_desc, [kv_row, row, 0], k_ready.index(st), k_smem.index(st))
        mbarrier.wait(v_empty.index(st), ph ^ 1)
        mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
        _tma_load(v_desc, [kv_row, row, 0], v_ready.index(st), v_smem.index(st))


@gluon.jit
def attnc_consumer(args, c: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                   POS32: gl.constexpr):
    (q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty,
     v_ready, v_empty, turn, LSE, pid_m, bh, kv_row, Q_LEN, Q_START, N_CTX, N_VAR, h, hp,
     qk_scale) = args
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    BM: gl.constexpr = q_desc.block_type.shape[1]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[2]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    LOG2E: gl.constexpr = 1.4426950408889634
    starts, offsets, n_full, total = attnc_ranges(pid_m, h, Q_START, Q_LEN, N_CTX, N_VAR,
                                                  2 * BM, BLOCK_N)
    r0 = pid_m * 2 * BM + c * BM
    offs_m = r0 + gl.arange(0, BM, layout=rows_s)
    if POS32:
        q_pos = (Q_START + offs_m).to(gl.int32)[:, None]
        n_var = N_VAR.to(gl.int32)
    else:
        q_pos = (Q_START + offs_m).to(gl.int64)[:, None]
        n_var = N_VAR.to(gl.int64)
    if BIASED:
        sc = qk_scale * 0.0 + 1.0
    else:
        sc = qk_scale
    q = q_smem.index(c).reshape([BM, HEAD_DIM])
    m_i = gl.full([BM], float("-inf"), gl.float32, rows_s)
    l_i = gl.full([BM], 0.0, gl.float32, rows_s)
    acc = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
    zero_s = gl.zeros([BM, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    if total > 0:
        # Step 0: its product, then its softmax (nothing to overlap yet).
        if PINGPONG:
            mbarrier.wait(turn.index(c), 0)
        mbarrier.wait(k_ready.index(0), 0)
        kt = k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s_tok = warpgroup_mma(q, kt, zero_s, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - c), count=1)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(0), count=1)
        kb = attnc_kb(0, starts, offsets)
        s = attnc_scores(s, 0 >= n_full, kb, q_pos, hp, n_var, qk_scale, N_CTX, BLOCK_N,
                         POS32, cols_s)
        m_new = gl.maximum(m_i, gl.max(s, 1) * sc)
        # Rows that kept nothing yet (m = -inf) need a finite shift for exp2.
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * sc - m_safe[:, None])
        l_i = gl.sum(p, 1)
        m_i = m_new
        pd = gl.convert_layout(p.to(q_desc.dtype), p_layout)
        for t in range(1, total):
            st = t % STAGES
            ph = (t // STAGES) & 1
            pst = (t - 1) % STAGES
            pph = ((t - 1) // STAGES) & 1
            if PINGPONG:
                mbarrier.wait(turn.index(c), t & 1)
            # Q K^T of step t, then P V of step t - 1: the softmax below overlaps the latter.
            mbarrier.wait(k_ready.index(st), ph)
            kt = k_smem.index(st).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
            s_tok = warpgroup_mma(q, kt, zero_s, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(pst), pph)
            vt = v_smem.index(pst).reshape([BLOCK_N, HEAD_DIM])
            acc_tok = warpgroup_mma(pd, vt, acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - c), count=1)
            s = warpgroup_mma_wait(1, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(st), count=1)
            kb = attnc_kb(t, starts, offsets)
            s = attnc_scores(s, t >= n_full, kb, q_pos, hp, n_var, qk_scale, N_CTX, BLOCK_N,
                             POS32, cols_s)
            m_new = gl.maximum(m_i, gl.max(s, 1) * sc)
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_safe)
            p = gl.exp2(s * sc - m_safe[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            # P of step t - 1 stays alive (its registers feed the product) until the wait.
            acc, pd = warpgroup_mma_wait(0, deps=(acc_tok, pd))
            mbarrier.arrive(v_empty.index(pst), count=1)
            acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
            pd = gl.convert_layout(p.to(q_desc.dtype), p_layout)
        lt = total - 1
        mbarrier.wait(v_ready.index(lt % STAGES), (lt // STAGES) & 1)
        vt = v_smem.index(lt % STAGES).reshape([BLOCK_N, HEAD_DIM])
        acc_tok = warpgroup_mma(pd, vt, acc, is_async=True)
        acc, pd = warpgroup_mma_wait(0, deps=(acc_tok, pd))
        mbarrier.arrive(v_empty.index(lt % STAGES), count=1)
    empty = l_i == 0.0
    out = acc / gl.convert_layout(gl.where(empty, 1.0, l_i), rows_o)[:, None]
    out = gl.where(gl.convert_layout(empty, rows_o)[:, None], 0.0, out)
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(gl.where(empty, 1.0, l_i))) / LOG2E)
    # The output leaves through this warpgroup's Q stage (its last product has finished);
    # the descriptor drops rows past Q_LEN.
    o_smem = q_smem.index(c)
    o_smem.reshape([BM, HEAD_DIM]).store(out.to(o_desc.dtype))
    fence_async_shared()
    _tma_store(o_desc, [bh, r0, 0], o_smem)
    gl.store(LSE + bh.to(gl.int64) * Q_LEN + offs_m, lse, mask=offs_m < Q_LEN)
    tma.store_wait(0)


@gluon.jit
def attnc_consumer0(args, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                    POS32: gl.constexpr):
    attnc_consumer(args, 0, STAGES, PINGPONG, POS32)


@gluon.jit
def attnc_consumer1(args, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                    POS32: gl.constexpr):
    attnc_consumer(args, 1, STAGES, PINGPONG, POS32)


@gluon.jit
def attnc_fwd(q_desc, k_desc, v_desc, o_desc, LSE, sm_scale, Q_LEN, N_CTX, N_VAR, Q_START, H,
              GROUP, STAGES: gl.constexpr, PINGPONG: gl.constexpr, POS32: gl.constexpr,
              num_warps: gl.constexpr):
    # Program (query block of 128 rows, batch x head); last query blocks first, as in the
    # Triton skeleton (causal-like masks give them the most keys).
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    BM: gl.constexpr = q_desc.block_type.shape[1]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[2]
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = (bh % H).to(gl.int64)
    kv_row = b * (H // GROUP) + (bh % H) // GROUP
    if POS32:
        hp = h.to(gl.int32)
    else:
        hp = h
    qk_scale = sm_scale * 1.4426950408889634
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, 1, BM, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, 1, BLOCK_N, HEAD_DIM],
                                       k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, 1, BLOCK_N, HEAD_DIM],
                                       v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        # Both consumer warpgroups release a stage.
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    # Warpgroup 0 takes the first turn.
    mbarrier.arrive(turn.index(0), count=1)
    args = (q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty,
            v_ready, v_empty, turn, LSE, pid_m, bh, kv_row, Q_LEN, Q_START, N_CTX, N_VAR, h,
            hp, qk_scale)
    # Constexprs travel as arguments of their own, written out in each tuple (inside a tuple
    # variable or the shared tuple they would become tensors).
    gl.warp_specialize([(attnc_consumer0, (args, STAGES, PINGPONG, POS32)),
                        (attnc_consumer1, (args, STAGES, PINGPONG, POS32)),
                        (attnc_producer, (args, STAGES, PINGPONG, POS32))], [4, 1], [232, 40])
    # Registers per thread: 232 for each consumer warpgroup (the default partition gets what
    # maxnreg=168 x 12 warps leaves), 40 for the producer: with 24 it spilled its segment
    # table in the step loop (shards), with 224 / 56 the consumers spilled (sm_90 SASS).
'''

_NAMES = {"q": "q_pos", "k": "k_pos", "h": "h", "n": "n_var"}


def _prelude() -> str:
    """The expression helpers (floor division, modulo, floor log2) as Gluon functions; the
    online-softmax helper is the Triton skeleton's only."""
    # Gluon tensors carry layouts: a constant tile comes from an existing one.
    src = INT_HELPERS.replace("one = tl.full(r.shape, 1, tl.int64)", "one = r * 0 + 1")
    return src.replace("@triton.jit", "@gluon.jit")


def supported(bm: BlockMaskIR, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when the warp-specialised kernel runs this launch, else why not (one line)."""
    import triton

    from .kernel import PlanMask

    # Gluon's Hopper API changed until 3.6 (pyproject allows older Tritons); 3.6 and 3.9 are
    # the versions this kernel was built and run with.
    major, minor = (int("".join(c for c in x if c.isdigit()) or 0)
                    for x in triton.__version__.split(".")[:2])
    if (major, minor) < (3, 6):
        return f"it needs Triton 3.6 or newer (Gluon's Hopper API), not {triton.__version__}"
    try:
        import triton.experimental.gluon.language.nvidia.hopper  # noqa: F401
    except ImportError:
        return "this Triton has no Gluon for Hopper"
    if isinstance(bm, PlanMask):
        return "plans (one kernel for several patterns) run on the Triton skeleton"
    if dtype not in (torch.float16, torch.bfloat16):
        return "it takes float16 and bfloat16 inputs"
    if head_dim not in (64, 128):
        return "it takes head dims 64 and 128"
    if bm.schedule.block_m != 128 or bm.schedule.block_n not in (64, 128):
        return "it needs 128-row query blocks and 64- or 128-key blocks"
    return schedule_reason(bm)


def schedule_reason(bm: BlockMaskIR) -> str | None:
    """Why the block mask's key-block schedule does not fit the kernel (None: it does), worked
    out once per block mask: deriving the ranges of a head-dependent pattern is symbolic work
    of milliseconds, which a per-launch check would add to every call (it made shards look
    2-4x slower than it runs)."""
    from .kernel import arith_ranges, arithmetic_rules

    memo = bm.__dict__.setdefault("_ws_schedule", {})
    if "why" not in memo:
        rules = arithmetic_rules(bm)
        if rules is None:
            why = "it needs key-block ranges computed in the kernel (no index lists or layouts)"
        elif arith_ranges(rules, bm.schedule.block_n)[3]:
            why = "strided pieces wider than a key block need nested loops"
        else:
            why = None
        memo["why"] = why
    return memo["why"]


def kernel_source(bm: BlockMaskIR, source: str = "") -> str:
    """Deterministic Gluon source for a block mask the warp-specialised kernel supports."""
    from .kernel import _version, arith_ranges, arithmetic_rules

    why = supported(bm, torch.bfloat16, 128)
    if why is not None:
        raise ValueError(f"the warp-specialised kernel does not run {bm.pattern.name}: {why}")
    rules = arithmetic_rules(bm)
    lines, full, part, _ = arith_ranges(rules, bm.schedule.block_n)
    segs = full + part
    offs = ["o0 = tl.zeros([], tl.int64)"]
    for j, (_, cnt, _) in enumerate(segs):
        offs.append(f"o{j + 1} = o{j} + tl.maximum({cnt}, 0)")
    ranges = "\n".join(lines + [f"    {x}" for x in offs])
    # Block indices and step counts in int32 (n < 2**31): half the registers of int64 (the
    # producer warp holds every segment's start and offset in its 40).
    starts = "".join(f"({a}).to(gl.int32), " for a, _, _ in segs)
    offsets = "".join(f"o{j}.to(gl.int32), " for j in range(1, len(segs)))
    kb = []
    unpack_s = ", ".join(f"a{j}" for j in range(len(segs))) + ("," if len(segs) == 1 else "")
    kb.append(f"    {unpack_s} = starts")
    if len(segs) > 1:
        unpack_o = ", ".join(f"o{j}" for j in range(1, len(segs))) + \
            ("," if len(segs) == 2 else "")
        kb.append(f"    {unpack_o} = offsets")

    def at(j: int, t: str) -> str:
        step = segs[j][2]
        return f"a{j} + {t}" if step == 1 else f"a{j} + ({t}) * {step}"

    kb.append(f"    kb = {at(0, 't')}")
    for j in range(1, len(segs)):
        kb.append(f"    kb = tl.where(t >= o{j}, {at(j, f't - o{j}')}, kb)")
    mask_src = print_expr(rewrite(bm.pattern.mask), _NAMES)
    if bm.pattern.bias is not None:
        bias_src = (f"    k_pos = offs_n[None, :]\n"
                    f"    s = s * qk_scale + ({print_expr(rewrite(bm.pattern.bias), _NAMES)})"
                    " * LOG2E")
        biased = True
    else:
        bias_src = ""
        biased = False
    header = (f'"""attnc generated kernel (Gluon, warp-specialised, sm_90). pattern: '
              f'{bm.pattern.name}; key {bm.pattern.key}; schedule: arithmetic ranges\n\n'
              f'attnc {_version()}; source: {source or "(not recorded)"}\n'
              f'{bm.schedule.text()}\n"""\n')
    body = BODY.format(ranges=ranges, starts=starts, offsets=offsets,
                       n_full=f"o{len(full)}", total=f"o{len(segs)}", kb="\n".join(kb),
                       bias=bias_src, mask=mask_src)
    out = header + HEADER + f"BIASED = gl.constexpr({biased})\n" + _prelude() + body
    return "\n".join(line.rstrip() for line in out.splitlines()) + "\n"


def launch_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMaskIR, *,
                sm_scale: float, stages: int, pingpong: bool, pos32: bool, src: str,
                poison: bool = False):
    """The warp-specialised kernel's launch (codegen.kernel.Launch) for inputs that
    codegen.kernel checked and `supported` accepted: descriptors over [B * H, Lq, D] for Q
    and O and [B * Hkv, n, D] for K and V."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .kernel import Launch

    B, H, Lq, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    if poison:
        o.fill_(float("nan"))
        lse.fill_(float("nan"))
    ty = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    bq = [1, bm.schedule.block_m // 2, D]
    bk = [1, bm.schedule.block_n, D]
    lq = gl.NVMMASharedLayout.get_default_for(bq, ty)
    lk = gl.NVMMASharedLayout.get_default_for(bk, ty)
    qd = TensorDescriptor.from_tensor(q.view(B * H, Lq, D), bq, lq)
    od = TensorDescriptor.from_tensor(o.view(B * H, Lq, D), bq, lq)
    kd = TensorDescriptor.from_tensor(k.view(B * Hkv, n, D), bk, lk)
    vd = TensorDescriptor.from_tensor(v.view(B * Hkv, n, D), bk, lk)
    args = (qd, kd, vd, od, lse, sm_scale, bm.q_len, bm.n, bm.n_var, bm.q_start, H, H // Hkv)
    kwargs = dict(STAGES=stages, PINGPONG=bool(pingpong), POS32=bool(pos32), num_warps=4,
                  maxnreg=168)
    grid = (-(-bm.q_len // bm.schedule.block_m), B * H)
    return Launch(src, grid, args, kwargs, o, lse)


def compile_here(bm: BlockMaskIR, head_dim: int, dtype: torch.dtype, *, arch: str = "sm_90",
                 stages: int = 2, pingpong: bool = False) -> dict:
    """Compile the generated kernel for `arch` in this process (no GPU needed) and return
    Triton's assembly dict (ttgir, ptx, cubin, ...). Gluon is never interpreted: the process
    must have imported Triton without TRITON_INTERPRET (children of tests and of the CLI get
    attnc.settings.subprocess_env(interpret=False))."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from .cache import load_kernel
    from .kernel import fits_int32

    why = supported(bm, dtype, head_dim)
    if why is not None:
        raise ValueError(f"the warp-specialised kernel does not run this launch: {why}")
    if arch != "sm_90":
        raise ValueError(f"the warp-specialised kernel is built for sm_90 only, not {arch}")
    fn = load_kernel(kernel_source(bm), interpret=False)
    ty, name = (gl.bfloat16, "bf16") if dtype == torch.bfloat16 else (gl.float16, "fp16")

    def desc(rows: int) -> str:
        lay = gl.NVMMASharedLayout.get_default_for([1, rows, head_dim], ty)
        return f"tensordesc<{name}[1, {rows}, {head_dim}],{lay!r}>"

    bq, bk = desc(bm.schedule.block_m // 2), desc(bm.schedule.block_n)
    sig = {"q_desc": bq, "k_desc": bk, "v_desc": bk, "o_desc": bq, "LSE": "*fp32",
           "sm_scale": "fp32", "Q_LEN": "i32", "N_CTX": "i32", "N_VAR": "i32",
           "Q_START": "i32", "H": "i32", "GROUP": "i32", "STAGES": "constexpr",
           "PINGPONG": "constexpr", "POS32": "constexpr", "num_warps": "constexpr"}
    idx = {a: i for i, a in enumerate(fn.arg_names)}
    const = {(idx["STAGES"],): stages, (idx["PINGPONG"],): bool(pingpong),
             (idx["POS32"],): fits_int32(bm), (idx["num_warps"],): 4}
    k = triton.compile(GluonASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "maxnreg": 168})
    return dict(k.asm)
