"""Softmax attention (flash-style) and attention against a KV cache, as autograd ops.

Where each piece lives:
    kernels          kernels/attention.py (Triton), csrc/cpu/attention.cpp, csrc/cuda/attention.cu
    implementations  registered below for the reference, triton, cpu and cuda backends
    autograd         the custom ops engine::attention / attention_backward / attention_decode
    public API       engine.functional.scaled_dot_product_attention, attention_with_kv_cache

Every implementation of "attention" takes the same arguments (validated and laid out by
`attention()` below):
    forward(q, k, v, mask, causal, scale, dropout_p, seed, return_dropout_mask)
        -> (out, lse, dropout_mask)
    backward(grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed)
        -> (dq, dk, dv)
    q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv]: any strides, unit stride in the last
        dim. Hq is a multiple of Hk: query head h reads key/value head h // (Hq // Hk) (GQA/MQA).
    mask: None, or a [B, Hq, Sq, Sk] view whose broadcast dims have stride 0 (never expanded in
        memory; the last dim may have any stride, 0 included): bool (True = attend) or a float
        dtype (added to the scores).
    causal: query i sees keys j <= i (top-left, as torch defines is_causal); may be combined with
        a mask.
    scale: multiplies q k^T. dropout_p in [0, 1), seed: int — the dropout stream of
        engine/reference.py (Philox, counters (j, i, b * Hq + h)).
    out [B, Hq, Sq, Dv] contiguous in q's dtype; lse [B, Hq, Sq] contiguous fp32 (fp64 for fp64
        inputs): the natural log-sum-exp of each row's scaled, masked scores, -inf for a row with
        no visible key (whose output is 0 and whose gradients are 0).
    dropout_mask: bool [B, Hq, Sq, Sk] of the kept probabilities when return_dropout_mask (a
        debug path for tests), else None.
    dq like q, dk/dv like k/v (contiguous, in their dtypes); with GQA dk/dv sum over the query
        heads of each group.

"attention_decode" (forward only, for generation):
    forward(q, k_cache, v_cache, cache_seqlens, mask, scale) -> (out, lse)
    q [B, Hq, Sq, D] (Sq new queries), k_cache [B, Hk, S_max, D], v_cache [B, Hk, S_max, Dv],
    cache_seqlens int32 [B]: the valid length L of each sequence (the new keys are already in the
    cache). Query i sits at position L - Sq + i and sees keys j <= that position and j < L
    (engine.reference.decode_mask); kernels clamp L to S_max. mask as above, [B, Hq, Sq, S_max].
"""
from typing import Optional

import torch
from torch import Tensor

from engine import backends, reference

OP = "attention"
DECODE_OP = "attention_decode"


# ---------------------------------------------------------------------------------------------
# The reference backend: plain torch math (engine/reference.py).


def _reference_keep(seed, dropout_p, q, k):
    if dropout_p == 0:
        return None
    b, h, sq, _ = q.shape
    return reference.attention_dropout_mask(seed, dropout_p, b, h, sq, k.shape[2]).to(q.device)


def _reference_forward(q, k, v, mask, causal, scale, dropout_p, seed, return_dropout_mask):
    keep = _reference_keep(seed, dropout_p, q, k)
    out, lse = reference.attention(q, k, v, mask, causal, scale, dropout_p, keep)
    return out, lse, (keep if return_dropout_mask else None)


def _reference_backward(grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed):
    keep = _reference_keep(seed, dropout_p, q, k)
    return reference.attention_backward(grad_out, q, k, v, mask, causal, scale, dropout_p, keep)


def _reference_decode(q, k_cache, v_cache, cache_seqlens, mask, scale):
    return reference.attention_with_kv_cache(q, k_cache, v_cache, cache_seqlens, mask, scale)


backends.register(OP, "reference", _reference_forward, _reference_backward)
backends.register(DECODE_OP, "reference", _reference_decode)
backends.register_module(OP, "triton", "engine.kernels.attention", "attention_fwd", "attention_bwd", "supports")
backends.register_module(DECODE_OP, "triton", "engine.kernels.attention", "attention_decode", None, "supports_decode")
# (triton, cpu and cuda register here as their kernels land)

from engine import _ext  # noqa: E402  (csrc/cpu/attention.cpp, csrc/cuda/attention.cu)


def attention_cpp_supports(kind: str, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Optional[str]:
    """Limits of the C++ kernels ("cpu" or "cuda"): None when they can run the call, else why not.
    cpu: fp16/bf16/fp32/fp64, any head dims. cuda: fp16/bf16 (tensor cores) with head dims up to
    256, fp32 (FMA; its tiles take twice the shared memory) up to 128; no fp64. Both: masks bool
    or float, lengths below 2^31 (the dropout counters are 32-bit)."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if kind == "cpu" else ())
    if q.dtype not in dtypes:
        return f"dtype {q.dtype} is not one of {', '.join(str(d) for d in dtypes)}"
    widest = max(q.shape[-1], v.shape[-1])
    limit = 128 if q.dtype == torch.float32 else 256
    if kind == "cuda" and widest > limit:
        return f"head dims {q.shape[-1]}/{v.shape[-1]} exceed {limit} ({q.dtype} on cuda)"
    if mask is not None and not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        return f"mask dtype {mask.dtype} is neither bool nor floating point"
    if max(q.shape[2], k.shape[2]) >= 2**31:
        return "sequence lengths of 2^31 or more"
    return None


def _cpp_attention(kind: str):
    def forward(q, k, v, mask, causal, scale, dropout_p, seed, return_dropout_mask):
        out, lse, keep = _ext.load(kind).attention_forward(q, k, v, mask, causal, scale, dropout_p, seed,
                                                           return_dropout_mask)
        return out, lse, (keep if return_dropout_mask and dropout_p > 0 else None)

    def backward(grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed):
        return tuple(_ext.load(kind).attention_backward(grad_out, q, k, v, out, lse, mask, causal, scale,
                                                        dropout_p, seed))

    def supports(q, k, v, mask, causal, scale, dropout_p, seed, return_dropout_mask):
        return attention_cpp_supports(kind, q, k, v, mask)

    def decode(q, k_cache, v_cache, cache_seqlens, mask, scale):
        return tuple(_ext.load(kind).attention_decode(q, k_cache, v_cache, cache_seqlens, mask, scale))

    def supports_decode(q, k_cache, v_cache, cache_seqlens, mask, scale):
        return attention_cpp_supports(kind, q, k_cache, v_cache, mask)

    backends.register(OP, kind, forward, backward, supports)
    backends.register(DECODE_OP, kind, decode, None, supports_decode)


for _kind in ("cpu", "cuda"):
    _cpp_attention(_kind)


# ---------------------------------------------------------------------------------------------
# Autograd: custom ops (torch.compile traces through them with the fake kernels). The dropout
# seed is drawn inside the forward op from torch's default generator and returned as a tensor,
# so that backward regenerates the same mask and compiled graphs need no Python-side randomness.


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


@torch.library.custom_op("engine::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float,
                  dropout_p: float, return_dropout_mask: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    seed = _draw_seed() if dropout_p > 0 else 0
    out, lse, keep = backends.implementation(OP, backend).forward(
        q, k, v, mask, causal, scale, dropout_p, seed, return_dropout_mask)
    keep = keep if keep is not None else torch.empty(0, dtype=torch.bool, device=q.device)
    return out, lse, torch.tensor(seed, dtype=torch.int64), keep


@_attention_op.register_fake
def _attention_fake(q, k, v, mask, causal, scale, dropout_p, return_dropout_mask, backend):
    b, h, sq, _ = q.shape
    out = q.new_empty(b, h, sq, v.shape[-1])
    lse = q.new_empty(b, h, sq, dtype=reference.accumulator_dtype(q.dtype))
    keep_shape = (b, h, sq, k.shape[2]) if return_dropout_mask and dropout_p > 0 else (0,)
    return out, lse, torch.empty((), dtype=torch.int64), q.new_empty(keep_shape, dtype=torch.bool)


@torch.library.custom_op("engine::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           mask: Optional[Tensor], causal: bool, scale: float, dropout_p: float, seed: Tensor,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(backends.implementation(OP, backend).backward(
        grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, int(seed.item())))


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale, dropout_p, return_dropout_mask, backend = inputs
    out, lse, seed, _ = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.backend = causal, scale, dropout_p, backend


def _backward(ctx, grad_out, grad_lse, grad_seed, grad_keep):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.engine.attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, mask, ctx.causal, ctx.scale, ctx.dropout_p, seed, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("engine::attention", _backward, setup_context=_setup_context)


@torch.library.custom_op("engine::attention_decode", mutates_args=())
def _attention_decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                         mask: Optional[Tensor], scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return tuple(backends.implementation(DECODE_OP, backend).forward(q, k_cache, v_cache, cache_seqlens, mask, scale))


@_attention_decode_op.register_fake
def _attention_decode_fake(q, k_cache, v_cache, cache_seqlens, mask, scale, backend):
    b, h, sq, _ = q.shape
    return (q.new_empty(b, h, sq, v_cache.shape[-1]),
            q.new_empty(b, h, sq, dtype=reference.accumulator_dtype(q.dtype)))


# ---------------------------------------------------------------------------------------------


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _broadcast_mask(mask: Optional[Tensor], shape: tuple) -> Optional[Tensor]:
    """mask broadcast to `shape` as a stride-0 view (no memory is expanded)."""
    return None if mask is None else mask.expand(shape)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float,
              dropout_p: float, backend: Optional[str], return_dropout_mask: bool = False):
    """Runs the attention op on the chosen backend (None: automatic). Inputs are validated
    (engine.functional). Returns (out, lse, dropout_mask or None)."""
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    b, h, sq, _ = q.shape
    mask = _broadcast_mask(mask, (b, h, sq, k.shape[2]))
    args = (q, k, v, mask, bool(causal), float(scale), float(dropout_p), 0, bool(return_dropout_mask))
    chosen = backends.select(OP, q.device, args, backend)
    out, lse, _, keep = torch.ops.engine.attention(q, k, v, mask, bool(causal), float(scale), float(dropout_p),
                                                   bool(return_dropout_mask), chosen)
    return out, lse, (keep if return_dropout_mask and dropout_p > 0 else None)


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                     mask: Optional[Tensor], scale: float, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """Runs the decode op on the chosen backend. Inputs are validated. Returns (out, lse)."""
    q = _unit_last_stride(q)
    k_cache, v_cache = _unit_last_stride(k_cache), _unit_last_stride(v_cache)
    b, h, sq, _ = q.shape
    mask = _broadcast_mask(mask, (b, h, sq, k_cache.shape[2]))
    cache_seqlens = cache_seqlens.to(torch.int32)
    args = (q, k_cache, v_cache, cache_seqlens, mask, float(scale))
    chosen = backends.select(DECODE_OP, q.device, args, backend)
    return torch.ops.engine.attention_decode(*args, chosen)
