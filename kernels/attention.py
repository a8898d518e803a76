"""Softmax attention in Triton (the flash-attention algorithm): forward, backward and KV-cache decode.

The contract (arguments, masks, causal rule, GQA, dropout counters, lse) is the docstring of
engine/ops/attention.py; the math is engine/reference.py (attention, attention_backward,
attention_with_kv_cache, dropout_uniform).

This module is what engine.ops.attention registers as the triton backend: the launchers, their
limits (supports, supports_decode) and gpu_compile_cases() for engine.readiness. Each direction's
kernels sit with their launcher, and each kernel's arguments and grid are built by one function
(`_fwd_launch`, `_dq_launch`, ...) that both the launcher and the compile cases below call:
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
                                               _attn_bwd_preprocess_kernel, _delta_launch, _dkdv_launch, _dq_launch,
                                               _preprocess_launch, attention_bwd)
from engine.kernels.attention_blocks import (_head_block, _is_16bit, dkdv_candidates, dq_candidates,
                                             fwd_candidates, keep_candidates)
from engine.kernels.attention_common import MASK_BOOL, MASK_FLOAT, MASK_NONE, _acc_types
from engine.kernels.attention_decode import (_attn_decode_combine_kernel, _attn_decode_split_kernel,
                                             _decode_combine_launch, _decode_split_launch, attention_decode)
from engine.kernels.attention_forward import _attn_fwd_kernel, _fwd_launch, attention_fwd
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
#
# Built by the launchers' own argument builders from meta tensors (shapes, strides and dtypes, no
# storage), so that readiness compiles exactly what the launchers launch.


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _meta(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """A contiguous tensor without storage."""
    return torch.empty(shape, dtype=dtype, device="meta")


def _meta_mask(kind: int, dtype: torch.dtype, shape: tuple, strides: tuple):
    """A broadcast mask view without storage: None, bool, or float in the data's dtype."""
    if kind == MASK_NONE:
        return None
    return torch.empty_strided(shape, strides, dtype=torch.bool if kind == MASK_BOOL else dtype, device="meta")


def _case(name: str, kernel, launch, config=None, expects_tensor_cores=False) -> GpuCompileCase:
    """The compile case of launch = (grid, args, kwargs) built from meta tensors: a tensor argument
    becomes its dtype (what kernel.warmup needs of a pointer). config: the autotuner's (BLOCK_M,
    BLOCK_N, num_warps, num_stages), for the kernels it tunes."""
    grid, args, kwargs = launch
    constexprs = dict(kwargs)
    options = {}
    if config is not None:
        block_m, block_n, options["num_warps"], options["num_stages"] = config
        constexprs.update(BLOCK_M=block_m, BLOCK_N=block_n)
    options.update((key, constexprs.pop(key)) for key in ("num_warps", "num_stages") if key in constexprs)
    return GpuCompileCase(name=name, kernel=kernel,
                          args=tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args),
                          constexprs=constexprs, grid=grid(constexprs) if callable(grid) else grid,
                          expects_tensor_cores=expects_tensor_cores, **options)


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
    sm90) wherever the tile has the 64 rows wgmma needs. Shapes and scalars are those of a
    representative call, B = 8, H = 8, S = 1024 (values decide Triton's divisibility-by-16
    specialization)."""
    cases = []
    b, h, s, seed = 8, 8, 1024, 2**40
    variants = [(False, MASK_NONE, False), (True, MASK_FLOAT, True)]
    plan = [(dt, d) for dt in (torch.float16, torch.bfloat16) for d in (64, 128)]
    plan += [(torch.float16, d) for d in (16, 80, 96, 256)] + [(torch.bfloat16, 256)]
    plan += [(torch.float32, d) for d in (64, 128, 256)] + [(torch.float64, 64)]
    for dtype, d in plan:
        block_d = _head_block(d)
        tc = _is_16bit(dtype)
        dname = _dtype_name(dtype)
        x = _meta(dtype, b, h, s, d)                   # q, k, v, out, grad_out and the gradients alike
        rows = _meta(_acc_types(dtype)[0], b, h, s)    # lse, LseS, Delta
        for causal, mask_kind, dropout in variants:
            vname = _variant_name(causal, mask_kind, dropout)
            mask = _meta_mask(mask_kind, dtype, (b, h, s, s), (0, 0, s, 1))     # a [Sq, Sk] mask
            call = (causal, 0.125, 0.1 if dropout else 0.0, seed if dropout else 0)
            fwd_plan = [(c, False) for c in fwd_candidates(block_d, dtype, dropout)]
            fwd_plan += [(c, True) for c in keep_candidates(block_d, dtype)] if dropout else []
            for (bm, bn, warps, stages), return_keep in fwd_plan:
                keep = _meta(torch.bool, b, h, s, s) if return_keep else None
                cases.append(_case(
                    f"attention_fwd {dname} D={d} {vname}{' keep' if return_keep else ''} "
                    f"M={bm} N={bn} w={warps} s={stages}",
                    _attn_fwd_kernel, _fwd_launch(x, x, x, mask, x, rows, keep, *call),
                    (bm, bn, warps, stages), tc and bm >= 64))
            for bm, bn, warps, stages in dkdv_candidates(block_d, dtype, dropout):
                cases.append(_case(
                    f"attention_bwd_dkdv {dname} D={d} {vname} M={bm} N={bn} w={warps} s={stages}",
                    _attn_bwd_dkdv_kernel, _dkdv_launch(x, x, x, x, rows, rows, mask, x, x, *call),
                    (bm, bn, warps, stages), tc and bn >= 64))
            for bm, bn, warps, stages in dq_candidates(block_d, dtype, dropout):
                cases.append(_case(
                    f"attention_bwd_dq {dname} D={d} {vname} M={bm} N={bn} w={warps} s={stages}",
                    _attn_bwd_dq_kernel, _dq_launch(x, x, x, x, rows, rows, mask, x, *call),
                    (bm, bn, warps, stages), tc and bm >= 64))
                if tc:
                    cases.append(_case(
                        f"attention_bwd_delta {dname} D={d} {vname} M={bm} N={bn} w={warps} s={stages}",
                        _attn_bwd_delta_kernel, _delta_launch(x, x, x, x, rows, rows, mask, *call),
                        (bm, bn, warps, stages), bm >= 64))
        cases.append(_case(f"attention_bwd_preprocess {dname} Dv={d}", _attn_bwd_preprocess_kernel,
                           _preprocess_launch(x, x, rows, rows, rows)))
    cases += _decode_compile_cases()
    return cases


def _decode_compile_cases() -> list[GpuCompileCase]:
    """The decode split kernel per dtype and head dim for the row tiles GQA produces: 1 query of
    an MHA head, a group of 8 heads x 1 query (with a bool padding mask), 8 x 4 and 8 x 8
    (two or four row tiles); and the combine kernel. Rows are padded to at least 16 for tl.dot,
    so the products use mma, not sm90's 64-row wgmma (decode is bound by reading the cache).
    B = 8, Hk = 8, S_max = 4096, 16 splits (the launcher's count depends on the GPU)."""
    cases = []
    b, hk, s_max, splits = 8, 8, 4096, 16
    dtypes = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if compat.FP64_DECODE_ON_GPUS else ())
    for dtype in dtypes:
        acc_dtype = _acc_types(dtype)[0]
        dname = _dtype_name(dtype)
        for d in ((64, 80, 128, 256) if dtype != torch.float64 else (64,)):
            cache = _meta(dtype, b, hk, s_max, d)
            seqlens = _meta(torch.int32, b)
            for group, sq, mask_kind in ((1, 1, MASK_NONE), (8, 1, MASK_BOOL), (8, 4, MASK_NONE), (8, 8, MASK_NONE)):
                h = group * hk
                q = _meta(dtype, b, h, sq, d)
                mask = _meta_mask(mask_kind, dtype, (b, h, sq, s_max), (s_max, 0, 0, 1))   # a [B, 1, 1, S_max] mask
                launch = _decode_split_launch(q, cache, cache, seqlens, mask, _meta(acc_dtype, b * h * sq, splits, d),
                                              _meta(acc_dtype, b * h * sq, splits), 0.125)
                tiles = launch[2]
                cases.append(_case(
                    f"attention_decode_split {dname} D={d} group={group} Sq={sq} "
                    f"{['nomask', 'boolmask'][mask_kind]} M={tiles['BLOCK_M']} N={tiles['BLOCK_N']}",
                    _attn_decode_split_kernel, launch))
            h = 8 * hk
            cases.append(_case(
                f"attention_decode_combine {dname} Dv={d}", _attn_decode_combine_kernel,
                _decode_combine_launch(_meta(acc_dtype, b * h, splits, d), _meta(acc_dtype, b * h, splits),
                                       _meta(dtype, b, h, 1, d), _meta(acc_dtype, b, h, 1))))
    return cases
