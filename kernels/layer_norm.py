"""Layer norm / RMS norm in Triton, forward and backward, with the residual add fused.

For one row v = x (+ residual) of N elements (math as in csrc/common/layer_norm.h):
    mean = sum(v) / N (0 for RMS norm),  rstd = 1 / sqrt(sum((v - mean)^2) / N + eps)
    y = (v - mean) * rstd * w + b
    backward, g = dy * w:  dv = (g - xhat * c1 - c2) * rstd,  c1 = mean(g * xhat),  c2 = mean(g)

Memory traffic, [M, N] rows of s-byte elements (what bench/ counts as bytes moved):
    forward:  reads M*N*s (x) [+ M*N*s residual], writes M*N*s (y) [+ M*N*s sum]
    backward: reads 2*M*N*s (dy, x) [+ M*N*s dsum], writes M*N*s (dx), + P*N*4 partial dw/db

Extreme rows (|v| up to the dtype's max, or eps = 0 with subnormal v), as in
csrc/common/layer_norm.h: forward checks the directly computed rstd (_direct_ok) and, for the
rare row outside its range, computes the statistics again on v * _row_scale(max |v|) = v / p,
p a power of two, storing the row's true mean and rstd; backward centers x as
(x / 2 - mean / 2) * 2 in rows whose std exceeds 1, where x - mean may overflow.

One program per row in forward. Rows up to BLOCK_N = MAX_BLOCK_N elements are held in
registers and read once; wider rows are processed in chunks of MAX_BLOCK_N_FORWARD / 2 over
three passes. Backward programs each take a contiguous range of rows and accumulate dw/db for
them in registers (one row of a [P, N] partial buffer each, summed by the launcher: no atomics).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from engine.kernels.common import GpuCompileCase, next_power_of_2, row_num_warps
from engine.ops.common import dtype_reason

MAX_BLOCK_N_FORWARD = 8192
MAX_BLOCK_N_BACKWARD = 4096
TL_ACCUMULATOR = {torch.float64: tl.float64}   # everything else accumulates in fp32


# The range of a directly computed rstd that is exact: variance + eps in [2^-100, 2^126] (fp64
# [2^-958, 2^1022]), no overflow and no subnormal squares that matter (csrc/common/layer_norm.h's
# layer_norm_direct_ok checks the same on the sum of squares); and layer_norm_row_scale's clamp
_DIRECT_LOW_F32, _DIRECT_HIGH_F32 = tl.constexpr(2.0 ** -63), tl.constexpr(2.0 ** 50)
_DIRECT_LOW_F64, _DIRECT_HIGH_F64 = tl.constexpr(2.0 ** -511), tl.constexpr(2.0 ** 479)
_NORMAL_F32, _NORMAL_F64 = tl.constexpr(2.0 ** -126), tl.constexpr(2.0 ** -1022)


@triton.jit
def _direct_ok(rstd, ACC: tl.constexpr):
    """Whether rstd computed directly is exact (no overflow, no subnormal squares that matter)."""
    if ACC == tl.float64:
        return (rstd >= _DIRECT_LOW_F64) & (rstd <= _DIRECT_HIGH_F64)
    else:
        return (rstd >= _DIRECT_LOW_F32) & (rstd <= _DIRECT_HIGH_F32)


@triton.jit
def _row_scale(top, ACC: tl.constexpr):
    """The reciprocal of p = 2^floor(log2 top) (top's exponent bits), p clamped to the normal
    range's [smallest, 1 / smallest] so that both are exact; inf / NaN top gives the smallest."""
    if ACC == tl.float64:
        p = (top.to(tl.int64, bitcast=True) & 0x7FF0000000000000).to(tl.float64, bitcast=True)
        return 1.0 / tl.minimum(tl.maximum(p, _NORMAL_F64), 1.0 / _NORMAL_F64)
    else:
        p = (top.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
        return 1.0 / tl.minimum(tl.maximum(p, _NORMAL_F32), 1.0 / _NORMAL_F32)


@triton.jit
def _row_moments(v, mask, N, eps, RMS: tl.constexpr):
    """(mean, rstd, v - mean with 0 past the row's end) of a row v held in registers."""
    if RMS:
        mean = tl.zeros([], v.dtype)
    else:
        mean = tl.sum(v, axis=0) / N
    centered = tl.where(mask, v - mean, 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps), centered


@triton.jit
def _chunked_rescaled_moments(source, N, eps, RMS: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr):
    """(mean, rstd, scale): the statistics of the row at `source` times scale = _row_scale(max |v|),
    reading it three times in chunks of CHUNK."""
    cols = tl.arange(0, CHUNK)
    top = tl.zeros([CHUNK], dtype=ACC)
    for start in range(0, N, CHUNK):
        top = tl.maximum(top, tl.abs(tl.load(source + start + cols, mask=start + cols < N, other=0.0).to(ACC)))
    scale = _row_scale(tl.max(top, axis=0), ACC)
    if RMS:
        mean = tl.zeros([], ACC)
    else:
        partial = tl.zeros([CHUNK], dtype=ACC)
        for start in range(0, N, CHUNK):
            partial += tl.load(source + start + cols, mask=start + cols < N, other=0.0).to(ACC) * scale
        mean = tl.sum(partial, axis=0) / N
    partial = tl.zeros([CHUNK], dtype=ACC)
    for start in range(0, N, CHUNK):
        mask = start + cols < N
        centered = tl.where(mask, tl.load(source + start + cols, mask=mask, other=0.0).to(ACC) * scale - mean, 0.0)
        partial += centered * centered
    return mean, 1.0 / tl.sqrt(tl.sum(partial, axis=0) / N + eps * scale * scale), scale


@triton.jit
def _layer_norm_fwd_kernel(
    X, stride_x,            # [M, N] input (unit column stride), its row stride
    R, stride_r,            # [M, N] residual, read when HAS_RESIDUAL, its row stride
    S,                      # [M, N] contiguous output x + residual, written when HAS_RESIDUAL
    Y,                      # [M, N] contiguous output
    W, B,                   # [N] weight / bias, read when HAS_WEIGHT / HAS_BIAS
    Mean, Rstd,             # [M] outputs in ACC dtype; Mean written unless RMS
    N,                      # row length
    eps,                    # added to the variance
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr,      # RMS norm: no mean subtraction
    BLOCK_N: tl.constexpr,  # power of two; the whole row when ONE_PASS
    ONE_PASS: tl.constexpr,  # N <= BLOCK_N: the row stays in registers
    ACC: tl.constexpr,      # accumulator dtype (tl.float32, or tl.float64 for fp64 data)
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    s_row = S + row * N
    y_row = Y + row * N
    cols = tl.arange(0, BLOCK_N)
    if ONE_PASS:
        mask = cols < N
        v = tl.load(x_row + cols, mask=mask, other=0.0).to(ACC)
        if HAS_RESIDUAL:
            # normalize the sum as stored, so backward (which reads it) matches forward exactly
            total = (v + tl.load(r_row + cols, mask=mask, other=0.0).to(ACC)).to(S.dtype.element_ty)
            tl.store(s_row + cols, total, mask=mask)
            v = total.to(ACC)
        mean, rstd, centered = _row_moments(v, mask, N, eps, RMS)
        scale = tl.full([], 1.0, ACC)
        if not _direct_ok(rstd, ACC):  # rare: see the module docstring
            scale = _row_scale(tl.max(tl.abs(v), axis=0), ACC)
            mean, rstd, centered = _row_moments(v * scale, mask, N, eps * scale * scale, RMS)
        y = centered * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: the sum (and the stored x + residual); passes 2 and 3 re-read the row (from
        # L2), reading back the stored sum when there is a residual.
        partial = tl.zeros([BLOCK_N], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            v = tl.load(x_row + start + cols, mask=mask, other=0.0).to(ACC)
            if HAS_RESIDUAL:
                total = (v + tl.load(r_row + start + cols, mask=mask, other=0.0).to(ACC)).to(S.dtype.element_ty)
                tl.store(s_row + start + cols, total, mask=mask)
                v = total.to(ACC)
            partial += v
        if HAS_RESIDUAL:
            tl.debug_barrier()  # the stored sum is read back by other threads of this program
            source = s_row
        else:
            source = x_row
        if RMS:
            mean = tl.zeros([], ACC)
        else:
            mean = tl.sum(partial, axis=0) / N
        partial = tl.zeros([BLOCK_N], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            v = tl.load(source + start + cols, mask=mask, other=0.0).to(ACC)
            centered = tl.where(mask, v - mean, 0.0)
            partial += centered * centered
        rstd = 1.0 / tl.sqrt(tl.sum(partial, axis=0) / N + eps)
        scale = tl.full([], 1.0, ACC)
        if not _direct_ok(rstd, ACC):  # rare: see the module docstring
            mean, rstd, scale = _chunked_rescaled_moments(source, N, eps, RMS, BLOCK_N, ACC)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            v = tl.load(source + start + cols, mask=mask, other=0.0).to(ACC)
            y = (v * scale - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + start + cols, mask=mask, other=0.0).to(ACC)
            if HAS_BIAS:
                y = y + tl.load(B + start + cols, mask=mask, other=0.0).to(ACC)
            tl.store(y_row + start + cols, y.to(Y.dtype.element_ty), mask=mask)
    if not RMS:
        tl.store(Mean + row, mean / scale)
    tl.store(Rstd + row, rstd * scale)


@triton.jit
def _centering(mean, rstd):
    """(half, mean * half, rstd / half), half = 1/2 where rstd < 1 (std > 1), else 1:
    xhat = (x * half - mean * half) * (rstd / half) cannot overflow (|x|, |mean| <= max), and
    is exact for normal x. (RMS norm's x * rstd needs none of this: |x| rstd <= sqrt(N).)"""
    small = rstd < 1.0
    return tl.where(small, 0.5, 1.0), tl.where(small, mean * 0.5, mean), tl.where(small, rstd * 2.0, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,                     # [M, N] contiguous gradient of y
    DS,                     # [M, N] contiguous gradient of the sum output, read when HAS_DSUM
    X, stride_x,            # [M, N] the normalized input (x or the stored sum), its row stride
    W,                      # [N] weight, read when HAS_WEIGHT
    Mean, Rstd,             # [M] saved statistics (Mean unused for RMS)
    DX,                     # [M, N] contiguous output: gradient of x (and of the residual)
    DW, DB,                 # [P, N] ACC-dtype partial sums, one row per program, when NEED_DW/NEED_DB
    M, N,
    rows_per_program,       # this program's rows: [pid * rows_per_program, ... + rows_per_program)
    HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,  # N <= BLOCK_N: dw/db accumulate in registers over all rows
    ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    first_row = pid * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    if ONE_PASS:
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        dw = tl.zeros([BLOCK_N], dtype=ACC)
        db = tl.zeros([BLOCK_N], dtype=ACC)
        for row in range(first_row, last_row):
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(ACC)
            rstd = tl.load(Rstd + row)
            if RMS:
                xhat = x * rstd
            else:
                half, half_mean, rstd_twice = _centering(tl.load(Mean + row), rstd)
                xhat = tl.where(mask, (x * half - half_mean) * rstd_twice, 0.0)
            g = dy
            if HAS_WEIGHT:
                g = dy * w
            c1 = tl.sum(g * xhat, axis=0) / N
            if RMS:
                dx = (g - xhat * c1) * rstd
            else:
                dx = (g - xhat * c1 - tl.sum(g, axis=0) / N) * rstd
            if HAS_DSUM:
                dx += tl.load(DS + row * N + cols, mask=mask, other=0.0).to(ACC)
            tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
        if NEED_DW:
            tl.store(DW + pid * N + cols, dw, mask=mask)
        if NEED_DB:
            tl.store(DB + pid * N + cols, db, mask=mask)
    else:
        # Wide rows: per row, pass 1 reduces c1/c2 over chunks, pass 2 writes dx and adds this
        # row's dw/db into the program's own partial row (zeroed by the launcher).
        for row in range(first_row, last_row):
            rstd = tl.load(Rstd + row)
            if RMS:
                half, half_mean, rstd_twice = 1.0, 0.0, rstd
            else:
                half, half_mean, rstd_twice = _centering(tl.load(Mean + row), rstd)
            g_xhat = tl.zeros([BLOCK_N], dtype=ACC)
            g_total = tl.zeros([BLOCK_N], dtype=ACC)
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                x = tl.load(X + row * stride_x + start + cols, mask=mask, other=0.0).to(ACC)
                g = tl.load(DY + row * N + start + cols, mask=mask, other=0.0).to(ACC)
                if HAS_WEIGHT:
                    g = g * tl.load(W + start + cols, mask=mask, other=0.0).to(ACC)
                g_xhat += g * tl.where(mask, (x * half - half_mean) * rstd_twice, 0.0)
                g_total += g
            c1 = tl.sum(g_xhat, axis=0) / N
            if RMS:
                c2 = 0.0
            else:
                c2 = tl.sum(g_total, axis=0) / N
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                x = tl.load(X + row * stride_x + start + cols, mask=mask, other=0.0).to(ACC)
                dy = tl.load(DY + row * N + start + cols, mask=mask, other=0.0).to(ACC)
                xhat = tl.where(mask, (x * half - half_mean) * rstd_twice, 0.0)
                g = dy
                if HAS_WEIGHT:
                    g = g * tl.load(W + start + cols, mask=mask, other=0.0).to(ACC)
                dx = (g - xhat * c1 - c2) * rstd
                if HAS_DSUM:
                    dx += tl.load(DS + row * N + start + cols, mask=mask, other=0.0).to(ACC)
                tl.store(DX + row * N + start + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if NEED_DW:
                    dw_ptr = DW + pid * N + start + cols
                    tl.store(dw_ptr, tl.load(dw_ptr, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if NEED_DB:
                    db_ptr = DB + pid * N + start + cols
                    tl.store(db_ptr, tl.load(db_ptr, mask=mask, other=0.0) + dy, mask=mask)
            tl.debug_barrier()  # the next row's read-modify-write of DW/DB sees this row's stores


def _accumulator(dtype: torch.dtype):
    return TL_ACCUMULATOR.get(dtype, tl.float32)


def _row_stride(x2d: torch.Tensor) -> int:
    return x2d.stride(0) if x2d.shape[0] > 1 else x2d.shape[1]


def _forward_config(n: int) -> tuple[int, bool, int]:
    """(BLOCK_N, ONE_PASS, num_warps) for rows of n elements. Wider rows go in chunks of half the
    widest held row, still with 16 warps: in chunks of MAX_BLOCK_N_FORWARD the rare rescaling
    pass (_chunked_rescaled_moments) made add_layer_norm_fwd fp32 spill on sm80 and sm90
    (python -m engine.readiness --kernels N=65536)."""
    if n <= MAX_BLOCK_N_FORWARD:
        block = next_power_of_2(n)
        return block, True, row_num_warps(block)
    return MAX_BLOCK_N_FORWARD // 2, False, row_num_warps(MAX_BLOCK_N_FORWARD)


def _backward_config(n: int) -> tuple[int, bool, int]:
    block = min(next_power_of_2(n), MAX_BLOCK_N_BACKWARD)
    # Wide rows (the chunked loop) keep more values live per element: at 16 warps the sm80
    # build spills, at 8 it does not (python -m engine.readiness --kernels bwd).
    return block, n <= block, (row_num_warps(block) if n <= block else 8)


def _backward_programs(rows: int, device: torch.device) -> int:
    """How many programs share the rows in backward: a few per SM on a GPU; in the interpreter
    (one Python loop per program) a handful."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(rows, target))


def supports(args) -> list[str]:
    """[] when layer_norm_fwd/bwd can run the call (engine.ops.layer_norm.LayerNormArgs), else why not."""
    return dtype_reason(args.x.dtype)


def layer_norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float, rms: bool):
    """Layer norm / RMS norm of the rows of x [M, N] (unit column stride), after adding residual
    [M, N]. weight, bias: [N]. Returns (y [M, N], sum [M, N] or None, mean [M] or None, rstd [M]),
    statistics in fp32 (fp64 for fp64 data)."""
    m, n = x.shape
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    total = torch.empty((m, n), dtype=x.dtype, device=x.device) if residual is not None else None
    mean = None if rms else torch.empty(m, dtype=acc_dtype, device=x.device)
    rstd = torch.empty(m, dtype=acc_dtype, device=x.device)
    if m == 0:
        return y, total, mean, rstd
    block, one_pass, num_warps = _forward_config(n)
    _layer_norm_fwd_kernel[(m,)](
        x, _row_stride(x),
        residual if residual is not None else x, _row_stride(residual) if residual is not None else 0,
        total if total is not None else y,
        y,
        weight if weight is not None else x, bias if bias is not None else x,
        mean if mean is not None else rstd, rstd,
        n, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        RMS=rms, BLOCK_N=block, ONE_PASS=one_pass, ACC=_accumulator(x.dtype), num_warps=num_warps,
    )
    return y, total, mean, rstd


def layer_norm_bwd(grad_y: torch.Tensor, grad_sum: Optional[torch.Tensor], x: torch.Tensor,
                   weight: Optional[torch.Tensor], mean: Optional[torch.Tensor], rstd: torch.Tensor,
                   rms: bool, need_weight_grad: bool, need_bias_grad: bool):
    """Gradients of layer_norm_fwd. grad_y, grad_sum: [M, N] (grad_sum: the sum output's gradient,
    or None); x: the normalized input [M, N] (x, or the stored sum). Returns (dx [M, N], dweight
    [N] or None, dbias [N] or None); dx is also the residual's gradient."""
    m, n = x.shape
    grad_y = grad_y.contiguous()
    grad_sum = grad_sum.contiguous() if grad_sum is not None else None
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    programs = _backward_programs(m, x.device)
    acc_dtype = rstd.dtype
    dw = torch.zeros((programs, n), dtype=acc_dtype, device=x.device) if need_weight_grad else None
    db = torch.zeros((programs, n), dtype=acc_dtype, device=x.device) if need_bias_grad else None
    if m > 0:
        block, one_pass, num_warps = _backward_config(n)
        _layer_norm_bwd_kernel[(programs,)](
            grad_y, grad_sum if grad_sum is not None else grad_y,
            x, _row_stride(x),
            weight if weight is not None else x,
            mean if mean is not None else rstd, rstd,
            dx,
            dw if dw is not None else rstd, db if db is not None else rstd,
            m, n, triton.cdiv(m, programs),
            HAS_DSUM=grad_sum is not None, HAS_WEIGHT=weight is not None,
            NEED_DW=need_weight_grad, NEED_DB=need_bias_grad, RMS=rms,
            BLOCK_N=block, ONE_PASS=one_pass, ACC=_accumulator(x.dtype), num_warps=num_warps,
        )
    grad_dtype = weight.dtype if weight is not None else x.dtype
    return (dx,
            dw.sum(0).to(grad_dtype) if dw is not None else None,
            db.sum(0).to(grad_dtype) if db is not None else None)


def gpu_compile_cases() -> list[GpuCompileCase]:
    """The configurations the launchers above use, for the ahead-of-time GPU compile check:
    plain layer norm, add + layer norm and RMS norm, at a GPT-2 width (768), the widest row held
    in registers, and a 65536-wide row (chunked), in each 16-bit dtype and fp32."""
    cases = []
    variants = {  # name: (HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, RMS)
        "layer_norm": (False, True, True, False),
        "add_layer_norm": (True, True, True, False),
        "rms_norm": (False, True, False, True),
    }
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        dname = str(dtype).removeprefix("torch.")
        for n in (768, MAX_BLOCK_N_FORWARD, 65536):
            block, one_pass, warps = _forward_config(n)
            for name, (residual, weight, bias, rms) in variants.items():
                cases.append(GpuCompileCase(
                    name=f"{name}_fwd {dname} N={n}",
                    kernel=_layer_norm_fwd_kernel,
                    args=(dtype, n, dtype, n, dtype, dtype, dtype, dtype, torch.float32, torch.float32, n, 1e-5),
                    constexprs=dict(HAS_RESIDUAL=residual, HAS_WEIGHT=weight, HAS_BIAS=bias, RMS=rms,
                                    BLOCK_N=block, ONE_PASS=one_pass, ACC=tl.float32),
                    grid=(8,), num_warps=warps))
        for n in (768, MAX_BLOCK_N_BACKWARD, 65536):
            block, one_pass, warps = _backward_config(n)
            for name, (residual, weight, bias, rms) in variants.items():
                cases.append(GpuCompileCase(
                    name=f"{name}_bwd {dname} N={n}",
                    kernel=_layer_norm_bwd_kernel,
                    args=(dtype, dtype, dtype, n, dtype, torch.float32, torch.float32, dtype,
                          torch.float32, torch.float32, 8192, n, 64),
                    constexprs=dict(HAS_DSUM=residual, HAS_WEIGHT=weight, NEED_DW=weight, NEED_DB=bias,
                                    RMS=rms, BLOCK_N=block, ONE_PASS=one_pass, ACC=tl.float32),
                    grid=(8,), num_warps=warps))
    return cases
