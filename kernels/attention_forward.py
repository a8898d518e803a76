"""The attention forward: _attn_fwd_kernel and its launcher attention_fwd (engine.kernels.attention
is the module the ops layer imports).

Forward, one program per (BLOCK_M query rows, b * Hq + h): Q stays in registers, K/V tiles of
BLOCK_N keys stream past it, softmax is done online in fp32 (running max m, running sum l), so
the Sq x Sk score matrix is never stored. Scores are kept in log2 units (scale * log2(e) folded
into one multiply, exp2 instead of exp) except for fp64 data, which stays in natural units so
that no fp32 constant rounds it. Causal: key blocks entirely above the diagonal are never
visited (loop bounds); blocks entirely below it run unmasked; only the blocks the diagonal
crosses apply j <= i.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from engine.kernels.attention_blocks import (_FWD_TUNE_KEY, _INTERPRET_FWD, _configs, _head_block, _pruner,
                                             fwd_candidates)
from engine.kernels.attention_common import (_LN2, _LOG2E, _acc_types, _exp_base, _in_range, _keep_mask,
                                             _keep_scale, _mask_args, _mm, _mul_split, _score_mask, _seed,
                                             _split, _stride3)
from engine.kernels.common import INTERPRET


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


_attn_fwd = triton.autotune(_configs(fwd_candidates, _INTERPRET_FWD), key=_FWD_TUNE_KEY,
                            prune_configs_by=_pruner(fwd_candidates))(_attn_fwd_kernel)


def _fwd_launch(q, k, v, mask, out, lse, keep, causal: bool, scale: float, dropout_p: float, seed: int):
    """(grid, positional arguments, keyword arguments) of _attn_fwd_kernel for attention_fwd's tensors,
    and for the meta tensors of gpu_compile_cases (attention.py), which thus compile what is launched.
    out, lse, keep: the outputs as attention_fwd allocates them (keep None without the debug keep
    mask). BLOCK_M and BLOCK_N are the autotuner's: the grid is a function of them."""
    b, hq, sq, d = q.shape
    hk, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    _, acc_tl, dot_ieee, fp64 = _acc_types(q.dtype)
    mask_kind, mask_arg, mask_strides = _mask_args(mask, q)
    scale_hi, scale_lo = _split(scale)
    p_hi, p_lo = _split(dropout_p)
    block_d, block_dv = _head_block(d), _head_block(dv)
    # without the debug keep mask the kernel never touches Keep: any pointer will do
    args = (q, k, v, mask_arg, out, lse, keep.view(torch.int8) if keep is not None else lse,
            *_stride3(q), *_stride3(k), *_stride3(v), *mask_strides,
            hq, hq // hk, sq, sk, d, dv,
            scale_hi, scale_lo, p_hi, p_lo, _seed(seed))
    kwargs = dict(CAUSAL=bool(causal), MASK_KIND=mask_kind, DROPOUT=dropout_p > 0, RETURN_KEEP=keep is not None,
                  BLOCK_D=block_d, BLOCK_DV=block_dv, EVEN_D=d == block_d, EVEN_DV=dv == block_dv,
                  ACC=acc_tl, DOT_IEEE=dot_ieee, FP64=fp64, INTERPRET=INTERPRET)
    return (lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * hq)), args, kwargs


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  causal: bool, scale: float, dropout_p: float, seed: int, return_dropout_mask: bool):
    """softmax(q k^T * scale + mask) v with flash-attention tiling.

    q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv] (unit last stride, Hq % Hk == 0);
    mask None or a [B, Hq, Sq, Sk] stride-0-broadcast view, bool or float. Returns
    (out [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq] fp32 (fp64 for fp64), keep bool
    [B, Hq, Sq, Sk] when return_dropout_mask and dropout_p > 0, else None)."""
    b, hq, sq, _ = q.shape
    sk, dv = k.shape[2], v.shape[3]
    acc_dtype = _acc_types(q.dtype)[0]
    out = torch.empty((b, hq, sq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=acc_dtype, device=q.device)
    return_keep = bool(return_dropout_mask and dropout_p > 0)
    keep = torch.empty((b, hq, sq, sk), dtype=torch.bool, device=q.device) if return_keep else None
    if b * hq * sq == 0:
        return out, lse, keep
    grid, args, kwargs = _fwd_launch(q, k, v, mask, out, lse, keep, causal, scale, dropout_p, seed)
    _attn_fwd[grid](*args, **kwargs)
    return out, lse, keep
