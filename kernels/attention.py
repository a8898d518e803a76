"""Softmax attention in Triton (the flash-attention algorithm): forward, backward and KV-cache decode.

The contract (arguments, masks, causal rule, GQA, dropout counters, lse) is the docstring of
engine/ops/attention.py; the math is engine/reference.py (attention, attention_backward,
attention_with_kv_cache, dropout_uniform).

This module is what engine.ops.attention registers as the triton backend: the launchers, their
limits (supports, supports_decode) and gpu_compile_cases() for engine.readiness. Each direction's
kernels sit with their launcher:
    attention_forward.py    _attn_fwd_kernel; attention_fwd
    attention_backward.py   the preprocess, Delta, dK/dV and dQ kernels; attention_bwd
    attention_decode.py     the flash-decoding split and combine kernels; attention_decode
    attention_blocks.py     block sizes: the autotuner's candidates per head dim and dtype
    attention_common.py     what the kernels share: products, masks, dropout; argument helpers

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
import torch
import triton

from engine.kernels import compat
from engine.kernels.attention_backward import (_attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel,
                                               _attn_bwd_preprocess_kernel, attention_bwd)
from engine.kernels.attention_blocks import (_head_block, _is_16bit, _preprocess_block_m, decode_block_m, decode_config,
                                             dkdv_candidates, dq_candidates, fwd_candidates, keep_candidates)
from engine.kernels.attention_common import MASK_BOOL, MASK_FLOAT, MASK_NONE, _acc_types
from engine.kernels.attention_decode import _attn_decode_combine_kernel, _attn_decode_split_kernel, attention_decode
from engine.kernels.attention_forward import _attn_fwd_kernel, attention_fwd
from engine.kernels.common import GpuCompileCase
from engine.ops.common import dtype_reason

__all__ = ["attention_fwd", "attention_bwd", "attention_decode", "supports", "supports_decode", "gpu_compile_cases"]

MAX_HEAD_DIM = 256      # registers: Q (fwd/dQ) or K and V (dK/dV) tiles are held for the whole loop
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1


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
