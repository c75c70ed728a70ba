"""FlexAttention back end: the block-mask IR as a torch BlockMask.

csr_to_tensors      the CSR arrays as torch int32 tensors with FlexAttention's batch dimension
compile_expr        static IR -> a function of (q, k, h) tensors (torch ops only, so FlexAttention
                    can vmap it, and torch.compile lower it into its Triton kernels)
mask_mod_for        the pattern's static mask IR as a FlexAttention mask_mod
to_flex_block_mask  a torch.nn.attention.flex_attention.BlockMask built from our CSR arrays

The module imports torch but not FlexAttention: a torch without it fails at call time, with a
message that says so.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

import numpy as np
import torch
from attnc.compiler.ir import Const, Node, Op, Sel, Var, has_selector, substitute, walk
from attnc.compiler.numeric import evaluate as num_eval

I64, F64 = torch.int64, torch.float64


def _flex():
    """The flex_attention module, or a clear error where this torch lacks it."""
    try:
        fa = importlib.import_module("torch.nn.attention.flex_attention")
        fa.BlockMask.from_kv_blocks  # noqa: B018 - presence check
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            f"torch {torch.__version__} has no usable torch.nn.attention.flex_attention "
            f"(BlockMask.from_kv_blocks); FlexAttention needs torch >= 2.5 ({e})") from e
    return fa


# ---------------------------------------------------------------- CSR -> tensors


def csr_to_tensors(csr, device="cpu") -> dict[str, torch.Tensor]:
    """The CSR arrays as int32 tensors with the batch dimension added: [1, H, QB] counts and
    [1, H, QB, W] indices."""
    out = {}
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        a = np.asarray(getattr(csr, name))
        out[name] = torch.tensor(a, dtype=torch.int32, device=device).unsqueeze(0)
    return out


# ---------------------------------------------------------------- IR -> torch


def _is_float(x: torch.Tensor) -> bool:
    return x.is_floating_point()


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == F64 else x.to(F64)


def _pair(a: torch.Tensor, b: torch.Tensor):
    """Numeric promotion as in the IR: int op float is float64."""
    if _is_float(a) or _is_float(b):
        return _f64(a), _f64(b)
    return a, b


def _floordiv(a, b):
    a, b = _pair(a, b)
    if _is_float(a):
        return torch.floor(a / b)
    zero = b == 0
    safe = torch.where(zero, torch.ones_like(b), b)
    return torch.where(zero, torch.zeros_like(a), torch.div(a, safe, rounding_mode="floor"))


def _mod(a, b):
    a, b = _pair(a, b)
    zero = b == 0
    safe = torch.where(zero, torch.ones_like(b), b)
    return torch.where(zero, a, torch.remainder(a, safe))


def _int_pow(a, b, base=None, exp=None):
    """a ** b with the IR's integer semantics (int64 wrap-around; b < 0 floors the fraction),
    from pointwise ops only: inductor cannot lower integer pow.Tensor_Tensor inside a mask_mod.
    base / exp: the operand's value when it is a constant (then fewer operations)."""
    one = torch.ones_like(a * b)
    if base == 2:
        # 2 ** e: a shift; 2 ** 63 wraps to the smallest int64, 2 ** 64 and beyond are 0
        e = b.clamp(0, 63)
        pos = torch.where(b >= 64, one - 1, torch.bitwise_left_shift(one, e))
    elif isinstance(exp, int) and exp >= 0:
        pos, sq, e = one, a * one, exp  # square-and-multiply over the constant's bits
        while e:
            if e & 1:
                pos = pos * sq
            e >>= 1
            if e:
                sq = sq * sq
    else:
        e, pos, sq = b.clamp(min=0), one, a * one
        for i in range(63):  # every bit of a non-negative int64 exponent
            bit = torch.bitwise_and(torch.bitwise_right_shift(e, i), 1) == 1
            pos = torch.where(bit, pos * sq, pos)
            sq = sq * sq
    neg = b < 0
    odd = torch.remainder(b, 2) == 1
    zero = one - 1
    special = torch.where(a == 1, one, torch.where((a < 0) & odd, -one, zero))
    special = torch.where((a == -1) & ~odd, one, special)
    return torch.where(neg, special, pos)


def _int_log2(x):
    """floor(log2(max(x, 1))), exact for int64 (the float estimate is corrected by shifts)."""
    x = (x if not _is_float(x) else x.to(I64)).clamp(min=1)
    r = torch.floor(torch.log2(x.to(F64))).to(I64)
    one = torch.ones_like(r)
    r = torch.where(torch.bitwise_left_shift(one, r + 1) <= x, r + 1, r)
    r = torch.where(torch.bitwise_left_shift(one, r) > x, r - 1, r)
    return r


def _minmax(fn, args):
    out = args[0]
    for y in args[1:]:
        a, b = _pair(out, y)
        out = fn(a, b)
    return out


_BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
}


def _apply(o: str, a: list[torch.Tensor], static: tuple = ()) -> torch.Tensor:
    """One IR operation on tensors; static: the arguments' values where they are constants."""
    if o in _BINARY:
        x, y = _pair(a[0], a[1])
        return _BINARY[o](x, y)
    if o == "and":
        out = a[0]
        for y in a[1:]:
            out = out & y
        return out
    if o == "or":
        out = a[0]
        for y in a[1:]:
            out = out | y
        return out
    if o == "not":
        return ~a[0]
    if o == "where":
        x, y = a[1], a[2]
        if x.dtype != torch.bool or y.dtype != torch.bool:
            x, y = _pair(x, y)
        return torch.where(a[0], x, y)
    if o == "div":
        return _f64(a[0]) / _f64(a[1])
    if o == "fdiv":
        return _floordiv(a[0], a[1])
    if o == "mod":
        return _mod(a[0], a[1])
    if o == "pow":
        if not _is_float(a[0]) and not _is_float(a[1]):
            base, exp = (tuple(static) + (None, None))[:2]
            return _int_pow(a[0], a[1], base=base, exp=exp)
        return torch.pow(_f64(a[0]), _f64(a[1]))
    if o == "neg":
        return -a[0]
    if o == "min":
        return _minmax(torch.minimum, a)
    if o == "max":
        return _minmax(torch.maximum, a)
    if o == "abs":
        return torch.abs(a[0])
    if o == "log2":
        return _int_log2(a[0])
    if o in ("floor", "ceil"):
        if not _is_float(a[0]):
            return a[0]
        return (torch.floor if o == "floor" else torch.ceil)(a[0]).to(I64)
    if o == "float":
        return _f64(a[0])
    if o == "exp":
        return torch.exp(_f64(a[0]))
    if o == "log":
        return torch.log(_f64(a[0]))
    if o == "sqrt":
        return torch.sqrt(_f64(a[0]))
    raise NotImplementedError(f"IR operator '{o}' has no torch translation")


def compile_expr(e: Node, n: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                               torch.Tensor]:
    """(q, k, h) -> tensor for a static IR expression, n fixed; q, k, h are int64 tensors of
    any broadcastable shapes (or FlexAttention's vmapped scalars); constants take q's shape.
    The result is bool, int64 or float64 as the IR's type says. Only torch ops on tensors: no
    branching on values, no .item(), so FlexAttention can vmap (or compile) it."""
    if has_selector(e):
        kinds = sorted({x.kind for x in walk(e) if isinstance(x, Sel)})
        raise ValueError(f"dynamic selector(s) {', '.join(kinds)} need run-time data; "
                         "FlexAttention mask_mods are only generated for static patterns")
    e = substitute(e, {"n": Const(int(n))})
    # A straight-line program over slots, fixed here so that the traced function only
    # computes: it touches no state outside itself (FlexAttention traces mask_mods with dynamo,
    # which refuses side effects) and never branches on a tensor value. Operations on constants
    # only are folded with compiler.numeric (the IR's exact semantics).
    prog: list[tuple] = []
    slot: dict[Node, int] = {}
    for x in _post_order(e):
        if isinstance(x, Const):
            entry = ("const", x.value)
        elif isinstance(x, Var):
            if x.name not in ("q", "k", "h"):
                raise ValueError(f"unbound variable '{x.name}' in a mask")
            entry = ("var", x.name)
        else:
            args = [prog[slot[a]] for a in x.args]
            static = tuple(a[1] if a[0] == "const" else None for a in args)
            entry = ("op", x.op, tuple(slot[a] for a in x.args), static)
            if all(a[0] == "const" for a in args):
                try:
                    v = np.asarray(num_eval(Op(x.op, tuple(Const(a[1]) for a in args)), {}))
                    entry = ("const", v.item())
                except Exception:  # noqa: BLE001 - not foldable: computed at run time
                    pass
        slot[x] = len(prog)
        prog.append(entry)
    live = [False] * len(prog)
    live[-1] = True
    for i in range(len(prog) - 1, -1, -1):
        if live[i] and prog[i][0] == "op":
            for j in prog[i][2]:
                live[j] = True

    def fn(q: torch.Tensor, k: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        env = {"q": q, "k": k, "h": h}
        vals: list[torch.Tensor | None] = []
        for i, entry in enumerate(prog):
            if not live[i]:
                vals.append(None)
            elif entry[0] == "const":
                # full_like, not torch.tensor: a tensor constant made inside a mask_mod
                # breaks inductor's lowering of FlexAttention's mask subgraph.
                vals.append(torch.full_like(q, entry[1], dtype=_dtype(entry[1])))
            elif entry[0] == "var":
                vals.append(env[entry[1]])
            else:
                vals.append(_apply(entry[1], [vals[j] for j in entry[2]], entry[3]))
        return vals[-1]

    return fn


def _dtype(v) -> torch.dtype:
    return torch.bool if isinstance(v, bool) else I64 if isinstance(v, int) else F64


def _post_order(e: Node) -> list[Node]:
    """Distinct nodes, every node after its arguments, e last (iterative: deep IR is fine)."""
    seen: set[Node] = set()
    out: list[Node] = []
    stack: list[tuple[Node, bool]] = [(e, False)]
    while stack:
        x, ready = stack.pop()
        if ready:
            if x not in seen:
                seen.add(x)
                out.append(x)
            continue
        if x in seen:
            continue
        stack.append((x, True))
        if isinstance(x, Op):
            stack.extend((a, False) for a in reversed(x.args) if a not in seen)
    return out


def compile_mask(mask: Node, n: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                 torch.Tensor]:
    """compile_expr for a boolean mask (checked on each call)."""
    fn = compile_expr(mask, n)

    def mask_fn(q, k, h):
        out = fn(q, k, h)
        if out.dtype != torch.bool:
            raise TypeError(f"a mask must be boolean, this one is {out.dtype}")
        return out

    return mask_fn


def mask_mod_for(block_mask_ir):
    """A FlexAttention mask_mod (b, h, q_idx, kv_idx) -> bool for the pattern's static mask;
    q_idx counts from the first evaluated query (grid position q_idx + q_start), kv_idx is the
    key's grid position. The pattern's n is the sequence length (n_var, which differs from the
    grid length under a layout transform: then block_mask_ir.pattern is the transformed
    pattern over permuted positions, whose padding slots are never kept)."""
    pattern = block_mask_ir.pattern
    if pattern.dynamic:
        raise ValueError(f"pattern '{pattern.name}' is dynamic: its mask needs run-time data")
    fn = compile_mask(pattern.mask, getattr(block_mask_ir, "n_var", block_mask_ir.n))
    q_start = int(block_mask_ir.q_start)

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx.to(I64) + q_start
        k = kv_idx.to(I64)
        hh = h.to(I64) if isinstance(h, torch.Tensor) else torch.full_like(q, int(h))
        out = fn(q, k, hh)
        # Masks free of some index (true, causal without h) still get the indices' shape.
        return (out & torch.ones_like(hh, dtype=torch.bool) & torch.ones_like(q, dtype=torch.bool)
                & torch.ones_like(k, dtype=torch.bool))

    mask_mod.__name__ = "attnc_" + re.sub(r"\W", "_", pattern.name) + "_mask_mod"
    mask_mod.__qualname__ = mask_mod.__name__
    return mask_mod


# ---------------------------------------------------------------- BlockMask


def _widen(num: np.ndarray, idx: np.ndarray, num_cols: int) -> np.ndarray:
    """Rows of width num_cols in FlexAttention's order: the valid prefix (ascending), then every
    other block index ascending, as its create_block_mask lays them out."""
    H, QB, W = idx.shape
    member = np.zeros((H, QB, num_cols), dtype=bool)
    valid = np.arange(W) < num[..., None]
    h, qb, j = np.nonzero(valid)
    member[h, qb, idx[h, qb, j]] = True
    return np.argsort(~member, axis=-1, kind="stable").astype(np.int32)


def to_flex_block_mask(block_mask_ir, device="cpu"):
    """A real torch BlockMask from our CSR (B = 1), with mask_mod_for's mask_mod.

    The CSR keeps rows only as wide as the longest row; FlexAttention reads the width of
    kv_indices as the number of key blocks (to_dense, the transposed q-side indices), so rows
    are widened to every key block here, padded as create_block_mask pads them (H x QB x KB
    int32 per kind, as create_block_mask's own).

    seq_lengths are (q_len, grid n): under a layout transform the BlockMask is over permuted
    positions, and q, k, v must be permuted (and padded) by the caller to match."""
    fa = _flex()
    csr = block_mask_ir.materialize()
    t = csr_to_tensors(csr, device=device)
    for kind in ("", "full_"):
        wide = _widen(getattr(csr, kind + "kv_num_blocks"), getattr(csr, kind + "kv_indices"),
                      csr.num_kv_blocks)
        t[kind + "kv_indices"] = torch.tensor(wide, device=device).unsqueeze(0)
    return fa.BlockMask.from_kv_blocks(
        t["kv_num_blocks"], t["kv_indices"], t["full_kv_num_blocks"], t["full_kv_indices"],
        BLOCK_SIZE=(csr.block_m, csr.block_n), mask_mod=mask_mod_for(block_mask_ir),
        seq_lengths=(csr.q_len, csr.n))


__all__ = ["compile_expr", "compile_mask", "csr_to_tensors", "mask_mod_for", "to_flex_block_mask"]
