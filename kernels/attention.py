"""Softmax attention in Triton (the flash-attention algorithm): forward, backward and KV-cache decode.

The contract (arguments, masks, causal rule, GQA, dropout counters, lse) is the docstring of
engine/ops/attention.py; the math is engine/reference.py (attention, attention_backward,
attention_with_kv_cache, dropout_uniform).

Forward, one program per (BLOCK_M query rows, b * Hq + h): Q stays in registers, K/V tiles of
BLOCK_N keys stream past it, softmax is done online in fp32 (running max m, running sum l), so
the Sq x Sk score matrix is never stored. Scores are kept in log2 units (scale * log2(e) folded
into one multiply, exp2 instead of exp) except for fp64 data, which stays in natural units so
that no fp32 constant rounds it. Causal: key blocks entirely above the diagonal are never
visited (loop bounds); blocks entirely below it run unmasked; only the blocks the diagonal
crosses apply j <= i.

Backward (recompute P = exp(S - lse) from the saved lse):
    preprocess  lse in the scores' units; fp32/fp64: Delta = rowsum(dO * O)     [B, Hq, Sq]
    Delta       16-bit data: Delta = rowsum(P * dP), the dQ kernel's loop without dQ: the same
                sum with O as the forward accumulated it, not rounded to 16 bits (which put
                dq/dk at up to 38x the accuracy rule's allowance where the softmax is peaked)
    dK/dV       one program per (BLOCK_N keys, b * Hk + hk), looping over the query heads of
                the GQA group and their query blocks: dV += (P*Z)^T dO, dK += dS^T Q * scale,
                dS = P * (dP - Delta), dP = (dO V^T) * Z; the group's sum stays in registers
                (no atomics)
    dQ          one program per (BLOCK_M query rows, b * Hq + h), looping over key blocks:
                dQ += dS K * scale (no atomics: deterministic)
    Z = keep / (1 - p), the dropout mask regenerated from the seed (tl.philox, counters
    (j, i, b * Hq + h, 0), key = seed: bit-identical to engine.reference.dropout_uniform).

Decode (flash-decoding): the valid keys [0, L_b) of each (batch, kv head) are split across
`splits` programs; each handles the Sq query rows of every query head of the GQA group at once
(K/V read once per group) and writes a partial (out, lse); a combine kernel merges the splits
with their log-sum-exps.

Bounds: inside the loops, rows past Sq or Sk are read from the last valid row (clamped indices)
and their scores discarded, so the loops carry no load predicates (each costs a scalar register
pair on AMD); head dims that are powers of two (EVEN_D/EVEN_DV) need no head-dim mask. fp32 and
fp64 products are exact ("ieee", as torch's matmul), 16-bit ones go to the tensor cores.

Memory traffic, s-byte elements, G = Hq / Hk (what bench/ counts as bytes moved; masks add
B*Hq*Sq*Sk*mask_bytes read at most, less when broadcast, and the debug keep mask B*Hq*Sq*Sk
bytes written):
    forward:   reads B*Hq*Sq*D*s (Q) + ceil(Sq/BLOCK_M)*B*Hq*Sk*(D+Dv)*s (K/V, once per query
               block; from L2 after the first), writes B*Hq*Sq*Dv*s (O) + B*Hq*Sq*4 (lse)
    backward:  preprocess reads 2*B*Hq*Sq*Dv*s (fp32/fp64 only), writes B*Hq*Sq*4 (twice for
               fp32/fp64); 16-bit Delta reads what dQ reads, writes B*Hq*Sq*4; dK/dV reads K, V
               once and Q, dO, lse, Delta once per key block; dQ reads Q, dO, lse, Delta once
               and K, V once per query block; writes dQ, dK, dV once each
    decode:    reads B*Hk*L*(D+Dv)*s (each valid cache entry once) + Q, writes
               B*Hq*Sq*splits*(Dv+1)*4 partials, reads them back, writes O and lse
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from engine.kernels import compat
from engine.kernels.common import INTERPRET, GpuCompileCase, next_power_of_2
from engine.ops.common import dtype_reason

_LOG2E = tl.constexpr(1.4426950408889634)   # log2(e): natural units -> log2 units
_LN2 = tl.constexpr(0.6931471805599453)     # ln(2): log2 units -> natural units

MAX_HEAD_DIM = 256      # registers: Q (fwd/dQ) or K and V (dK/dV) tiles are held for the whole loop
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
_INT32_MAX = 2**31 - 1


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


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q,
                K_head, V_head, Mask_head, Keep_head,
                stride_ks, stride_vs, stride_mq, stride_mk,
                offs_m, offs_d, offs_dv, d_ok, dv_ok, Sq, Sk, lo, hi, diag_from,
                scale_hi, scale_lo, qk_scale, dropout_p, seed, plane,
                CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                RETURN_KEEP: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
                DOT_IEEE: tl.constexpr, FP64: tl.constexpr, INTERPRET: tl.constexpr):
    """Online softmax of one query block over key blocks [lo, hi). acc [M, DV], l_i, m_i [M]
    (running output, sum and max, in ACC), q [M, BLOCK_D]. CAUSAL: blocks from diag_from on
    are crossed by the diagonal and apply j <= i (a uniform branch per block; one loop rather
    than two keeps the scalar registers of the Philox keys and pointers from being doubled,
    which spilled SGPRs on gfx942)."""
    row_ok = offs_m < Sq
    rows_m = tl.minimum(offs_m, Sq - 1)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Sk
        # keys past Sk are read from row Sk - 1 (no load predicates: on AMD each costs scalar
        # registers) and their scores discarded below
        rows_n = tl.minimum(offs_n, Sk - 1)
        kT = tl.load(K_head + rows_n[None, :] * stride_ks + offs_d[:, None],
                     mask=d_ok[:, None], other=0.0)                                  # [BLOCK_D, N]
        s = _mm(q, kT, ACC, DOT_IEEE, INTERPRET)                                     # [M, N]
        if FP64:
            s = _mul_split(s, scale_hi, scale_lo, FP64)
        else:
            s = s * qk_scale
        s = _score_mask(s, col_ok[None, :], Mask_head, stride_mq, stride_mk, rows_m, rows_n,
                        False, MASK_KIND, ACC, FP64)
        if CAUSAL:
            if start_n >= diag_from:
                s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing visible yet keeps max -inf; subtracting 0 instead gives exp(-inf) = 0
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = _exp_base(s - m_use[:, None], FP64)
        alpha = _exp_base(m_i - m_use, FP64)
        l_i = l_i * alpha + tl.sum(p, 1)          # the normalizer counts dropped weights too
        if DROPOUT:
            keep = _keep_mask(seed, offs_m[:, None], offs_n[None, :], plane, dropout_p)
            if RETURN_KEEP:
                tl.store(Keep_head + offs_m[:, None] * Sk + offs_n[None, :], keep.to(tl.int8),
                         mask=row_ok[:, None] & col_ok[None, :])
            p = tl.where(keep, p, 0.0)            # 1 / (1 - p) is applied once at the end
        v = tl.load(V_head + rows_n[:, None] * stride_vs + offs_dv[None, :],
                    mask=dv_ok[None, :], other=0.0)                                  # [N, BLOCK_DV]
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, ACC, DOT_IEEE, INTERPRET)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,                          # [B, Hq, Sq, D] queries, unit stride in D
    K,                          # [B, Hk, Sk, D] keys, unit stride in D
    V,                          # [B, Hk, Sk, Dv] values, unit stride in Dv
    Mask,                       # [B, Hq, Sq, Sk] view, int8 (bool) or float, read when MASK_KIND > 0
    Out,                        # [B, Hq, Sq, Dv] contiguous output
    Lse,                        # [B, Hq, Sq] contiguous ACC output: natural log-sum-exp per row
    Keep,                       # [B, Hq, Sq, Sk] contiguous int8 (bool) keep mask, written when RETURN_KEEP
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mh, stride_mq, stride_mk,   # 0 on the mask's broadcast dims
    Hq,                         # query heads
    group,                      # Hq // Hk: query head h reads kv head h // group
    Sq, Sk, D, Dv,
    scale_hi, scale_lo,         # the softmax scale split into fp32 head + tail (tail used for fp64)
    dropout_p,                  # probability of dropping, fp32 (what u >= p compares with)
    dropout_p_lo,               # dropout_p's tail for fp64's 1 / (1 - p)
    seed,                       # Philox key (int64)
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, RETURN_KEEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,   # next powers of two >= D, Dv (>= 16)
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,     # D == BLOCK_D, Dv == BLOCK_DV: no head-dim masks
    ACC: tl.constexpr,          # tl.float32, or tl.float64 for fp64 data
    DOT_IEEE: tl.constexpr,     # fp32/fp64 data: exact products
    FP64: tl.constexpr,         # natural-unit scores, split scalars
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)            # b * Hq + h
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _in_range(offs_d, D, EVEN_D)
    dv_ok = _in_range(offs_dv, Dv, EVEN_DV)
    row_ok = offs_m < Sq

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)           # [M, BLOCK_D]
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    Mask_head = Mask + b * stride_mb + h * stride_mh
    Keep_head = Keep + bh * Sq * Sk
    qk_scale = scale_hi * _LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    if CAUSAL:
        # rows [start_m, start_m + BLOCK_M) see keys j <= i: key blocks at or past
        # start_m + BLOCK_M are never visited; those before the block holding key start_m are
        # entirely visible; the ones in between [mid, hi) are crossed by the diagonal.
        hi = tl.minimum(Sk, start_m + BLOCK_M)
        mid = tl.minimum((start_m // BLOCK_N) * BLOCK_N, hi)
    else:
        hi = Sk
        mid = Sk
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K_head, V_head, Mask_head, Keep_head,
                                stride_ks, stride_vs, stride_mq, stride_mk,
                                offs_m, offs_d, offs_dv, d_ok, dv_ok, Sq, Sk, 0, hi, mid,
                                scale_hi, scale_lo, qk_scale, dropout_p, seed, bh,
                                CAUSAL, MASK_KIND, DROPOUT, RETURN_KEEP, BLOCK_N, ACC, DOT_IEEE, FP64,
                                INTERPRET)
    if CAUSAL:
        if RETURN_KEEP:
            # debug path: the keep mask is defined for every (i, j), also where causality
            # skipped the work, so tests can compare it with the reference bit for bit
            for start_n in range(hi, Sk, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                keep = _keep_mask(seed, offs_m[:, None], offs_n[None, :], bh, dropout_p)
                tl.store(Keep_head + offs_m[:, None] * Sk + offs_n[None, :], keep.to(tl.int8),
                         mask=row_ok[:, None] & (offs_n[None, :] < Sk))

    # rows with no visible key: l = 0, m = -inf -> out 0, lse -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * _keep_scale(dropout_p, dropout_p_lo, FP64)
    if FP64:
        lse = m_i + tl.log(l_safe)
    else:
        lse = (m_i + tl.log2(l_safe)) * _LN2
    lse = tl.where(empty, float("-inf"), lse)
    tl.store(Out + bh * Sq * Dv + offs_m[:, None] * Dv + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(Lse + bh * Sq + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,                        # [B, Hq, Sq, Dv] forward output, unit stride in Dv
    DO,                         # [B, Hq, Sq, Dv] gradient of the output, unit stride in Dv
    Lse,                        # [B, Hq, Sq] contiguous ACC: the forward's natural log-sum-exp
    Delta,                      # [B, Hq, Sq] contiguous ACC output: rowsum(dO * O), unless DELTA_FROM_P
    LseS,                       # [B, Hq, Sq] contiguous ACC output: lse in the scores' units (log2
                                # units, natural for fp64), +inf for rows with no visible key so
                                # that P = exp(S - LseS) = 0 there
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    Hq, Sq, Dv,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr,
    DELTA_FROM_P: tl.constexpr,  # 16-bit data: _attn_bwd_delta_kernel computes Delta instead
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Sq
    if not DELTA_FROM_P:
        offs_dv = tl.arange(0, BLOCK_DV)
        inside = row_ok[:, None] & (offs_dv[None, :] < Dv)
        o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_dv[None, :],
                    mask=inside, other=0.0).to(ACC)
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_dv[None, :],
                     mask=inside, other=0.0).to(ACC)
        tl.store(Delta + bh * Sq + offs_m, tl.sum(o * do, 1), mask=row_ok)
    lse = tl.load(Lse + bh * Sq + offs_m, mask=row_ok, other=0.0)
    if not FP64:
        lse = lse * _LOG2E
    tl.store(LseS + bh * Sq + offs_m, tl.where(lse == float("-inf"), float("inf"), lse), mask=row_ok)


@triton.jit
def _bwd_dkdv_blocks(dk, dv, k, v,
                     Q_head, DO_head, LseS_row, Delta_row, Mask_head,
                     stride_qs, stride_dos, stride_mq, stride_mk,
                     offs_n, offs_d, offs_dv, d_ok, dv_ok, Sq, Sk, lo, hi, diag_to,
                     scale_hi, scale_lo, qk_scale, dropout_p, keep_scale, seed, plane,
                     CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                     BLOCK_M: tl.constexpr, ACC: tl.constexpr, DOT_IEEE: tl.constexpr,
                     FP64: tl.constexpr, INTERPRET: tl.constexpr):
    """dK, dV [N, BLOCK_D/DV] (ACC) of one key block, accumulated over query blocks [lo, hi) of
    one query head. k [N, BLOCK_D], v [N, BLOCK_DV] in the input dtype. Works on transposed
    tiles (rows = keys) so that dK and dV come out as [N, D] products. CAUSAL: query blocks
    before diag_to are crossed by the diagonal and apply j <= i."""
    col_ok = offs_n < Sk
    rows_n = tl.minimum(offs_n, Sk - 1)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Sq
        # query rows past Sq are read from row Sq - 1 (no load predicates) and masked out of P
        rows_m = tl.minimum(offs_m, Sq - 1)
        qT = tl.load(Q_head + rows_m[None, :] * stride_qs + offs_d[:, None],
                     mask=d_ok[:, None], other=0.0)                                  # [BLOCK_D, M]
        sT = _mm(k, qT, ACC, DOT_IEEE, INTERPRET)                                    # [N, M]
        if FP64:
            sT = _mul_split(sT, scale_hi, scale_lo, FP64)
        else:
            sT = sT * qk_scale
        # the row's lse in the scores' units, +inf where no key is visible (so that P = 0)
        lse = tl.load(LseS_row + rows_m)
        sT = _score_mask(sT - lse[None, :], col_ok[:, None] & row_ok[None, :], Mask_head, stride_mq, stride_mk,
                         rows_m, rows_n, True, MASK_KIND, ACC, FP64)
        if CAUSAL:
            if start_m < diag_to:
                sT = tl.where(offs_n[:, None] <= offs_m[None, :], sT, float("-inf"))
        pT = _exp_base(sT, FP64)                                                     # [N, M]
        do = tl.load(DO_head + rows_m[:, None] * stride_dos + offs_dv[None, :],
                     mask=dv_ok[None, :], other=0.0)                                 # [M, BLOCK_DV]
        dpT = _mm(v, tl.trans(do), ACC, DOT_IEEE, INTERPRET)                         # [N, M]
        if DROPOUT:
            keepT = _keep_mask(seed, offs_m[None, :], offs_n[:, None], plane, dropout_p)
            pdT = tl.where(keepT, pT * keep_scale, 0.0)
            dpT = tl.where(keepT, dpT * keep_scale, 0.0)
        else:
            pdT = pT
        dv += _mm(pdT.to(do.dtype), do, ACC, DOT_IEEE, INTERPRET)
        delta = tl.load(Delta_row + rows_m)
        dsT = pT * (dpT - delta[None, :])
        dk += _mm(dsT.to(qT.dtype), tl.trans(qT), ACC, DOT_IEEE, INTERPRET)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,                          # [B, Hq, Sq, D], unit stride in D
    K,                          # [B, Hk, Sk, D], unit stride in D
    V,                          # [B, Hk, Sk, Dv], unit stride in Dv
    DO,                         # [B, Hq, Sq, Dv] gradient of the output, unit stride in Dv
    LseS,                       # [B, Hq, Sq] contiguous ACC: lse in the scores' units, +inf if no key is visible
    Delta,                      # [B, Hq, Sq] contiguous ACC, rowsum(dO * O)
    Mask,                       # [B, Hq, Sq, Sk] view, int8 (bool) or float, read when MASK_KIND > 0
    DK,                         # [B, Hk, Sk, D] contiguous output, summed over the GQA group
    DV,                         # [B, Hk, Sk, Dv] contiguous output, summed over the GQA group
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_mb, stride_mh, stride_mq, stride_mk,
    Hq, Hk, group, Sq, Sk, D, Dv,
    scale_hi, scale_lo, dropout_p, dropout_p_lo, seed,   # as in the forward
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,      # query rows per step
    BLOCK_N: tl.constexpr,      # keys of this program
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    ACC: tl.constexpr, DOT_IEEE: tl.constexpr, FP64: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)           # b * Hk + hk
    b = bhk // Hk
    hk = bhk % Hk
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _in_range(offs_d, D, EVEN_D)
    dv_ok = _in_range(offs_dv, Dv, EVEN_DV)
    col_ok = offs_n < Sk
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)            # [N, BLOCK_D]
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_dv[None, :],
                mask=col_ok[:, None] & dv_ok[None, :], other=0.0)          # [N, BLOCK_DV]
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    qk_scale = scale_hi * _LOG2E
    keep_scale = _keep_scale(dropout_p, dropout_p_lo, FP64)
    if CAUSAL:
        # only queries i >= start_n see this block: query blocks before the one holding row
        # start_n are never visited; those from the first multiple of BLOCK_M at or past
        # start_n + BLOCK_N see all of it; the ones in between [lo, mid) are crossed by the diagonal
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    for g in range(0, group):
        h = hk * group + g
        bh = b * Hq + h
        dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, Q + b * stride_qb + h * stride_qh,
                                  DO + b * stride_dob + h * stride_doh, LseS + bh * Sq, Delta + bh * Sq,
                                  Mask + b * stride_mb + h * stride_mh,
                                  stride_qs, stride_dos, stride_mq, stride_mk,
                                  offs_n, offs_d, offs_dv, d_ok, dv_ok, Sq, Sk, lo, Sq, mid,
                                  scale_hi, scale_lo, qk_scale, dropout_p, keep_scale, seed, bh,
                                  CAUSAL, MASK_KIND, DROPOUT, BLOCK_M, ACC, DOT_IEEE, FP64, INTERPRET)
    dk = _mul_split(dk, scale_hi, scale_lo, FP64)
    tl.store(DK + bhk * Sk * D + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None] & d_ok[None, :])
    tl.store(DV + bhk * Sk * Dv + offs_n[:, None] * Dv + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & dv_ok[None, :])


@triton.jit
def _bwd_p_dp(q, do, lse, K_head, V_head, Mask_head,
              stride_ks, stride_vs, stride_mq, stride_mk,
              offs_m, rows_m, offs_d, offs_dv, d_ok, dv_ok, Sk, start_n, diag_from,
              scale_hi, scale_lo, qk_scale, dropout_p, keep_scale, seed, plane,
              CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
              BLOCK_N: tl.constexpr, ACC: tl.constexpr, DOT_IEEE: tl.constexpr,
              FP64: tl.constexpr, INTERPRET: tl.constexpr):
    """P [M, N] and dP = (dO V^T) * Z [M, N] (ACC) of one query block against key block
    start_n, and kT [BLOCK_D, N] (its keys, in the input dtype). q [M, BLOCK_D], do [M, BLOCK_DV];
    lse [M] in the scores' units with +inf for rows whose P is 0. CAUSAL: key blocks from
    diag_from on apply j <= i."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ok = offs_n < Sk
    rows_n = tl.minimum(offs_n, Sk - 1)      # as in the forward: read row Sk - 1, discard
    kT = tl.load(K_head + rows_n[None, :] * stride_ks + offs_d[:, None],
                 mask=d_ok[:, None], other=0.0)                                      # [BLOCK_D, N]
    vT = tl.load(V_head + rows_n[None, :] * stride_vs + offs_dv[:, None],
                 mask=dv_ok[:, None], other=0.0)                                     # [BLOCK_DV, N]
    s = _mm(q, kT, ACC, DOT_IEEE, INTERPRET)                                         # [M, N]
    if FP64:
        s = _mul_split(s, scale_hi, scale_lo, FP64)
    else:
        s = s * qk_scale
    s = _score_mask(s, col_ok[None, :], Mask_head, stride_mq, stride_mk, rows_m, rows_n,
                    False, MASK_KIND, ACC, FP64)
    if CAUSAL:
        if start_n >= diag_from:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
    p = _exp_base(s - lse[:, None], FP64)
    dp = _mm(do, vT, ACC, DOT_IEEE, INTERPRET)                                       # [M, N]
    if DROPOUT:
        keep = _keep_mask(seed, offs_m[:, None], offs_n[None, :], plane, dropout_p)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    return p, dp, kT


@triton.jit
def _bwd_delta_blocks(q, do, lse,
                      K_head, V_head, Mask_head,
                      stride_ks, stride_vs, stride_mq, stride_mk,
                      offs_m, offs_d, offs_dv, d_ok, dv_ok, Sq, Sk, lo, hi, diag_from,
                      scale_hi, scale_lo, qk_scale, dropout_p, keep_scale, seed, plane,
                      CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr, DOT_IEEE: tl.constexpr,
                      FP64: tl.constexpr, INTERPRET: tl.constexpr):
    """Delta [M] = rowsum(P * dP) of one query block over key blocks [lo, hi) (arguments as in
    _bwd_dq_blocks): rowsum(dO * O) with O as the forward accumulated it (ACC), not as it was
    rounded to 16 bits."""
    rows_m = tl.minimum(offs_m, Sq - 1)
    delta = tl.zeros([BLOCK_M], ACC)
    for start_n in range(lo, hi, BLOCK_N):
        p, dp, _ = _bwd_p_dp(q, do, lse, K_head, V_head, Mask_head, stride_ks, stride_vs, stride_mq, stride_mk,
                             offs_m, rows_m, offs_d, offs_dv, d_ok, dv_ok, Sk, start_n, diag_from,
                             scale_hi, scale_lo, qk_scale, dropout_p, keep_scale, seed, plane,
                             CAUSAL, MASK_KIND, DROPOUT, BLOCK_N, ACC, DOT_IEEE, FP64, INTERPRET)
        delta += tl.sum(p * dp, 1)
    return delta


@triton.jit
def _bwd_dq_blocks(dq, q, do, lse, delta,
                   K_head, V_head, Mask_head,
                   stride_ks, stride_vs, stride_mq, stride_mk,
                   offs_m, offs_d, offs_dv, d_ok, dv_ok, Sq, Sk, lo, hi, diag_from,
                   scale_hi, scale_lo, qk_scale, dropout_p, keep_scale, seed, plane,
                   CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                   BLOCK_N: tl.constexpr, ACC: tl.constexpr, DOT_IEEE: tl.constexpr,
                   FP64: tl.constexpr, INTERPRET: tl.constexpr):
    """dQ [M, BLOCK_D] (ACC, before the final * scale) of one query block over key blocks
    [lo, hi). q [M, BLOCK_D], do [M, BLOCK_DV]; lse [M] in the scores' units with +inf for rows
    whose P is 0; delta [M]. CAUSAL: key blocks from diag_from on apply j <= i."""
    rows_m = tl.minimum(offs_m, Sq - 1)
    for start_n in range(lo, hi, BLOCK_N):
        p, dp, kT = _bwd_p_dp(q, do, lse, K_head, V_head, Mask_head, stride_ks, stride_vs, stride_mq, stride_mk,
                              offs_m, rows_m, offs_d, offs_dv, d_ok, dv_ok, Sk, start_n, diag_from,
                              scale_hi, scale_lo, qk_scale, dropout_p, keep_scale, seed, plane,
                              CAUSAL, MASK_KIND, DROPOUT, BLOCK_N, ACC, DOT_IEEE, FP64, INTERPRET)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(kT.dtype), tl.trans(kT), ACC, DOT_IEEE, INTERPRET)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,                          # [B, Hq, Sq, D], unit stride in D
    K,                          # [B, Hk, Sk, D], unit stride in D
    V,                          # [B, Hk, Sk, Dv], unit stride in Dv
    DO,                         # [B, Hq, Sq, Dv], unit stride in Dv
    LseS,                       # [B, Hq, Sq] contiguous ACC: lse in the scores' units, +inf if no key is visible
    Delta,                      # [B, Hq, Sq] contiguous ACC, rowsum(dO * O)
    Mask,                       # [B, Hq, Sq, Sk] view, int8 (bool) or float, read when MASK_KIND > 0
    DQ,                         # [B, Hq, Sq, D] contiguous output
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_mb, stride_mh, stride_mq, stride_mk,
    Hq, group, Sq, Sk, D, Dv,
    scale_hi, scale_lo, dropout_p, dropout_p_lo, seed,   # as in the forward
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,      # query rows of this program
    BLOCK_N: tl.constexpr,      # keys per step
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    ACC: tl.constexpr, DOT_IEEE: tl.constexpr, FP64: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _in_range(offs_d, D, EVEN_D)
    dv_ok = _in_range(offs_dv, Dv, EVEN_DV)
    row_ok = offs_m < Sq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)           # [M, BLOCK_D]
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_dv[None, :],
                 mask=row_ok[:, None] & dv_ok[None, :], other=0.0)        # [M, BLOCK_DV]
    lse = tl.load(LseS + bh * Sq + offs_m, mask=row_ok, other=float("inf"))   # +inf: P = 0
    delta = tl.load(Delta + bh * Sq + offs_m, mask=row_ok, other=0.0)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    Mask_head = Mask + b * stride_mb + h * stride_mh
    qk_scale = scale_hi * _LOG2E
    keep_scale = _keep_scale(dropout_p, dropout_p_lo, FP64)
    if CAUSAL:   # as in the forward: blocks [mid, hi) are crossed by the diagonal
        hi = tl.minimum(Sk, start_m + BLOCK_M)
        mid = tl.minimum((start_m // BLOCK_N) * BLOCK_N, hi)
    else:
        hi = Sk
        mid = Sk
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    dq = _bwd_dq_blocks(dq, q, do, lse, delta, K_head, V_head, Mask_head,
                        stride_ks, stride_vs, stride_mq, stride_mk,
                        offs_m, offs_d, offs_dv, d_ok, dv_ok, Sq, Sk, 0, hi, mid,
                        scale_hi, scale_lo, qk_scale, dropout_p, keep_scale, seed, bh,
                        CAUSAL, MASK_KIND, DROPOUT, BLOCK_N, ACC, DOT_IEEE, FP64, INTERPRET)
    dq = _mul_split(dq, scale_hi, scale_lo, FP64)
    tl.store(DQ + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_delta_kernel(
    Q, K, V, DO, LseS,          # as in _attn_bwd_dq_kernel
    Delta,                      # [B, Hq, Sq] contiguous ACC output: rowsum(P * dP)
    Mask,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_mb, stride_mh, stride_mq, stride_mk,
    Hq, group, Sq, Sk, D, Dv,
    scale_hi, scale_lo, dropout_p, dropout_p_lo, seed,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    ACC: tl.constexpr, DOT_IEEE: tl.constexpr, FP64: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Delta for 16-bit data, before the dK/dV and dQ kernels: rowsum(P * dP) over the keys the
    dQ kernel visits, the same sum as rowsum(dO * O) with O as the forward accumulated it. O as
    stored carries 8 (bf16) or 11 (fp16) bits, and Delta from it errs by ~2^-9 |dO| |O| (bf16):
    more than dS = P * (dP - Delta) survives where the softmax is peaked (dq/dk were up to 38x
    the accuracy rule's allowance: tests/test_attention.py, attention sinks). A kernel of its own
    rather than a first sweep of the dQ kernel, which then spilled (D = 256 with dropout, gfx942)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _in_range(offs_d, D, EVEN_D)
    dv_ok = _in_range(offs_dv, Dv, EVEN_DV)
    row_ok = offs_m < Sq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)           # [M, BLOCK_D]
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_dv[None, :],
                 mask=row_ok[:, None] & dv_ok[None, :], other=0.0)        # [M, BLOCK_DV]
    lse = tl.load(LseS + bh * Sq + offs_m, mask=row_ok, other=float("inf"))   # +inf: P = 0
    if CAUSAL:   # as in the dQ kernel
        hi = tl.minimum(Sk, start_m + BLOCK_M)
        mid = tl.minimum((start_m // BLOCK_N) * BLOCK_N, hi)
    else:
        hi = Sk
        mid = Sk
    delta = _bwd_delta_blocks(q, do, lse, K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh,
                              Mask + b * stride_mb + h * stride_mh, stride_ks, stride_vs, stride_mq, stride_mk,
                              offs_m, offs_d, offs_dv, d_ok, dv_ok, Sq, Sk, 0, hi, mid,
                              scale_hi, scale_lo, scale_hi * _LOG2E, dropout_p,
                              _keep_scale(dropout_p, dropout_p_lo, FP64), seed, bh,
                              CAUSAL, MASK_KIND, DROPOUT, BLOCK_M, BLOCK_N, ACC, DOT_IEEE, FP64, INTERPRET)
    tl.store(Delta + bh * Sq + offs_m, delta, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Decode (flash-decoding)


@triton.jit
def _attn_decode_split_kernel(
    Q,                          # [B, Hq, Sq, D] new queries, unit stride in D
    Kc,                         # [B, Hk, S_max, D] key cache, unit stride in D
    Vc,                         # [B, Hk, S_max, Dv] value cache, unit stride in Dv
    SeqLens,                    # [B] int32: valid cache length L_b (clamped to S_max here)
    Mask,                       # [B, Hq, Sq, S_max] view, int8 (bool) or float, read when MASK_KIND > 0
    OPart,                      # [B * Hq * Sq, splits, Dv] contiguous ACC: each split's normalized output
    LsePart,                    # [B * Hq * Sq, splits] contiguous ACC: each split's log-sum-exp (natural)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mh, stride_mq, stride_mk,
    Hk, group, Sq, S_max, D, Dv,   # (Hq = Hk * group; group * Sq query rows share one kv head)
    splits,                     # programs along the keys of one (batch, kv head)
    scale_hi, scale_lo,         # the softmax scale split into fp32 head + tail (tail used for fp64)
    MASK_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,      # query rows per program (>= 16 for tl.dot; rows padded)
    BLOCK_N: tl.constexpr,      # keys per step
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    ACC: tl.constexpr, DOT_IEEE: tl.constexpr, FP64: tl.constexpr, INTERPRET: tl.constexpr,
):
    split = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)           # b * Hk + hk
    b = bhk // Hk
    hk = bhk % Hk
    rows = group * Sq
    offs_r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)   # row r = g * Sq + i
    row_ok = offs_r < rows
    rows_r = tl.minimum(offs_r, rows - 1)        # padding rows repeat the last one; not stored
    g = rows_r // Sq
    i = rows_r % Sq
    h = (hk * group + g).to(tl.int64)             # [M] query head of each row
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _in_range(offs_d, D, EVEN_D)
    dv_ok = _in_range(offs_dv, Dv, EVEN_DV)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)           # [M, BLOCK_D]
    length = tl.minimum(tl.load(SeqLens + b), S_max)
    position = length - Sq + i                    # [M] cache position of each new query
    # this split's keys: a BLOCK_N-aligned share of [0, length)
    chunk = tl.cdiv(tl.cdiv(length, splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(length, lo + chunk)
    K_head = Kc + b * stride_kb + hk * stride_kh
    V_head = Vc + b * stride_vb + hk * stride_vh
    Mask_rows = Mask + b * stride_mb + h[:, None] * stride_mh + i[:, None] * stride_mq   # [M, 1]
    qk_scale = scale_hi * _LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < hi
        rows_n = tl.minimum(offs_n, hi - 1)      # keys past hi: read row hi - 1, discard the score
        kT = tl.load(K_head + rows_n[None, :] * stride_ks + offs_d[:, None],
                     mask=d_ok[:, None], other=0.0)        # [BLOCK_D, N]
        s = _mm(q, kT, ACC, DOT_IEEE, INTERPRET)                                     # [M, N]
        if FP64:
            s = _mul_split(s, scale_hi, scale_lo, FP64)
        else:
            s = s * qk_scale
        visible = col_ok[None, :] & (offs_n[None, :] <= position[:, None])
        if MASK_KIND == 1:
            bits = tl.load(Mask_rows + rows_n[None, :] * stride_mk)
            visible = visible & (bits != 0)
        elif MASK_KIND == 2:
            bias = tl.load(Mask_rows + rows_n[None, :] * stride_mk).to(ACC)
            if FP64:
                s = s + bias
            else:
                s = s + bias * _LOG2E
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = _exp_base(s - m_use[:, None], FP64)
        alpha = _exp_base(m_i - m_use, FP64)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_head + rows_n[:, None] * stride_vs + offs_dv[None, :],
                    mask=dv_ok[None, :], other=0.0)       # [N, BLOCK_DV]
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, ACC, DOT_IEEE, INTERPRET)
        m_i = m_new

    empty = l_i == 0.0                            # no visible key in this split (or none at all)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if FP64:
        lse = m_i + tl.log(l_safe)
    else:
        lse = (m_i + tl.log2(l_safe)) * _LN2
    lse = tl.where(empty, float("-inf"), lse)
    row = ((b * Hk * group + h) * Sq + i) * splits + split                         # [M] int64
    tl.store(OPart + row[:, None] * Dv + offs_dv[None, :], out,
             mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(LsePart + row, lse, mask=row_ok)


@triton.jit
def _attn_decode_combine_kernel(
    OPart,                      # [R, splits, Dv] contiguous ACC partial outputs, R = B * Hq * Sq
    LsePart,                    # [R, splits] contiguous ACC partial log-sum-exps
    Out,                        # [R, Dv] contiguous output ([B, Hq, Sq, Dv])
    Lse,                        # [R] contiguous ACC output
    splits, Dv,
    BLOCK_S: tl.constexpr,      # next power of two >= splits
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    split_ok = offs_s < splits
    dv_ok = offs_dv < Dv
    lse = tl.load(LsePart + row * splits + offs_s, mask=split_ok, other=float("-inf")).to(ACC)
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)   # every split empty: weights exp(-inf) = 0
    weight = tl.exp(lse - top)                        # [S]
    total = tl.sum(weight, 0)
    part = tl.load(OPart + (row * splits + offs_s[:, None]) * Dv + offs_dv[None, :],
                   mask=split_ok[:, None] & dv_ok[None, :], other=0.0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(part * weight[:, None], 0) / total_safe
    tl.store(Out + row * Dv + offs_dv, out.to(Out.dtype.element_ty), mask=offs_dv < Dv)
    tl.store(Lse + row, tl.where(total == 0.0, float("-inf"), top + tl.log(total_safe)))


# ---------------------------------------------------------------------------------------------
# Block sizes
#
# GPU: a short list of (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per (head-dim block,
# dtype), autotuned per (head dims, causal, dtypes) by triton.autotune (the dtypes of every
# tensor argument are part of its key). Every candidate is compiled for sm80/sm90/gfx942 by
# gpu_compile_cases() and must not spill there. The interpreter gets exactly one config
# (autotuning more than one needs a GPU), small enough to exercise several blocks on short
# sequences and BLOCK_M != BLOCK_N around the diagonal.

_INTERPRET_FWD = (32, 16, 4, 1)
_INTERPRET_DKDV = (16, 32, 4, 1)      # (BLOCK_M query step, BLOCK_N keys held)
_INTERPRET_DQ = (32, 16, 4, 1)


def _is_16bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


# The lists below were chosen with `python -m engine.readiness --kernels attention`: every entry
# compiles for sm80, sm90 and gfx942 without spills (gfx942: 64 KB of shared memory, 256 VGPRs at
# 8 warps, ~100 SGPRs) and, for 16-bit data, with wgmma on sm90 (>= 64 rows per warpgroup).
# "dropout" lists serve the kernels with dropout on: Philox keeps 4 words per score live.


def fwd_candidates(block_d: int, dtype: torch.dtype, dropout: bool) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the forward may use on a GPU. block_d: the larger
    of the padded head dims of q/k and v."""
    if _is_16bit(dtype):
        if block_d <= 64:
            return [(64, 32, 4, 3)] if dropout else [(128, 64, 4, 3), (64, 64, 4, 3)]
        if block_d <= 128:
            return [(64, 32, 4, 2)] if dropout else [(128, 32, 8, 3), (64, 64, 4, 2)]
        return [(64, 16, 4, 2)] if dropout else [(64, 32, 4, 2)]
    if dtype == torch.float32:     # exact fp32 products (FMA): small tiles
        if block_d <= 64:
            return [(32, 32, 4, 2), (64, 16, 4, 2)]
        if block_d <= 128:
            return [(32, 16, 4, 2)] if dropout else [(32, 16, 4, 2), (32, 32, 8, 2)]
        return [(32, 16, 4, 2)]
    return [(16, 16, 4, 1)]        # fp64


def keep_candidates(block_d: int, dtype: torch.dtype) -> list[tuple[int, int, int, int]]:
    """The forward's debug path (dropout mask returned, extra stores): one config."""
    if _is_16bit(dtype):
        return [(64, 32, 4, 3)] if block_d <= 64 else [(64, 16, 4, 2)]
    return fwd_candidates(block_d, dtype, True)[-1:]


def dkdv_candidates(block_d: int, dtype: torch.dtype, dropout: bool) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M query step, BLOCK_N keys held, num_warps, num_stages) for the dK/dV kernel,
    which holds K, V, dK and dV tiles of BLOCK_N x head dim for its whole loop."""
    if _is_16bit(dtype):
        if block_d <= 64:
            return [(32, 64, 4, 3), (16, 128, 8, 2)] if dropout else [(32, 128, 8, 2), (32, 64, 4, 3)]
        if block_d <= 128:
            return [(16, 64, 8, 2), (16, 128, 8, 2)] if dropout else [(32, 64, 4, 3), (16, 128, 8, 2)]
        # D=256 with dropout: 64 keys spill, and 32 keys are below wgmma's 64 rows (sm90: mma)
        return [(16, 32, 8, 2)] if dropout else [(16, 64, 8, 2)]
    if dtype == torch.float32:
        if block_d <= 64:
            return [(32, 32, 4, 2)]
        return [(16, 32, 4, 2)] if block_d <= 128 else [(16, 16, 4, 2)]
    return [(16, 16, 4, 1)]


def dq_candidates(block_d: int, dtype: torch.dtype, dropout: bool) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M query rows held, BLOCK_N key step, num_warps, num_stages) for the dQ kernel."""
    if _is_16bit(dtype):
        if block_d <= 64:
            return [(64, 32, 4, 3), (128, 16, 8, 2)] if dropout else [(128, 32, 8, 3), (64, 32, 4, 3)]
        if block_d <= 128:
            return [(64, 32, 4, 3), (128, 16, 8, 2)]
        return [(64, 16, 8, 1)] if dropout else [(64, 16, 4, 2)]
    if dtype == torch.float32:
        return [(32, 32, 4, 2)] if block_d <= 64 else [(32, 16, 4, 2)]
    return [(16, 16, 4, 1)]


def decode_block_m(rows: int, block_d: int, dtype: torch.dtype) -> int:
    """Query rows (GQA group x new queries) per decode program: >= 16 for tl.dot; at most 32
    for 16-bit data up to head dim 128, else 16 (larger tiles spill: scalar registers on gfx942,
    the FMA products of fp32 on sm90)."""
    return min(32 if _is_16bit(dtype) and block_d <= 128 else 16, max(16, next_power_of_2(rows)))


def decode_config(block_m: int, block_d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the decode split kernel: memory bound, one config."""
    if INTERPRET:
        return 16, 4, 1
    if _is_16bit(dtype):
        return (64, 4, 2) if block_m == 16 and block_d <= 128 else (32, 4, 2)
    if dtype == torch.float32:   # exact products on FMA units: small tiles (ptxas spills at 4 warps
        return (16, 8, 1) if block_d <= 128 else (16, 4, 2)   # for D <= 128, at 8 for D = 256)
    return 16, 4, 1


def _configs(candidates, interpret_config) -> list:
    def config(c):
        return triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1]}, num_warps=c[2], num_stages=c[3])
    if INTERPRET:
        return [config(interpret_config)]
    seen = []
    for dtype in (torch.float16, torch.float32, torch.float64):
        for block_d in (16, 32, 64, 128, 256):
            for dropout in (False, True):
                seen += [c for c in candidates(block_d, dtype, dropout) if c not in seen]
    return [config(c) for c in seen]


def _pruner(candidates):
    def prune(configs, named_args, **kwargs):
        block_d = max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"])
        dtype = named_args["Q"].dtype
        if kwargs.get("RETURN_KEEP", False):
            wanted = keep_candidates(block_d, dtype)
        else:
            wanted = candidates(block_d, dtype, kwargs["DROPOUT"])
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
    return {"early_config_prune": prune}


# triton.autotune adds the dtypes of every tensor argument to this key
_TUNE_KEY = ["BLOCK_D", "BLOCK_DV", "EVEN_D", "EVEN_DV", "CAUSAL", "DROPOUT"]
_FWD_TUNE_KEY = _TUNE_KEY + ["RETURN_KEEP"]
_attn_fwd = triton.autotune(_configs(fwd_candidates, _INTERPRET_FWD), key=_FWD_TUNE_KEY,
                            prune_configs_by=_pruner(fwd_candidates))(_attn_fwd_kernel)
_attn_bwd_dkdv = triton.autotune(_configs(dkdv_candidates, _INTERPRET_DKDV), key=_TUNE_KEY,
                                 prune_configs_by=_pruner(dkdv_candidates))(_attn_bwd_dkdv_kernel)
_attn_bwd_dq = triton.autotune(_configs(dq_candidates, _INTERPRET_DQ), key=_TUNE_KEY,
                               prune_configs_by=_pruner(dq_candidates))(_attn_bwd_dq_kernel)
# the delta kernel holds and streams the dQ kernel's tiles (without its accumulator): its configs
_attn_bwd_delta = triton.autotune(_configs(dq_candidates, _INTERPRET_DQ), key=_TUNE_KEY,
                                  prune_configs_by=_pruner(dq_candidates))(_attn_bwd_delta_kernel)


def _head_block(d: int) -> int:
    """Head dims are padded (masked loads) to a power of two, at least 16 for tl.dot."""
    return max(16, next_power_of_2(d))


def _preprocess_block_m(block_dv: int) -> int:
    return max(1, min(64, 2048 // block_dv))


# ---------------------------------------------------------------------------------------------
# Launchers


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


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  causal: bool, scale: float, dropout_p: float, seed: int, return_dropout_mask: bool):
    """softmax(q k^T * scale + mask) v with flash-attention tiling.

    q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv] (unit last stride, Hq % Hk == 0);
    mask None or a [B, Hq, Sq, Sk] stride-0-broadcast view, bool or float. Returns
    (out [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq] fp32 (fp64 for fp64), keep bool
    [B, Hq, Sq, Sk] when return_dropout_mask and dropout_p > 0, else None)."""
    b, hq, sq, d = q.shape
    hk, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    acc_dtype, acc_tl, dot_ieee, fp64 = _acc_types(q.dtype)
    out = torch.empty((b, hq, sq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=acc_dtype, device=q.device)
    dropout = dropout_p > 0
    return_keep = bool(return_dropout_mask and dropout)
    keep = torch.empty((b, hq, sq, sk), dtype=torch.bool, device=q.device) if return_keep else None
    if b * hq * sq == 0:
        return out, lse, keep
    mask_kind, mask_arg, mask_strides = _mask_args(mask, q)
    scale_hi, scale_lo = _split(scale)
    p_hi, p_lo = _split(dropout_p)
    block_d, block_dv = _head_block(d), _head_block(dv)
    _attn_fwd[lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * hq)](
        q, k, v, mask_arg, out, lse, keep.view(torch.int8) if return_keep else lse,
        *_stride3(q), *_stride3(k), *_stride3(v), *mask_strides,
        hq, hq // hk, sq, sk, d, dv,
        scale_hi, scale_lo, p_hi, p_lo, _seed(seed),
        CAUSAL=bool(causal), MASK_KIND=mask_kind, DROPOUT=dropout, RETURN_KEEP=return_keep,
        BLOCK_D=block_d, BLOCK_DV=block_dv, EVEN_D=d == block_d, EVEN_DV=dv == block_dv,
        ACC=acc_tl, DOT_IEEE=dot_ieee, FP64=fp64, INTERPRET=INTERPRET,
    )
    return out, lse, keep


def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
                  scale: float, dropout_p: float, seed: int):
    """Gradients of attention_fwd, P recomputed from lse [B, Hq, Sq].

    grad_out, out [B, Hq, Sq, Dv]; q, k, v, mask as in attention_fwd. Returns (dq [B, Hq, Sq, D],
    dk [B, Hk, Sk, D], dv [B, Hk, Sk, Dv]), contiguous in the inputs' dtypes, dk/dv summed over
    each GQA group."""
    b, hq, sq, d = q.shape
    hk, sk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    acc_dtype, acc_tl, dot_ieee, fp64 = _acc_types(q.dtype)
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    dq = torch.empty((b, hq, sq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, hk, sk, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, hk, sk, dv_dim), dtype=v.dtype, device=q.device)
    lse = lse.contiguous()
    delta = torch.empty((b, hq, sq), dtype=acc_dtype, device=q.device)
    lse_s = torch.empty((b, hq, sq), dtype=acc_dtype, device=q.device)
    block_d, block_dv = _head_block(d), _head_block(dv_dim)
    # Delta = rowsum(dO * O) for fp32/fp64 (preprocess); for 16-bit data rowsum(P * dP) (delta kernel)
    delta_from_p = _is_16bit(q.dtype)
    if b * hq * sq > 0:
        block_m = _preprocess_block_m(block_dv)
        _attn_bwd_preprocess_kernel[(triton.cdiv(sq, block_m), b * hq)](
            out, grad_out, lse, delta, lse_s, *_stride3(out), *_stride3(grad_out), hq, sq, dv_dim,
            BLOCK_M=block_m, BLOCK_DV=block_dv, ACC=acc_tl, FP64=fp64, DELTA_FROM_P=delta_from_p, num_warps=4)
    mask_kind, mask_arg, mask_strides = _mask_args(mask, q)
    scale_hi, scale_lo = _split(scale)
    p_hi, p_lo = _split(dropout_p)
    common = dict(CAUSAL=bool(causal), MASK_KIND=mask_kind, DROPOUT=dropout_p > 0,
                  BLOCK_D=block_d, BLOCK_DV=block_dv, EVEN_D=d == block_d, EVEN_DV=dv_dim == block_dv,
                  ACC=acc_tl, DOT_IEEE=dot_ieee, FP64=fp64, INTERPRET=INTERPRET)
    scalars = (scale_hi, scale_lo, p_hi, p_lo, _seed(seed))
    if delta_from_p and b * hq * sq > 0:
        _attn_bwd_delta[lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * hq)](
            q, k, v, grad_out, lse_s, delta, mask_arg,
            *_stride3(q), *_stride3(k), *_stride3(v), *_stride3(grad_out), *mask_strides,
            hq, hq // hk, sq, sk, d, dv_dim, *scalars, **common)
    if b * hk * sk > 0:
        _attn_bwd_dkdv[lambda meta: (triton.cdiv(sk, meta["BLOCK_N"]), b * hk)](
            q, k, v, grad_out, lse_s, delta, mask_arg, dk, dv,
            *_stride3(q), *_stride3(k), *_stride3(v), *_stride3(grad_out), *mask_strides,
            hq, hk, hq // hk, sq, sk, d, dv_dim, *scalars, **common)
    if b * hq * sq > 0:
        _attn_bwd_dq[lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * hq)](
            q, k, v, grad_out, lse_s, delta, mask_arg, dq,
            *_stride3(q), *_stride3(k), *_stride3(v), *_stride3(grad_out), *mask_strides,
            hq, hq // hk, sq, sk, d, dv_dim, *scalars, **common)
    return dq, dk, dv


def _machine_programs(device: torch.device) -> int:
    """Programs that fill the machine: two per SM on a GPU; in the interpreter (a Python loop
    per program) a small pretend machine, enough to exercise several splits."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def decode_splits(batch_kv_heads: int, row_tiles: int, s_max: int, block_n: int, device) -> int:
    """How many programs share the keys of one (batch, kv head): enough to fill the machine,
    at most one per BLOCK_N keys of the cache, at most 128."""
    programs = max(1, batch_kv_heads * row_tiles)
    wanted = triton.cdiv(_machine_programs(device), programs)
    return max(1, min(wanted, triton.cdiv(max(s_max, 1), block_n), 128))


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor, mask: Optional[torch.Tensor], scale: float):
    """Attention of Sq new queries against a KV cache (flash-decoding).

    q [B, Hq, Sq, D], k_cache [B, Hk, S_max, D], v_cache [B, Hk, S_max, Dv] (unit last stride),
    cache_seqlens int32 [B] on q's device (valid lengths, clamped to S_max); query i sits at
    position L - Sq + i (engine.reference.decode_mask); mask None or a [B, Hq, Sq, S_max] view.
    Returns (out [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq] fp32 (fp64 for fp64))."""
    b, hq, sq, d = q.shape
    hk, s_max, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    acc_dtype, acc_tl, dot_ieee, fp64 = _acc_types(q.dtype)
    out = torch.empty((b, hq, sq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=acc_dtype, device=q.device)
    if b * hq * sq == 0:
        return out, lse
    group = hq // hk
    rows = group * sq
    block_d, block_dv = _head_block(d), _head_block(dv)
    block_m = decode_block_m(rows, max(block_d, block_dv), q.dtype)
    row_tiles = triton.cdiv(rows, block_m)
    block_n, warps, stages = decode_config(block_m, max(block_d, block_dv), q.dtype)
    splits = decode_splits(b * hk, row_tiles, s_max, block_n, q.device)
    o_part = torch.empty((b * hq * sq, splits, dv), dtype=acc_dtype, device=q.device)
    lse_part = torch.empty((b * hq * sq, splits), dtype=acc_dtype, device=q.device)
    mask_kind, mask_arg, mask_strides = _mask_args(mask, q)
    scale_hi, scale_lo = _split(scale)
    seqlens = cache_seqlens if cache_seqlens.dtype == torch.int32 else cache_seqlens.to(torch.int32)
    _attn_decode_split_kernel[(splits, b * hk, row_tiles)](
        q, k_cache, v_cache, seqlens, mask_arg, o_part, lse_part,
        *_stride3(q), *_stride3(k_cache), *_stride3(v_cache), *mask_strides,
        hk, group, sq, s_max, d, dv, splits, scale_hi, scale_lo,
        MASK_KIND=mask_kind, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        EVEN_D=d == block_d, EVEN_DV=dv == block_dv, ACC=acc_tl, DOT_IEEE=dot_ieee, FP64=fp64,
        INTERPRET=INTERPRET, num_warps=warps, num_stages=stages)
    _attn_decode_combine_kernel[(b * hq * sq,)](
        o_part, lse_part, out, lse, splits, dv,
        BLOCK_S=next_power_of_2(splits), BLOCK_DV=block_dv, ACC=acc_tl, num_warps=4)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Limits


def _span(t: torch.Tensor) -> int:
    """Largest element offset inside one [*, *, S, D] head: indices there are int32."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape[2:], t.stride()[2:]))


def _common_limits(q, k, v, mask) -> list[str]:
    reasons = dtype_reason(q.dtype, DTYPES)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"query, key and value dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    d, dv = q.shape[-1], v.shape[-1]
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        reasons.append(f"head dim {max(d, dv)} > {MAX_HEAD_DIM} (tiles held in registers)")
    if d == 0 or dv == 0:
        reasons.append("head dim 0")
    if any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in (q, k, v)):
        reasons.append("q, k and v need unit stride in the last dim")
    if mask is not None:
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            reasons.append(f"mask dtype {mask.dtype} is neither bool nor floating point")
        if mask.dim() != 4:
            reasons.append("mask must be a [B, H, Sq, Sk] (broadcast) view")
    for name, t in (("query", q), ("key", k), ("value", v)) + ((("mask", mask),) if mask is not None else ()):
        if _span(t) > _INT32_MAX:
            reasons.append(f"{name} spans more than 2^31 elements per head (int32 indexing)")
    if max(q.shape[2], k.shape[2]) * max(d, dv) > _INT32_MAX:
        reasons.append("a head of the contiguous outputs (dq, dk, dv, out) spans more than 2^31 elements")
    if q.shape[0] * q.shape[1] > _INT32_MAX:
        reasons.append("more than 2^31 (batch, head) pairs")
    return reasons


def supports(args) -> list[str]:
    """[] when attention_fwd/attention_bwd can run this call (engine.ops.attention.AttentionArgs),
    else every reason they cannot.
    Limits: dtypes fp16/bf16/fp32/fp64 (q, k, v alike); head dims 1..256 (the Q or K/V tile of
    a program stays in registers; padded to a power of two); mask bool or float; every index
    within one (batch, head) fits int32; the debug keep mask needs Sq * Sk < 2^31."""
    reasons = _common_limits(args.q, args.k, args.v, args.mask)
    if args.return_dropout_mask and args.dropout_p > 0 and args.q.shape[2] * args.k.shape[2] > _INT32_MAX:
        reasons.append("the returned dropout mask needs Sq * Sk < 2^31 (int32 indexing)")
    return reasons


def supports_decode(args) -> list[str]:
    """[] when attention_decode can run this call (engine.ops.attention.DecodeArgs), else every
    reason it cannot. Limits as supports(), plus cache_seqlens is an integer tensor [B] on q's
    device."""
    q = args.q
    reasons = _common_limits(q, args.k_cache, args.v_cache, args.mask)
    if q.dtype == torch.float64 and q.device.type != "cpu" and not compat.FP64_DECODE_ON_GPUS:
        reasons.append(f"triton {triton.__version__} cannot compile fp64 decode for GPUs (kernels/compat.py)")
    if args.cache_seqlens.device != q.device:
        reasons.append(f"cache_seqlens is on {args.cache_seqlens.device}, not {q.device}")
    if args.cache_seqlens.dtype not in (torch.int32, torch.int64):
        reasons.append(f"cache_seqlens dtype {args.cache_seqlens.dtype} is not int32 or int64")
    return reasons


# ---------------------------------------------------------------------------------------------
# Ahead-of-time GPU compile cases


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _mask_dtype(kind: int, dtype: torch.dtype):
    return {MASK_NONE: dtype, MASK_BOOL: torch.int8, MASK_FLOAT: dtype}[kind]


def _variant_name(causal: bool, mask_kind: int, dropout: bool) -> str:
    parts = ["causal" if causal else "full", ["nomask", "boolmask", "floatmask"][mask_kind]]
    return " ".join(parts + (["dropout"] if dropout else []))


def gpu_compile_cases() -> list[GpuCompileCase]:
    """Every configuration the launchers use, for python -m engine.readiness: each block-size
    candidate of the forward, dK/dV and dQ kernels at head dims 64 and 128 (fp16, bf16), 16, 80,
    96, 256 (fp16; 256 in bf16 too), fp32 at 64/128/256 and fp64 at 64, each in the plain variant
    (no mask, no dropout) and the heaviest one (causal, float mask, dropout; the forward also
    with the debug keep mask; the 16-bit Delta kernel with the dQ kernel's blocks), the backward
    preprocess, and the decode kernels. 16-bit matrix products must use tensor cores (wgmma on
    sm90) wherever the tile has the 64 rows wgmma needs. Scalars are representative values of a
    real call (they decide Triton's divisibility-by-16 specialization)."""
    cases = []
    s, seed, h = 1024, 2**40, 8
    variants = [(False, MASK_NONE, False), (True, MASK_FLOAT, True)]
    plan = [(dt, d) for dt in (torch.float16, torch.bfloat16) for d in (64, 128)]
    plan += [(torch.float16, d) for d in (16, 80, 96, 256)] + [(torch.bfloat16, 256)]
    plan += [(torch.float32, d) for d in (64, 128, 256)] + [(torch.float64, 64)]
    for dtype, d in plan:
        block_d = _head_block(d)
        acc_dtype, acc_tl, dot_ieee, fp64 = _acc_types(dtype)
        tc = _is_16bit(dtype)
        dname = _dtype_name(dtype)
        strides_q = (h * s * d, s * d, d)          # contiguous [B, H, S, D]
        for causal, mask_kind, dropout in variants:
            vname = _variant_name(causal, mask_kind, dropout)
            mdt = _mask_dtype(mask_kind, dtype)
            mstr = (0, 0, s, 1) if mask_kind else (0, 0, 0, 0)     # a [Sq, Sk] mask
            flags = dict(CAUSAL=causal, MASK_KIND=mask_kind, DROPOUT=dropout, BLOCK_D=block_d, BLOCK_DV=block_d,
                         EVEN_D=d == block_d, EVEN_DV=d == block_d, ACC=acc_tl, DOT_IEEE=dot_ieee, FP64=fp64,
                         INTERPRET=False)
            scalars = (0.125, 0.0, 0.1 if dropout else 0.0, 0.0, seed if dropout else 0)
            fwd_plan = [(c, False) for c in fwd_candidates(block_d, dtype, dropout)]
            fwd_plan += [(c, True) for c in keep_candidates(block_d, dtype)] if dropout else []
            for (bm, bn, warps, stages), return_keep in fwd_plan:
                cases.append(GpuCompileCase(
                    name=f"attention_fwd {dname} D={d} {vname}{' keep' if return_keep else ''} "
                         f"M={bm} N={bn} w={warps} s={stages}",
                    kernel=_attn_fwd_kernel,
                    args=(dtype, dtype, dtype, mdt, dtype, acc_dtype, torch.int8,
                          *strides_q, *strides_q, *strides_q, *mstr, h, 1, s, s, d, d, *scalars),
                    constexprs=dict(flags, RETURN_KEEP=return_keep, BLOCK_M=bm, BLOCK_N=bn),
                    grid=(s // bm, 8 * h), num_warps=warps, num_stages=stages,
                    expects_tensor_cores=tc and bm >= 64))
            bwd_args = (dtype, dtype, dtype, dtype, acc_dtype, acc_dtype, mdt)
            strides4 = (*strides_q, *strides_q, *strides_q, *strides_q, *mstr)
            for bm, bn, warps, stages in dkdv_candidates(block_d, dtype, dropout):
                cases.append(GpuCompileCase(
                    name=f"attention_bwd_dkdv {dname} D={d} {vname} M={bm} N={bn} w={warps} s={stages}",
                    kernel=_attn_bwd_dkdv_kernel,
                    args=(*bwd_args, dtype, dtype, *strides4, h, h, 1, s, s, d, d, *scalars),
                    constexprs=dict(flags, BLOCK_M=bm, BLOCK_N=bn),
                    grid=(s // bn, 8 * h), num_warps=warps, num_stages=stages,
                    expects_tensor_cores=tc and bn >= 64))
            for bm, bn, warps, stages in dq_candidates(block_d, dtype, dropout):
                cases.append(GpuCompileCase(
                    name=f"attention_bwd_dq {dname} D={d} {vname} M={bm} N={bn} w={warps} s={stages}",
                    kernel=_attn_bwd_dq_kernel,
                    args=(*bwd_args, dtype, *strides4, h, 1, s, s, d, d, *scalars),
                    constexprs=dict(flags, BLOCK_M=bm, BLOCK_N=bn),
                    grid=(s // bm, 8 * h), num_warps=warps, num_stages=stages,
                    expects_tensor_cores=tc and bm >= 64))
                if tc:
                    cases.append(GpuCompileCase(
                        name=f"attention_bwd_delta {dname} D={d} {vname} M={bm} N={bn} w={warps} s={stages}",
                        kernel=_attn_bwd_delta_kernel,
                        args=(*bwd_args, *strides4, h, 1, s, s, d, d, *scalars),
                        constexprs=dict(flags, BLOCK_M=bm, BLOCK_N=bn),
                        grid=(s // bm, 8 * h), num_warps=warps, num_stages=stages,
                        expects_tensor_cores=bm >= 64))
        block_m = _preprocess_block_m(block_d)
        cases.append(GpuCompileCase(
            name=f"attention_bwd_preprocess {dname} Dv={d}",
            kernel=_attn_bwd_preprocess_kernel,
            args=(dtype, dtype, acc_dtype, acc_dtype, acc_dtype, *strides_q, *strides_q, h, s, d),
            constexprs=dict(BLOCK_M=block_m, BLOCK_DV=block_d, ACC=acc_tl, FP64=fp64, DELTA_FROM_P=tc),
            grid=(s // block_m, 8 * h), num_warps=4))
    cases += _decode_compile_cases()
    return cases


def _decode_compile_cases() -> list[GpuCompileCase]:
    """The decode split kernel per dtype and head dim for the row tiles GQA produces: 1 query of
    an MHA head, a group of 8 heads x 1 query (with a bool padding mask), 8 x 4 and 8 x 8
    (two or four row tiles); and the combine kernel. Rows are padded to at least 16 for tl.dot,
    so the products use mma, not sm90's 64-row wgmma (decode is bound by reading the cache)."""
    cases = []
    s_max, hk = 4096, 8
    dtypes = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if compat.FP64_DECODE_ON_GPUS else ())
    for dtype in dtypes:
        acc_dtype, acc_tl, dot_ieee, fp64 = _acc_types(dtype)
        dname = _dtype_name(dtype)
        for d in ((64, 80, 128, 256) if dtype != torch.float64 else (64,)):
            block_d = _head_block(d)
            kv_strides = (hk * s_max * d, s_max * d, d)
            for group, sq, mask_kind in ((1, 1, MASK_NONE), (8, 1, MASK_BOOL), (8, 4, MASK_NONE), (8, 8, MASK_NONE)):
                rows, h = group * sq, group * hk
                block_m = decode_block_m(rows, block_d, dtype)
                block_n, warps, stages = decode_config(block_m, block_d, dtype)
                mstr = (s_max, 0, 0, 1) if mask_kind else (0, 0, 0, 0)     # a [B, 1, 1, S_max] mask
                cases.append(GpuCompileCase(
                    name=f"attention_decode_split {dname} D={d} group={group} Sq={sq} "
                         f"{['nomask', 'boolmask'][mask_kind]} M={block_m} N={block_n}",
                    kernel=_attn_decode_split_kernel,
                    args=(dtype, dtype, dtype, torch.int32, _mask_dtype(mask_kind, dtype), acc_dtype, acc_dtype,
                          h * sq * d, sq * d, d, *kv_strides, *kv_strides, *mstr,
                          hk, group, sq, s_max, d, d, 16, 0.125, 0.0),
                    constexprs=dict(MASK_KIND=mask_kind, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                                    BLOCK_DV=block_d, EVEN_D=d == block_d, EVEN_DV=d == block_d, ACC=acc_tl,
                                    DOT_IEEE=dot_ieee, FP64=fp64, INTERPRET=False),
                    grid=(16, 8 * hk, triton.cdiv(rows, block_m)), num_warps=warps, num_stages=stages))
            cases.append(GpuCompileCase(
                name=f"attention_decode_combine {dname} Dv={d}",
                kernel=_attn_decode_combine_kernel,
                args=(acc_dtype, acc_dtype, dtype, acc_dtype, 16, d),
                constexprs=dict(BLOCK_S=16, BLOCK_DV=block_d, ACC=acc_tl),
                grid=(8 * 8 * hk,), num_warps=4))
    return cases
