"""Attention against a KV cache (flash-decoding): the split and combine kernels and their launcher
attention_decode (engine.kernels.attention is the module the ops layer imports).

Decode (flash-decoding): the valid keys [0, L_b) of each (batch, kv head) are split across
`splits` programs; each handles the Sq query rows of every query head of the GQA group at once
(K/V read once per group) and writes a partial (out, lse); a combine kernel merges the splits
with their log-sum-exps.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from engine.kernels.attention_blocks import _head_block, decode_block_m, decode_config
from engine.kernels.attention_common import (_LN2, _LOG2E, _acc_types, _exp_base, _in_range, _mask_args, _mm,
                                             _mul_split, _split, _stride3)
from engine.kernels.common import INTERPRET, next_power_of_2


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


def _decode_tiles(q, v_cache) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the split kernel, whose programs take BLOCK_M of
    the group * Sq query rows of a GQA group."""
    rows = q.shape[1] // v_cache.shape[1] * q.shape[2]
    block_d = max(_head_block(q.shape[3]), _head_block(v_cache.shape[3]))
    block_m = decode_block_m(rows, block_d, q.dtype)
    return (block_m, *decode_config(block_m, block_d, q.dtype))


# The launches below build the arguments of one kernel each, for attention_decode's tensors and for
# the meta tensors of gpu_compile_cases (attention.py), which thus compile what is launched: (grid,
# positional arguments, keyword arguments).


def _decode_split_launch(q, k_cache, v_cache, seqlens, mask, o_part, lse_part, scale):
    b, hq, sq, d = q.shape
    hk, s_max, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    splits = o_part.shape[1]
    _, acc_tl, dot_ieee, fp64 = _acc_types(q.dtype)
    block_m, block_n, warps, stages = _decode_tiles(q, v_cache)
    block_d, block_dv = _head_block(d), _head_block(dv)
    mask_kind, mask_arg, mask_strides = _mask_args(mask, q)
    scale_hi, scale_lo = _split(scale)
    group = hq // hk
    args = (q, k_cache, v_cache, seqlens, mask_arg, o_part, lse_part,
            *_stride3(q), *_stride3(k_cache), *_stride3(v_cache), *mask_strides,
            hk, group, sq, s_max, d, dv, splits, scale_hi, scale_lo)
    kwargs = dict(MASK_KIND=mask_kind, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
                  EVEN_D=d == block_d, EVEN_DV=dv == block_dv, ACC=acc_tl, DOT_IEEE=dot_ieee, FP64=fp64,
                  INTERPRET=INTERPRET, num_warps=warps, num_stages=stages)
    return (splits, b * hk, triton.cdiv(group * sq, block_m)), args, kwargs


def _decode_combine_launch(o_part, lse_part, out, lse):
    rows, splits, dv = o_part.shape
    args = (o_part, lse_part, out, lse, splits, dv)
    kwargs = dict(BLOCK_S=next_power_of_2(splits), BLOCK_DV=_head_block(dv), ACC=_acc_types(out.dtype)[1],
                  num_warps=4)
    return (rows,), args, kwargs


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor, mask: Optional[torch.Tensor], scale: float):
    """Attention of Sq new queries against a KV cache (flash-decoding).

    q [B, Hq, Sq, D], k_cache [B, Hk, S_max, D], v_cache [B, Hk, S_max, Dv] (unit last stride),
    cache_seqlens int32 [B] on q's device (valid lengths, clamped to S_max); query i sits at
    position L - Sq + i (engine.reference.decode_mask); mask None or a [B, Hq, Sq, S_max] view.
    Returns (out [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq] fp32 (fp64 for fp64))."""
    b, hq, sq, _ = q.shape
    hk, s_max, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    acc_dtype = _acc_types(q.dtype)[0]
    out = torch.empty((b, hq, sq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=acc_dtype, device=q.device)
    if b * hq * sq == 0:
        return out, lse
    block_m, block_n, _, _ = _decode_tiles(q, v_cache)
    splits = decode_splits(b * hk, triton.cdiv(hq // hk * sq, block_m), s_max, block_n, q.device)
    o_part = torch.empty((b * hq * sq, splits, dv), dtype=acc_dtype, device=q.device)
    lse_part = torch.empty((b * hq * sq, splits), dtype=acc_dtype, device=q.device)
    seqlens = cache_seqlens if cache_seqlens.dtype == torch.int32 else cache_seqlens.to(torch.int32)
    grid, args, kwargs = _decode_split_launch(q, k_cache, v_cache, seqlens, mask, o_part, lse_part, scale)
    _attn_decode_split_kernel[grid](*args, **kwargs)
    grid, args, kwargs = _decode_combine_launch(o_part, lse_part, out, lse)
    _attn_decode_combine_kernel[grid](*args, **kwargs)
    return out, lse
