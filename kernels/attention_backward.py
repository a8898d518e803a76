"""The attention backward: the preprocess, Delta, dK/dV and dQ kernels and their launcher attention_bwd
(engine.kernels.attention is the module the ops layer imports).

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
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from engine.kernels.attention_blocks import (_INTERPRET_DKDV, _INTERPRET_DQ, _TUNE_KEY, _configs, _head_block,
                                             _is_16bit, _preprocess_block_m, _pruner, dkdv_candidates,
                                             dq_candidates)
from engine.kernels.attention_common import (_LOG2E, _acc_types, _exp_base, _in_range, _keep_mask, _keep_scale,
                                             _mask_args, _mm, _mul_split, _score_mask, _seed, _split, _stride3)
from engine.kernels.common import INTERPRET


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


_attn_bwd_dkdv = triton.autotune(_configs(dkdv_candidates, _INTERPRET_DKDV), key=_TUNE_KEY,
                                 prune_configs_by=_pruner(dkdv_candidates))(_attn_bwd_dkdv_kernel)
_attn_bwd_dq = triton.autotune(_configs(dq_candidates, _INTERPRET_DQ), key=_TUNE_KEY,
                               prune_configs_by=_pruner(dq_candidates))(_attn_bwd_dq_kernel)
# the delta kernel holds and streams the dQ kernel's tiles (without its accumulator): its configs
_attn_bwd_delta = triton.autotune(_configs(dq_candidates, _INTERPRET_DQ), key=_TUNE_KEY,
                                  prune_configs_by=_pruner(dq_candidates))(_attn_bwd_delta_kernel)


# The launches below build the arguments of one kernel each, for attention_bwd's tensors and for the
# meta tensors of gpu_compile_cases (attention.py), which thus compile what is launched: (grid,
# positional arguments, keyword arguments). BLOCK_M and BLOCK_N of the delta, dK/dV and dQ kernels
# are the autotuner's: their grids are functions of them.


def _preprocess_launch(out, grad_out, lse, delta, lse_s):
    b, hq, sq, dv = out.shape
    _, acc_tl, _, fp64 = _acc_types(out.dtype)
    block_dv = _head_block(dv)
    block_m = _preprocess_block_m(block_dv)
    args = (out, grad_out, lse, delta, lse_s, *_stride3(out), *_stride3(grad_out), hq, sq, dv)
    # Delta = rowsum(dO * O) for fp32/fp64 here; for 16-bit data rowsum(P * dP) (the delta kernel)
    kwargs = dict(BLOCK_M=block_m, BLOCK_DV=block_dv, ACC=acc_tl, FP64=fp64, DELTA_FROM_P=_is_16bit(out.dtype),
                  num_warps=4)
    return (triton.cdiv(sq, block_m), b * hq), args, kwargs


def _bwd_shared(q, k, v, grad_out, mask, causal, scale, dropout_p, seed):
    """What the delta, dK/dV and dQ kernels take alike: (the mask argument, the strides, the
    scalars after the sizes, the keyword arguments)."""
    d, dv = q.shape[3], v.shape[3]
    _, acc_tl, dot_ieee, fp64 = _acc_types(q.dtype)
    mask_kind, mask_arg, mask_strides = _mask_args(mask, q)
    scale_hi, scale_lo = _split(scale)
    p_hi, p_lo = _split(dropout_p)
    block_d, block_dv = _head_block(d), _head_block(dv)
    strides = (*_stride3(q), *_stride3(k), *_stride3(v), *_stride3(grad_out), *mask_strides)
    scalars = (scale_hi, scale_lo, p_hi, p_lo, _seed(seed))
    kwargs = dict(CAUSAL=bool(causal), MASK_KIND=mask_kind, DROPOUT=dropout_p > 0,
                  BLOCK_D=block_d, BLOCK_DV=block_dv, EVEN_D=d == block_d, EVEN_DV=dv == block_dv,
                  ACC=acc_tl, DOT_IEEE=dot_ieee, FP64=fp64, INTERPRET=INTERPRET)
    return mask_arg, strides, scalars, kwargs


def _delta_launch(q, k, v, grad_out, lse_s, delta, mask, causal, scale, dropout_p, seed):
    b, hq, sq, d = q.shape
    hk, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    mask_arg, strides, scalars, kwargs = _bwd_shared(q, k, v, grad_out, mask, causal, scale, dropout_p, seed)
    args = (q, k, v, grad_out, lse_s, delta, mask_arg, *strides, hq, hq // hk, sq, sk, d, dv, *scalars)
    return (lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * hq)), args, kwargs


def _dkdv_launch(q, k, v, grad_out, lse_s, delta, mask, dk, dv, causal, scale, dropout_p, seed):
    b, hq, sq, d = q.shape
    hk, sk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    mask_arg, strides, scalars, kwargs = _bwd_shared(q, k, v, grad_out, mask, causal, scale, dropout_p, seed)
    args = (q, k, v, grad_out, lse_s, delta, mask_arg, dk, dv, *strides, hq, hk, hq // hk, sq, sk, d, dv_dim, *scalars)
    return (lambda meta: (triton.cdiv(sk, meta["BLOCK_N"]), b * hk)), args, kwargs


def _dq_launch(q, k, v, grad_out, lse_s, delta, mask, dq, causal, scale, dropout_p, seed):
    b, hq, sq, d = q.shape
    hk, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    mask_arg, strides, scalars, kwargs = _bwd_shared(q, k, v, grad_out, mask, causal, scale, dropout_p, seed)
    args = (q, k, v, grad_out, lse_s, delta, mask_arg, dq, *strides, hq, hq // hk, sq, sk, d, dv, *scalars)
    return (lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * hq)), args, kwargs


def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
                  scale: float, dropout_p: float, seed: int):
    """Gradients of attention_fwd, P recomputed from lse [B, Hq, Sq].

    grad_out, out [B, Hq, Sq, Dv]; q, k, v, mask as in attention_fwd. Returns (dq [B, Hq, Sq, D],
    dk [B, Hk, Sk, D], dv [B, Hk, Sk, Dv]), contiguous in the inputs' dtypes, dk/dv summed over
    each GQA group."""
    b, hq, sq, d = q.shape
    hk, sk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    acc_dtype = _acc_types(q.dtype)[0]
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    dq = torch.empty((b, hq, sq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, hk, sk, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, hk, sk, dv_dim), dtype=v.dtype, device=q.device)
    lse = lse.contiguous()
    delta = torch.empty((b, hq, sq), dtype=acc_dtype, device=q.device)
    lse_s = torch.empty((b, hq, sq), dtype=acc_dtype, device=q.device)
    call = (causal, scale, dropout_p, seed)
    if b * hq * sq > 0:
        grid, args, kwargs = _preprocess_launch(out, grad_out, lse, delta, lse_s)
        _attn_bwd_preprocess_kernel[grid](*args, **kwargs)
        if kwargs["DELTA_FROM_P"]:
            grid, args, kwargs = _delta_launch(q, k, v, grad_out, lse_s, delta, mask, *call)
            _attn_bwd_delta[grid](*args, **kwargs)
    if b * hk * sk > 0:
        grid, args, kwargs = _dkdv_launch(q, k, v, grad_out, lse_s, delta, mask, dk, dv, *call)
        _attn_bwd_dkdv[grid](*args, **kwargs)
    if b * hq * sq > 0:
        grid, args, kwargs = _dq_launch(q, k, v, grad_out, lse_s, delta, mask, dq, *call)
        _attn_bwd_dq[grid](*args, **kwargs)
    return dq, dk, dv
