"""Rotary position embedding in Triton: q and k rotated in one launch (math in
engine.reference.rotary).

One program per token (b, s): it loads the token's R/2 cos and sin once, then for every head of
q and of k rotates the R/2 feature pairs and copies the D - R pass-through features. The
backward is the same kernel with CONJUGATE (the angles negated).

Memory traffic, B*S tokens of (Hq + Hk) heads of D s-byte features: reads and writes
B*S*(Hq + Hk)*D*s each, plus B*S*R*s of cos and sin.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from engine.kernels.common import GpuCompileCase, next_power_of_2
from engine.ops.common import dtype_reason


@triton.jit
def _rotate_heads(X, stride_b, stride_h, stride_s,  # [B, H, S, D] input, unit stride in D
                  Y,                                # [B, H, S, D] contiguous output
                  b, s, heads, seq, D, c, sn,       # c, sn: [BLOCK_HALF] angles of this token
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, PASS: tl.constexpr, BLOCK_PASS: tl.constexpr,
                  INTERLEAVED: tl.constexpr):
    pair = tl.arange(0, BLOCK_HALF)
    in_pair = pair < HALF
    if INTERLEAVED:  # (x[2i], x[2i + 1])
        first, second = 2 * pair, 2 * pair + 1
    else:            # (x[i], x[i + R/2])
        first, second = pair, pair + HALF
    rest = 2 * HALF + tl.arange(0, BLOCK_PASS)
    in_rest = rest < 2 * HALF + PASS
    # b, s are int64: the row pointers step by a head's stride, so no product can overflow int32
    x_row = X + b * stride_b + s * stride_s
    y_row = Y + (b * heads * seq + s) * D
    for _ in range(0, heads):
        x1 = tl.load(x_row + first, mask=in_pair, other=0.0).to(c.dtype)
        x2 = tl.load(x_row + second, mask=in_pair, other=0.0).to(c.dtype)
        tl.store(y_row + first, (x1 * c - x2 * sn).to(Y.dtype.element_ty), mask=in_pair)
        tl.store(y_row + second, (x2 * c + x1 * sn).to(Y.dtype.element_ty), mask=in_pair)
        if PASS > 0:
            tl.store(y_row + rest, tl.load(x_row + rest, mask=in_rest), mask=in_rest)
        x_row += stride_h
        y_row += seq * D


@triton.jit
def _rotary_kernel(
    Q, stride_qb, stride_qh, stride_qs, QO, q_heads,  # q [B, Hq, S, D] and its output (contiguous)
    K, stride_kb, stride_kh, stride_ks, KO, k_heads,  # k [B, Hk, S, D] and its output, when HAS_K
    Cos, Sin,                                         # [P, HALF] contiguous angle tables
    Offsets,                                          # int64 [B] start positions, when HAS_OFFSETS
    seq, D,
    HAS_K: tl.constexpr, HAS_OFFSETS: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr,
    HALF: tl.constexpr,        # R/2: pairs that rotate
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
    PASS: tl.constexpr,        # D - R pass-through features
    BLOCK_PASS: tl.constexpr,  # next power of two >= PASS (1 when PASS = 0)
    ACC: tl.constexpr,         # tl.float32, or tl.float64 for fp64 data
):
    token = tl.program_id(0).to(tl.int64)
    b, s = token // seq, token % seq
    position = s
    if HAS_OFFSETS:
        position += tl.load(Offsets + b)
    pair = tl.arange(0, BLOCK_HALF)
    c = tl.load(Cos + position * HALF + pair, mask=pair < HALF, other=0.0).to(ACC)
    sn = tl.load(Sin + position * HALF + pair, mask=pair < HALF, other=0.0).to(ACC)
    if CONJUGATE:
        sn = -sn
    _rotate_heads(Q, stride_qb, stride_qh, stride_qs, QO, b, s, q_heads, seq, D, c, sn,
                  HALF, BLOCK_HALF, PASS, BLOCK_PASS, INTERLEAVED)
    if HAS_K:
        _rotate_heads(K, stride_kb, stride_kh, stride_ks, KO, b, s, k_heads, seq, D, c, sn,
                      HALF, BLOCK_HALF, PASS, BLOCK_PASS, INTERLEAVED)


def _num_warps(head_dim: int) -> int:
    # a token's rows are short (D <= a few hundred): one warp per 128 pair lanes, 1..4
    return max(1, min(4, head_dim // 128))


def _constexprs(half: int, head_dim: int, interleaved: bool, has_k: bool, has_offsets: bool, conjugate: bool,
                acc) -> dict:
    passed = head_dim - 2 * half
    return dict(HAS_K=has_k, HAS_OFFSETS=has_offsets, INTERLEAVED=interleaved, CONJUGATE=conjugate, HALF=half,
                BLOCK_HALF=next_power_of_2(half), PASS=passed, BLOCK_PASS=next_power_of_2(max(passed, 1)), ACC=acc)


def _rotate(q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
            offsets: Optional[torch.Tensor], interleaved: bool, conjugate: bool):
    b, q_heads, seq, d = q.shape
    q_out = torch.empty((b, q_heads, seq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k is not None else None
    if b * seq == 0:
        return q_out, k_out
    key, key_out = (k, k_out) if k is not None else (q, q_out)
    _rotary_kernel[(b * seq,)](
        q, q.stride(0), q.stride(1), q.stride(2), q_out, q_heads,
        key, key.stride(0), key.stride(1), key.stride(2), key_out, key.shape[1],
        cos, sin, offsets if offsets is not None else cos, seq, d,
        **_constexprs(cos.shape[1], d, interleaved, k is not None, offsets is not None, conjugate,
                      tl.float64 if q.dtype == torch.float64 else tl.float32),
        num_warps=_num_warps(d))
    return q_out, k_out


def supports(args) -> list[str]:
    """[] when rotary_fwd/bwd can run the call (engine.ops.rotary.RotaryArgs), else why not."""
    reasons = dtype_reason(args.q.dtype)
    if args.q.shape[2] * args.q.shape[3] >= 2**31:  # the output steps a head by S * D in int32
        reasons.append(f"S * D = {args.q.shape[2] * args.q.shape[3]} is not below 2^31")
    return reasons


def rotary_fwd(q, k, cos, sin, offsets, interleaved):
    """Rotate q [B, Hq, S, D] and k [B, Hk, S, D] (or None) by the angles of cos, sin [P, R/2];
    offsets int64 [B] or None. Returns (q_out, k_out or None), contiguous."""
    return _rotate(q, k, cos, sin, offsets, interleaved, conjugate=False)


def rotary_bwd(grad_q, grad_k, cos, sin, offsets, interleaved):
    """Gradients of rotary_fwd: the output gradients rotated by the opposite angles."""
    return _rotate(grad_q, grad_k, cos, sin, offsets, interleaved, conjugate=True)


def gpu_compile_cases() -> list[GpuCompileCase]:
    """The launcher's configurations: Llama's head dim 128 (half-split, q and k, decode offsets),
    GPT-J's 256 with rotary dim 64 (interleaved, partial), Phi-2's 80 with rotary dim 32 (partial),
    forward and backward, in each 16-bit dtype and fp32."""
    cases = []
    shapes = {"llama": (128, 64, False, True), "gptj": (256, 32, True, False), "phi": (80, 16, False, False)}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        dname = str(dtype).removeprefix("torch.")
        for name, (d, half, interleaved, has_offsets) in shapes.items():
            for conjugate in (False, True):
                cases.append(GpuCompileCase(
                    name=f"rotary_{'bwd' if conjugate else 'fwd'} {name} {dname} D={d} R={2 * half}",
                    kernel=_rotary_kernel,
                    args=(dtype, 32 * 64 * d, 64 * d, d, dtype, 32,
                          dtype, 8 * 64 * d, 64 * d, d, dtype, 8,
                          dtype, dtype, torch.int64, 64, d),
                    constexprs=_constexprs(half, d, interleaved, True, has_offsets, conjugate, tl.float32),
                    grid=(128,), num_warps=_num_warps(d)))
    return cases
