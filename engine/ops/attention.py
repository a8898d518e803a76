"""Softmax attention (flash-style) and attention against a KV cache, as autograd ops.

Where each piece lives:
    kernels          kernels/attention.py (Triton), csrc/cpu/attention_*.cpp, csrc/cuda/*_attention.cu
    implementations  registered below for the reference, triton, cpu and cuda backends
    autograd         the custom ops engine::attention / attention_backward / attention_decode
    public API       engine.functional.scaled_dot_product_attention, attention_with_kv_cache

Every implementation of "attention" takes the same arguments (validated and laid out by
`attention()` below):
    forward(q, k, v, mask, causal, scale, dropout_p, seed, return_dropout_mask)
        -> (out, lse, dropout_mask)
    backward(grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed)
        -> (dq, dk, dv)
    (A float mask that requires grad gets its gradient from engine.reference.attention_mask_gradient
    for every backend: dS from the saved lse, materialized one batch element at a time. The
    kernels' backward passes keep dS on chip, as FlashAttention's do.)
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
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from engine import _ext, backends, reference
from engine.ops import common

OP = "attention"
DECODE_OP = "attention_decode"


class AttentionArgs(NamedTuple):
    """The attention forward's arguments but the seed (drawn per call inside the op), for `supports`."""
    q: Tensor
    k: Tensor
    v: Tensor
    mask: Optional[Tensor]
    causal: bool
    scale: float
    dropout_p: float
    return_dropout_mask: bool


class DecodeArgs(NamedTuple):
    q: Tensor
    k_cache: Tensor
    v_cache: Tensor
    cache_seqlens: Tensor
    mask: Optional[Tensor]
    scale: float


# ---------------------------------------------------------------------------------------------
# Backends. The reference backend: plain torch math (engine/reference.py).


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


def cpp_limits(kind: str, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> list[str]:
    """Limits of the C++ kernels ("cpu" or "cuda"): [] when they can run the call, else every
    reason they cannot. cpu: fp16/bf16/fp32/fp64, any head dims. cuda: fp16/bf16 (tensor cores)
    with head dims up to 256, fp32 (FMA; its tiles take twice the shared memory) up to 128; no
    fp64. Both: masks bool or float, lengths below 2^31 (the dropout counters are 32-bit)."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if kind == "cpu" else ())
    reasons = common.dtype_reason(q.dtype, dtypes)
    widest = max(q.shape[-1], v.shape[-1])
    limit = 128 if q.dtype == torch.float32 else 256
    if kind == "cuda" and widest > limit:
        reasons.append(f"head dims {q.shape[-1]}/{v.shape[-1]} exceed {limit} ({q.dtype} on cuda)")
    if mask is not None and not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        reasons.append(f"mask dtype {mask.dtype} is neither bool nor floating point")
    if max(q.shape[2], k.shape[2]) >= 2**31:
        reasons.append("sequence lengths of 2^31 or more")
    return reasons


def _cpp_attention(kind: str):
    def forward(q, k, v, mask, causal, scale, dropout_p, seed, return_dropout_mask):
        out, lse, keep = _ext.load(kind).attention_forward(q, k, v, mask, causal, scale, dropout_p, seed,
                                                           return_dropout_mask)
        return out, lse, (keep if return_dropout_mask and dropout_p > 0 else None)

    def backward(grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed):
        return tuple(_ext.load(kind).attention_backward(grad_out, q, k, v, out, lse, mask, causal, scale,
                                                        dropout_p, seed))

    def supports(args: AttentionArgs) -> list[str]:
        return cpp_limits(kind, args.q, args.k, args.v, args.mask)

    def decode(q, k_cache, v_cache, cache_seqlens, mask, scale):
        return tuple(_ext.load(kind).attention_decode(q, k_cache, v_cache, cache_seqlens, mask, scale))

    def supports_decode(args: DecodeArgs) -> list[str]:
        return cpp_limits(kind, args.q, args.k_cache, args.v_cache, args.mask)

    backends.register(OP, kind, forward, backward, supports)
    backends.register(DECODE_OP, kind, decode, None, supports_decode)


backends.register(OP, "reference", _reference_forward, _reference_backward)
backends.register(DECODE_OP, "reference", _reference_decode)
backends.register_module(OP, "triton", "engine.kernels.attention", "attention_fwd", "attention_bwd", "supports")
backends.register_module(DECODE_OP, "triton", "engine.kernels.attention", "attention_decode", None, "supports_decode")
for _kind in ("cpu", "cuda"):
    _cpp_attention(_kind)


# ---------------------------------------------------------------------------------------------
# Autograd. The dropout seed is drawn inside the forward op from torch's default generator and
# returned as a tensor, so that backward regenerates the same mask and compiled graphs need no
# Python-side randomness.


def _attention_plain(q, k, v, mask, causal, scale, dropout_p, return_dropout_mask, backend):
    """The forward as eager code calls it: (out, lse, seed, keep mask or None)."""
    seed = common.draw_seed() if dropout_p > 0 else 0
    out, lse, keep = backends.implementation(OP, backend).forward(
        q, k, v, mask, causal, scale, dropout_p, seed, return_dropout_mask)
    return out, lse, seed, keep


def _attention_forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float,
                       dropout_p: float, return_dropout_mask: bool,
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out, lse, seed, keep = _attention_plain(q, k, v, mask, causal, scale, dropout_p, return_dropout_mask, backend)
    keep = keep if keep is not None else torch.empty(0, dtype=torch.bool, device=q.device)
    return out, lse, torch.tensor(seed, dtype=torch.int64), keep


def _attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        mask: Optional[Tensor], causal: bool, scale: float, dropout_p: float, seed: Tensor,
                        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(backends.implementation(OP, backend).backward(
        grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, int(seed.item())))


def _attention_mask_gradient(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, mask: Tensor,
                             causal: bool, scale: float, dropout_p: float, seed: Tensor) -> Tensor:
    """The gradient of a float mask that requires grad, the same for every backend (see the
    module docstring). An op of its own rather than a fourth output of attention_backward: the
    compiled graphs torch caches on disk hold each op's argument list, and a changed schema of an
    existing op broke them ("Expected a value of type 'bool' for argument ...")."""
    keep = _reference_keep(int(seed.item()), dropout_p, q, k)
    return reference.attention_mask_gradient(grad_out, q, k, v, lse, mask, causal, scale, dropout_p, keep)


def _attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                      mask: Optional[Tensor], scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return tuple(backends.implementation(DECODE_OP, backend).forward(q, k_cache, v_cache, cache_seqlens, mask, scale))


_attention_op = torch.library.custom_op("engine::attention", _attention_forward, mutates_args=())
_attention_backward_op = torch.library.custom_op("engine::attention_backward", _attention_backward, mutates_args=())
_attention_mask_gradient_op = torch.library.custom_op("engine::attention_mask_gradient", _attention_mask_gradient,
                                                      mutates_args=())
_attention_decode_op = torch.library.custom_op("engine::attention_decode", _attention_decode, mutates_args=())


@_attention_op.register_fake
def _attention_fake(q, k, v, mask, causal, scale, dropout_p, return_dropout_mask, backend):
    b, h, sq, _ = q.shape
    out = q.new_empty(b, h, sq, v.shape[-1])
    lse = q.new_empty(b, h, sq, dtype=reference.accumulator_dtype(q.dtype))
    keep_shape = (b, h, sq, k.shape[2]) if return_dropout_mask and dropout_p > 0 else (0,)
    return out, lse, torch.empty((), dtype=torch.int64), q.new_empty(keep_shape, dtype=torch.bool)


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


@_attention_mask_gradient_op.register_fake
def _attention_mask_gradient_fake(grad_out, q, k, v, lse, mask, causal, scale, dropout_p, seed):
    return mask.new_empty(mask.shape)


@_attention_decode_op.register_fake
def _attention_decode_fake(q, k_cache, v_cache, cache_seqlens, mask, scale, backend):
    b, h, sq, _ = q.shape
    return (q.new_empty(b, h, sq, v_cache.shape[-1]),
            q.new_empty(b, h, sq, dtype=reference.accumulator_dtype(q.dtype)))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale, dropout_p, return_dropout_mask, backend = inputs
    out, lse, seed, _ = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.backend = causal, scale, dropout_p, backend


def _backward_through(attention_backward, mask_gradient):
    """The autograd backward, calling `attention_backward` and `mask_gradient` (the custom ops,
    or their functions)."""
    def backward(ctx, grad_out, grad_lse, grad_seed, grad_keep):
        q, k, v, out, lse, mask, seed = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, mask, ctx.causal, ctx.scale, ctx.dropout_p,
                                        seed, ctx.backend)
        d_mask = None
        if ctx.needs_input_grad[3]:
            d_mask = mask_gradient(grad_out, q, k, v, lse, mask, ctx.causal, ctx.scale, ctx.dropout_p, seed)
        return dq, dk, dv, d_mask, None, None, None, None, None
    return backward


torch.library.register_autograd("engine::attention",
                                _backward_through(_attention_backward_op, _attention_mask_gradient_op),
                                setup_context=_setup_context)
_AttentionEager = common.eager_op(_attention_forward, _setup_context,
                                  _backward_through(_attention_backward, _attention_mask_gradient))


# ---------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float,
              dropout_p: float, backend: Optional[str], return_dropout_mask: bool = False):
    """Runs the attention op on the chosen backend (None: automatic). Inputs are validated
    (engine.functional). Returns (out, lse, dropout_mask or None)."""
    q, k, v = common.unit_last_stride(q), common.unit_last_stride(k), common.unit_last_stride(v)
    b, h, sq, _ = q.shape
    mask = None if mask is None else mask.expand(b, h, sq, k.shape[2])  # a stride-0 view, never copied
    args = AttentionArgs(q, k, v, mask, bool(causal), float(scale), float(dropout_p), bool(return_dropout_mask))
    chosen = backends.select(OP, q.device, args, backend)
    out, lse, _, keep = common.run(_attention_op, _AttentionEager, _attention_plain, (*args, chosen),
                                   common.needs_grad(q, k, v, mask))
    return out, lse, (keep if return_dropout_mask and dropout_p > 0 else None)


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                     mask: Optional[Tensor], scale: float, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """Runs the decode op on the chosen backend (no autograd). Inputs are validated. Returns (out, lse)."""
    q = common.unit_last_stride(q)
    k_cache, v_cache = common.unit_last_stride(k_cache), common.unit_last_stride(v_cache)
    b, h, sq, _ = q.shape
    mask = None if mask is None else mask.expand(b, h, sq, k_cache.shape[2])
    lengths = cache_seqlens if cache_seqlens.dtype == torch.int32 else cache_seqlens.to(torch.int32)  # .to: ~0.5 us
    args = DecodeArgs(q, k_cache, v_cache, lengths, mask, float(scale))
    chosen = backends.select(DECODE_OP, q.device, args, backend)
    return common.run(_attention_decode_op, None, _attention_decode, (*args, chosen), record_grad=False)
