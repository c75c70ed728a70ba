"""Forward attention kernels generated from the block-mask IR: one skeleton, two hooks.

The skeleton is FlexAttention's: per query block, a loop over FULL key blocks (no mask) and a
loop over PARTIAL key blocks (the pattern's predicate inlined as Triton code), online softmax in
base 2, output 0 and LSE -inf for rows that keep nothing. This first version reads the key blocks
from the CSR index lists; computing static ranges arithmetically in the kernel is the next step
(issue 4).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass

import torch
from attnc.compiler.blockmask import BlockMaskIR
from attnc.compiler.rules import rewrite

from .expr import PRELUDE, print_expr

TEMPLATE = '''"""attnc generated kernel. pattern: {name}; key {key}; schedule: {mode}"""
import triton
import triton.language as tl
{prelude}

@triton.jit
def attnc_block(acc, l_i, m_i, q, kb, q_pos, row_ok, h, hk, b, n_var, qk_scale,
                K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, N_CTX, SIDE, s_side_h, s_side_s,
                APPLY_MASK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    LOG2E: tl.constexpr = 1.4426950408889634
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = offs_n < N_CTX
    k = tl.load(K + b * sk_b + hk * sk_h + offs_n[:, None] * sk_n + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * sv_b + hk * sv_h + offs_n[:, None] * sv_n + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # float32 inputs get float32 products (not TF32): the error bound is PyTorch's.
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, tl.trans(k)) * qk_scale
    k_pos = offs_n[None, :]
{bias}
    keep = col_ok[None, :] & row_ok[:, None]
    if APPLY_MASK:
        keep = keep & ({mask})
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def attnc_fwd(
    Q, K, V, O, LSE,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, SIDE,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m, sl_b, sl_h,
    s_num_h, s_idx_h, s_idx_m, s_fnum_h, s_fidx_h, s_fidx_m, s_side_h, s_side_s,
    sm_scale, Q_LEN, N_CTX, N_VAR, Q_START, H, GROUP,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Q_LEN
    q_pos = (Q_START + offs_m).to(tl.int64)[:, None]
    n_var = N_VAR.to(tl.int64)
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_m + offs_d[None, :],
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
    tl.store(O + b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_m + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b * sl_b + h * sl_h + offs_m, lse, mask=row_ok)
'''


CSR_SCHEDULE = """    # Key blocks from the CSR index lists: full (no mask), then partial.
    n_full = tl.load(FULL_NUM + h * s_fnum_h + pid_m)
    for i in range(0, n_full):
        kb = tl.load(FULL_IDX + h * s_fidx_h + pid_m * s_fidx_m + i).to(tl.int64)
        acc, l_i, m_i = attnc_block(acc, l_i, m_i, q, kb, q_pos, row_ok, h, hk, b, n_var,
                                    qk_scale, K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, N_CTX,
                                    SIDE, s_side_h, s_side_s, False, BLOCK_N, HEAD_DIM,
                                    UPCAST, IEEE)
    n_part = tl.load(KV_NUM + h * s_num_h + pid_m)
    for i in range(0, n_part):
        kb = tl.load(KV_IDX + h * s_idx_h + pid_m * s_idx_m + i).to(tl.int64)
        acc, l_i, m_i = attnc_block(acc, l_i, m_i, q, kb, q_pos, row_ok, h, hk, b, n_var,
                                    qk_scale, K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, N_CTX,
                                    SIDE, s_side_h, s_side_s, True, BLOCK_N, HEAD_DIM,
                                    UPCAST, IEEE)"""

_NAMES = {"q": "q_pos", "k": "k_pos", "h": "h", "n": "n_var"}


_RANGE_NAMES = {"q0": "q0", "q1": "q1", "n": "n_var", "kmax": "kmax", "h": "h"}


def arithmetic_rules(bm: BlockMaskIR):
    """The rules of a single head class when every one is pure bounds (no guards, strides or
    tested atoms): then the kernel computes its key-block ranges itself, with no index loads."""
    if len(bm.classes) != 1 or bm.layout is not None or bm.pattern.dynamic:
        return None
    rules = bm.classes[0].rules
    if not bm.classes[0].exact_rules or not rules or len(rules) > 4:
        return None
    for r in rules:
        if r.guards or r.stride is not None or r.impure or r.full_lo is None:
            return None
    return rules


def _arith_schedule(rules) -> str:
    """Per rule: visit range [v_lo, v_hi] and full range [f_lo, f_hi] in key blocks from the
    rule's closed forms; blocks already visited by an earlier rule are skipped, so each block is
    processed once; the predicate is applied unless the block is proven full."""
    P = lambda e: print_expr(e, _RANGE_NAMES)  # noqa: E731
    lines = [
        "    # Key-block ranges computed from the block-mask IR's closed forms (no index loads).",
        "    q0 = (Q_START + pid_m * BLOCK_M).to(tl.int64)",
        "    q1 = tl.minimum(q0 + BLOCK_M - 1, Q_START + Q_LEN - 1).to(tl.int64)",
        "    kmax = (N_CTX - 1).to(tl.int64)",
        "    complete = (q0 + BLOCK_M - 1) <= (Q_START + Q_LEN - 1)",
        "    last_full = N_CTX // BLOCK_N - 1",
    ]
    for i, r in enumerate(rules):
        lines += [
            f"    v_lo{i} = tl.maximum({P(r.visit_lo)}, 0) // BLOCK_N",
            f"    v_hi{i} = tl.minimum({P(r.visit_hi)}, kmax)",
            f"    v_hi{i} = tl.where(v_hi{i} >= tl.maximum({P(r.visit_lo)}, 0), "
            f"v_hi{i} // BLOCK_N, v_lo{i} - 1)",
            f"    f_lo{i} = (tl.maximum({P(r.full_lo)}, 0) + BLOCK_N - 1) // BLOCK_N",
            f"    f_hi{i} = (tl.minimum({P(r.full_hi)}, kmax) + 1) // BLOCK_N - 1",
            f"    f_hi{i} = tl.where(complete, tl.minimum(f_hi{i}, last_full), f_lo{i} - 1)",
        ]
    for i in range(len(rules)):
        # Blocks of earlier rules were already processed: keep only those outside all of them.
        outside = [f"((kb < v_lo{j}) | (kb > v_hi{j}))" for j in range(i)]
        lines += [
            f"    for kb in range(v_lo{i}, v_hi{i} + 1):",
        ]
        body_indent = "        "
        if outside:
            lines.append(f"        if {' & '.join(outside)}:")
            body_indent = "            "
        call = ("attnc_block(acc, l_i, m_i, q, kb, q_pos, row_ok, h, hk, b, n_var, qk_scale, "
                "K, V, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, N_CTX, SIDE, s_side_h, s_side_s, {m}, "
                "BLOCK_N, HEAD_DIM, UPCAST, IEEE)")
        lines += [
            f"{body_indent}if (kb >= f_lo{i}) & (kb <= f_hi{i}):",
            f"{body_indent}    acc, l_i, m_i = " + call.format(m="False"),
            f"{body_indent}else:",
            f"{body_indent}    acc, l_i, m_i = " + call.format(m="True"),
        ]
    return "\n".join(lines)


def kernel_source(bm: BlockMaskIR, arithmetic: bool | None = None) -> str:
    """Deterministic Triton source for a block mask's pattern. With arithmetic ranges (the
    default when the rules allow it) the kernel needs no index lists. Dynamic selectors read
    the side tensor their builders fill (codegen.dynamic)."""
    sel = None
    if bm.pattern.dynamic:
        from .dynamic import selector_printer

        sel = selector_printer(bm.pattern)
    mask = rewrite(bm.pattern.mask)
    mask_src = print_expr(mask, _NAMES, sel)
    if bm.pattern.bias is not None:
        bias = rewrite(bm.pattern.bias)
        bias_src = f"    s = s + ({print_expr(bias, _NAMES, sel)}) * LOG2E"
    else:
        bias_src = "    pass"
    rules = arithmetic_rules(bm)
    use_arith = rules is not None if arithmetic is None else (arithmetic and rules is not None)
    schedule = _arith_schedule(rules) if use_arith else CSR_SCHEDULE
    return TEMPLATE.format(name=bm.pattern.name, key=bm.pattern.key, prelude=PRELUDE,
                           mask=mask_src, bias=bias_src, schedule=schedule,
                           mode="arithmetic ranges" if use_arith else "index lists")


_LOADED: dict[str, object] = {}


def load_kernel(source: str):
    """Import generated source (Triton's JIT needs a real file); one module per source text."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    if digest in _LOADED:
        return _LOADED[digest]
    folder = os.path.join(tempfile.gettempdir(), "attnc-kernels")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"k_{digest}.py")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".py")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"attnc_k_{digest}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    _LOADED[digest] = mod.attnc_fwd
    return mod.attnc_fwd


@dataclass
class Output:
    out: torch.Tensor
    lse: torch.Tensor


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMaskIR,
              sm_scale: float | None = None, poison: bool = False,
              arithmetic: bool | None = None,
              block_mask: dict[str, torch.Tensor] | None = None,
              side: torch.Tensor | None = None) -> Output:
    """Sparse attention of q [B, H, Lq, D] over k, v [B, Hkv, n, D] with a block mask.

    Returns the output and the natural-log LSE ([B, H, Lq], -inf for rows that keep nothing).
    poison=True fills the outputs with NaN first (tests: every element must be written).
    block_mask: index lists computed elsewhere (dynamic patterns' builders), FlexAttention's
    layout without the batch dimension: kv_num_blocks [H|1, QB], kv_indices [H|1, QB, W],
    full_kv_num_blocks, full_kv_indices; they replace the block mask's own (index-list
    schedule), and the pattern's predicate is still applied in partial blocks.
    side: int32 [H|1, S, L], what dynamic selectors read in partial blocks (codegen.dynamic
    defines its layout)."""
    if bm.layout is not None:
        raise NotImplementedError("permuted layouts run in the next version of the kernels")
    B, H, Lq, D = q.shape
    Bk, Hkv, n, Dk = k.shape
    if (Lq, n) != (bm.q_len, bm.n) or H % Hkv or Dk != D or v.shape != k.shape:
        raise ValueError(f"shapes q {list(q.shape)} k {list(k.shape)} v {list(v.shape)} do not "
                         f"fit the block mask (q_len {bm.q_len}, n {bm.n})")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret and q.device.type != "cuda":
        raise ValueError("the kernels run on a CUDA device (or on the CPU under "
                         "TRITON_INTERPRET=1); got tensors on " + str(q.device))
    if bm.heads not in (1, H):
        raise ValueError(f"the block mask has {bm.heads} heads, q has {H}")
    dev = q.device
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    if block_mask is None:
        csr = bm.materialize()
        t = {name: torch.as_tensor(getattr(csr, name), device=dev).contiguous()
             for name in names}
    else:
        t = {name: block_mask[name].to(device=dev, dtype=torch.int32).contiguous()
             for name in names}
        arithmetic = False
    num_q_blocks = -(-Lq // bm.schedule.block_m)
    if t["kv_num_blocks"].shape[-1] != num_q_blocks or t["kv_num_blocks"].shape[0] not in (1, H):
        raise ValueError(f"block mask index lists have shape {list(t['kv_num_blocks'].shape)}, "
                         f"need [{H} or 1, {num_q_blocks}]")
    if t["kv_num_blocks"].shape[0] == 1 and H > 1:
        t = {name: x.expand(H, *x.shape[1:]).contiguous() for name, x in t.items()}
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), device=dev, dtype=torch.float32)
    if poison:
        o.fill_(float("nan"))
        lse.fill_(float("nan"))
    if side is None:
        side = torch.zeros((1, 1, 1), device=dev, dtype=torch.int32)
    side = side.to(device=dev, dtype=torch.int32).contiguous()
    # A side tensor with one head serves every head (stride 0).
    s_side_h = side.stride(0) if side.shape[0] > 1 else 0
    fn = load_kernel(kernel_source(bm, arithmetic))
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    BM, BN = bm.schedule.block_m, bm.schedule.block_n
    upcast = bool(os.environ.get("TRITON_INTERPRET") == "1" and q.dtype != torch.float32)
    grid = (num_q_blocks, B * H)
    fn[grid](
        q, k, v, o, lse,
        t["kv_num_blocks"], t["kv_indices"], t["full_kv_num_blocks"], t["full_kv_indices"], side,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1),
        t["kv_num_blocks"].stride(0), t["kv_indices"].stride(0), t["kv_indices"].stride(1),
        t["full_kv_num_blocks"].stride(0), t["full_kv_indices"].stride(0),
        t["full_kv_indices"].stride(1), s_side_h, side.stride(1),
        sm_scale, Lq, n, bm.n_var, bm.q_start, H, H // Hkv,
        BLOCK_M=BM, BLOCK_N=BN, HEAD_DIM=D, UPCAST=upcast,
        IEEE=bool(q.dtype == torch.float32 or upcast),
    )
    return Output(o, lse)


__all__ = ["Output", "attention", "kernel_source", "load_kernel"]
