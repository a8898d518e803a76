"""What the attention kernel files share: the small device helpers of the kernels and the host helpers
that turn a call's tensors and floats into kernel arguments. Names with a leading underscore are for the
attention_*.py files alone.

Bounds: inside the loops, rows past Sq or Sk are read from the last valid row (clamped indices)
and their scores discarded, so the loops carry no load predicates (each costs a scalar register
pair on AMD); head dims that are powers of two (EVEN_D/EVEN_DV) need no head-dim mask. fp32 and
fp64 products are exact ("ieee", as torch's matmul), 16-bit ones go to the tensor cores.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)   # log2(e): natural units -> log2 units
_LN2 = tl.constexpr(0.6931471805599453)     # ln(2): log2 units -> natural units

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Small device helpers


@triton.jit
def _mm(a, b, ACC: tl.constexpr, DOT_IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """a [M, K] @ b [K, N] accumulated in ACC. 16-bit operands go to the tensor cores as they are
    (fp32 accumulation); fp32/fp64 operands use exact ("ieee") products as torch's matmul does,
    not tf32. The interpreter multiplies bf16 wrongly, so there the operands are upcast first."""
    if INTERPRET:
        c = tl.dot(a.to(ACC), b.to(ACC), out_dtype=ACC)
    elif DOT_IEEE:
        c = tl.dot(a, b, input_precision="ieee", out_dtype=ACC)
    else:
        c = tl.dot(a, b, out_dtype=tl.float32)
    return c


@triton.jit
def _mul_split(x, hi, lo, FP64: tl.constexpr):
    """x * (hi + lo): a host float split into an fp32 head and tail (Triton passes Python floats
    as fp32), so fp64 data keeps the float's full precision; other dtypes need the head only."""
    if FP64:
        y = x * hi + x * lo
    else:
        y = x * hi
    return y


@triton.jit
def _in_range(offs, n, EVEN: tl.constexpr):
    """offs < n, or a constant all-true mask when the block is exactly n wide (EVEN): the
    compiler then drops the predicate, which on AMD costs a scalar register pair per load."""
    if EVEN:
        ok = tl.full(offs.shape, 1, tl.int1)
    else:
        ok = offs < n
    return ok


@triton.jit
def _keep_scale(dropout_p, dropout_p_lo, FP64: tl.constexpr):
    """1 / (1 - p), the factor of kept probabilities, in ACC (p = dropout_p + dropout_p_lo for
    fp64, whose tail an fp32 argument cannot carry)."""
    if FP64:
        r = 1.0 / (1.0 - (tl.cast(dropout_p, tl.float64) + tl.cast(dropout_p_lo, tl.float64)))
    else:
        r = 1.0 / (1.0 - dropout_p)
    return r


@triton.jit
def _exp_base(x, FP64: tl.constexpr):
    """e^x for fp64 (scores in natural units), 2^x otherwise (scores in log2 units)."""
    if FP64:
        y = tl.exp(x)
    else:
        y = tl.exp2(x)
    return y


@triton.jit
def _keep_mask(seed, rows, cols, plane, dropout_p):
    """Which probabilities dropout keeps (True = kept), for query rows x key cols of plane
    b * Hq + h: word 0 of Philox4x32-10 with counters (col, row, plane, 0) and key = seed, mapped
    to [0, 1) by tl.uint_to_uniform_float, kept iff u >= p (engine.reference.dropout_uniform).
    rows, cols: int32 tensors that broadcast to the tile ([R, 1] with [1, C], or transposed);
    plane: an int64 scalar (< 2^31); dropout_p: fp32 scalar."""
    zero = rows * 0 + cols * 0                     # int32 [R, C]: the 32-bit Philox variant
    r0, _, _, _ = tl.philox(seed, cols + zero, rows + zero, plane.to(tl.int32) + zero, zero)
    return tl.uint_to_uniform_float(r0) >= dropout_p


@triton.jit
def _score_mask(s, visible, Mask_head, stride_mq, stride_mk, rows_m, rows_n,
                TRANSPOSED: tl.constexpr, MASK_KIND: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr):
    """Scores s with everything invisible set to -inf: what `visible` (the tile's bounds,
    broadcastable to s) excludes and the bool mask; a float mask is added (in the scores' units).
    Causality is the caller's (diagonal blocks only). The dK/dV kernel passes s - lse and takes P
    as the exp of the result, so that a hidden key is -inf after the subtraction and its P is 0
    whatever the lse holds: a row whose lse is NaN must not reach dV of the keys it does not see
    (torch's rows with NaN are NaN at their visible keys only). The dQ and delta kernels need not:
    in such a row dS = P (dP - delta) is NaN at every key anyway, through delta. (Keeping a
    visibility mask until after the exp instead spilled registers on gfx942 and in sm90's dQ at
    D=256.) s is [M, N] (rows = queries) or, TRANSPOSED, [N, M] (rows = keys, as in the dK/dV
    kernel). rows_m/rows_n: query/key indices [M]/[N] clamped
    into the tensor, so that the mask is read without predicates (what lies outside is discarded
    by `visible`). The mask is read through its strides (0 on broadcast dims), never expanded."""
    if TRANSPOSED:
        offsets = rows_m[None, :] * stride_mq + rows_n[:, None] * stride_mk
    else:
        offsets = rows_m[:, None] * stride_mq + rows_n[None, :] * stride_mk
    if MASK_KIND == 1:
        visible = visible & (tl.load(Mask_head + offsets) != 0)
    elif MASK_KIND == 2:
        bias = tl.load(Mask_head + offsets).to(ACC)
        if FP64:
            s = s + bias
        else:
            s = s + bias * _LOG2E
    return tl.where(visible, s, float("-inf"))


# ---------------------------------------------------------------------------------------------
# Forward


def _acc_types(dtype: torch.dtype):
    """(torch accumulator dtype, tl accumulator, DOT_IEEE, FP64)."""
    if dtype == torch.float64:
        return torch.float64, tl.float64, True, True
    return torch.float32, tl.float32, dtype == torch.float32, False


def _split(x: float) -> tuple[float, float]:
    """x as an fp32 head plus an fp32 tail (Triton passes Python floats as fp32)."""
    head = float(torch.tensor(x, dtype=torch.float32))
    return head, x - head


def _mask_args(mask: Optional[torch.Tensor], fallback: torch.Tensor):
    """(MASK_KIND, tensor to pass, its 4 strides). Bool masks are read as int8 (one byte each)."""
    if mask is None:
        return MASK_NONE, fallback, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        return MASK_BOOL, mask.view(torch.int8), mask.stride()
    return MASK_FLOAT, mask, mask.stride()


def _seed(seed: int) -> int:
    # the Philox key is the seed's low and high 32-bit words; pass it as a signed int64
    seed &= 2**64 - 1
    return seed - 2**64 if seed >= 2**63 else seed


def _stride3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)
