"""Rotary position embedding in Triton: q and k rotated in one launch (math in
engine.reference.rotary).

One program per token (b, s): it loads the token's R/2 cos and sin once, then rotates the R/2
feature pairs and copies the D - R pass-through features of q's heads and of k's, BLOCK_H heads
at a time (a [BLOCK_H, R/2] tile, so that many loads are in flight). The backward is the same
kernel with CONJUGATE (the angles negated).

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
                  BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Every head of X at token (b, s), BLOCK_H heads at a time: [BLOCK_H, BLOCK_HALF] pairs."""
    pair = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:  # (x[2i], x[2i + 1])
        first, second = 2 * pair, 2 * pair + 1
    else:            # (x[i], x[i + R/2])
        first, second = pair, pair + HALF
    rest = 2 * HALF + tl.arange(0, BLOCK_PASS)
    x_token = X + b * stride_b + s * stride_s
    for h0 in range(0, heads, BLOCK_H):
        head = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)  # widened before it multiplies a stride
        x_rows = x_token + head[:, None] * stride_h                        # [BLOCK_H, 1]
        y_rows = Y + ((b * heads + head[:, None]) * seq + s) * D
        in_pair = (head[:, None] < heads) & (pair[None, :] < HALF)        # [BLOCK_H, BLOCK_HALF]
        x1 = tl.load(x_rows + first[None, :], mask=in_pair, other=0.0).to(c.dtype)
        x2 = tl.load(x_rows + second[None, :], mask=in_pair, other=0.0).to(c.dtype)
        tl.store(y_rows + first[None, :], (x1 * c[None, :] - x2 * sn[None, :]).to(Y.dtype.element_ty), mask=in_pair)
        tl.store(y_rows + second[None, :], (x2 * c[None, :] + x1 * sn[None, :]).to(Y.dtype.element_ty), mask=in_pair)
        if PASS > 0:
            in_rest = (head[:, None] < heads) & (rest[None, :] < 2 * HALF + PASS)
            tl.store(y_rows + rest[None, :], tl.load(x_rows + rest[None, :], mask=in_rest), mask=in_rest)


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
    BLOCK_H: tl.constexpr,     # heads rotated at once
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
                  HALF, BLOCK_HALF, PASS, BLOCK_PASS, BLOCK_H, INTERLEAVED)
    if HAS_K:
        _rotate_heads(K, stride_kb, stride_kh, stride_ks, KO, b, s, k_heads, seq, D, c, sn,
                      HALF, BLOCK_HALF, PASS, BLOCK_PASS, BLOCK_H, INTERLEAVED)


# Elements of a [BLOCK_H, block] tile of heads: enough loads in flight to cover memory latency,
# few enough registers.
TILE_ELEMENTS = 2048


def _constexprs(half: int, head_dim: int, heads: int, interleaved: bool, has_k: bool, has_offsets: bool,
                conjugate: bool, acc) -> dict:
    """The kernel's constexprs for rotary dim 2 * half of head_dim, at most `heads` heads a tensor."""
    passed = head_dim - 2 * half
    block_half, block_pass = next_power_of_2(half), next_power_of_2(max(passed, 1))
    block_h = min(next_power_of_2(max(heads, 1)), max(1, TILE_ELEMENTS // max(block_half, block_pass)))
    return dict(HAS_K=has_k, HAS_OFFSETS=has_offsets, INTERLEAVED=interleaved, CONJUGATE=conjugate, HALF=half,
                BLOCK_HALF=block_half, PASS=passed, BLOCK_PASS=block_pass, BLOCK_H=block_h, ACC=acc)


def _num_warps(constexprs: dict) -> int:
    # one warp per 256 elements of the tile, 1..4
    tile = constexprs["BLOCK_H"] * max(constexprs["BLOCK_HALF"], constexprs["BLOCK_PASS"])
    return max(1, min(4, tile // 256))


def _rotate(q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
            offsets: Optional[torch.Tensor], interleaved: bool, conjugate: bool):
    b, q_heads, seq, d = q.shape
    q_out = torch.empty((b, q_heads, seq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k is not None else None
    if b * seq == 0:
        return q_out, k_out
    key, key_out = (k, k_out) if k is not None else (q, q_out)
    constexprs = _constexprs(cos.shape[1], d, max(q_heads, key.shape[1]), interleaved, k is not None,
                             offsets is not None, conjugate, tl.float64 if q.dtype == torch.float64 else tl.float32)
    _rotary_kernel[(b * seq,)](
        q, q.stride(0), q.stride(1), q.stride(2), q_out, q_heads,
        key, key.stride(0), key.stride(1), key.stride(2), key_out, key.shape[1],
        cos, sin, offsets if offsets is not None else cos, seq, d,
        **constexprs, num_warps=_num_warps(constexprs))
    return q_out, k_out


def supports(args) -> list[str]:
    """[] when rotary_fwd/bwd can run the call (engine.ops.rotary.RotaryArgs), else why not."""
    return dtype_reason(args.q.dtype)  # indices are int64 (program id and heads widened)


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
                constexprs = _constexprs(half, d, 32, interleaved, True, has_offsets, conjugate, tl.float32)
                cases.append(GpuCompileCase(
                    name=f"rotary_{'bwd' if conjugate else 'fwd'} {name} {dname} D={d} R={2 * half}",
                    kernel=_rotary_kernel,
                    args=(dtype, 32 * 64 * d, 64 * d, d, dtype, 32,
                          dtype, 8 * 64 * d, 64 * d, d, dtype, 8,
                          dtype, dtype, torch.int64, 64, d),
                    constexprs=constexprs, grid=(128,), num_warps=_num_warps(constexprs)))
    return cases
