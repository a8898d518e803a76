"""Rotary position embedding (RoPE) of queries and keys, as one autograd op.

Where each piece lives:
    kernels          kernels/rotary.py (Triton), csrc/cpu/rotary.cpp, csrc/cuda/rotary.cu
    implementations  registered below for the reference, triton, cpu and cuda backends
    autograd         the custom ops engine::rotary / engine::rotary_backward below
    public API       engine.functional.rotary / rotary_qk (the tables: rotary_cos_sin)

Every implementation takes the same arguments (math in engine.reference.rotary):
    forward(q, k, cos, sin, offsets, interleaved) -> (q_out, k_out)
        q [B, Hq, S, D], k [B, Hk, S, D] or None (any strides, unit stride in the last dim);
        cos, sin [P, R/2] contiguous, R <= D the rotary dim; offsets int64 [B] (token s of
        sequence b sits at position offsets[b] + s) or None (at s). q_out [B, Hq, S, D], k_out
        [B, Hk, S, D] (None without k), contiguous, in q's dtype.
    backward(grad_q, grad_k, cos, sin, offsets, interleaved) -> (dq, dk): the same rotation by
        the opposite angles (the gradient of a rotation is its inverse applied to the gradient).
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from engine import _ext, backends, reference
from engine.ops import common

OP = "rotary"


class RotaryArgs(NamedTuple):
    """The forward's arguments, as every implementation takes them (and `supports` reads them)."""
    q: Tensor
    k: Optional[Tensor]
    cos: Tensor
    sin: Tensor
    offsets: Optional[Tensor]
    interleaved: bool


# ---------------------------------------------------------------------------------------------
# Backends


def _reference(conjugate: bool):
    def rotate(q, k, cos, sin, offsets, interleaved):
        k_out = reference.rotary(k, cos, sin, offsets, interleaved, conjugate) if k is not None else None
        return reference.rotary(q, cos, sin, offsets, interleaved, conjugate), k_out
    return rotate


def _cpp(conjugate: bool):
    def for_kind(kind: str):
        def rotate(q, k, cos, sin, offsets, interleaved):
            q_out, k_out = _ext.load(kind).rotary(q, k, cos, sin, offsets, interleaved, conjugate)
            return q_out, (k_out if k is not None else None)
        return rotate
    return for_kind


def _cpp_supports(kind: str):
    def supports(args: RotaryArgs) -> list[str]:
        # csrc/cpu and csrc/cuda: any float dtype, int64 indexing throughout.
        return common.dtype_reason(args.q.dtype)
    return supports


backends.register(OP, "reference", _reference(conjugate=False), _reference(conjugate=True))
backends.register_module(OP, "triton", "engine.kernels.rotary", "rotary_fwd", "rotary_bwd", "supports")
common.register_cpp(OP, _cpp(conjugate=False), _cpp(conjugate=True), _cpp_supports)


# ---------------------------------------------------------------------------------------------
# Autograd. An absent k travels as an empty tensor (custom ops cannot return None).


def _rotary_plain(q, k, cos, sin, offsets, interleaved, backend):
    """The forward as eager code calls it: (q_out, k_out or None)."""
    return backends.implementation(OP, backend).forward(q, k, cos, sin, offsets, interleaved)


def _rotary_forward(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, offsets: Optional[Tensor],
                    interleaved: bool, backend: str) -> tuple[Tensor, Tensor]:
    q_out, k_out = _rotary_plain(q, k, cos, sin, offsets, interleaved, backend)
    return q_out, (q.new_empty(0) if k_out is None else k_out)


def _rotary_backward(grad_q: Tensor, grad_k: Optional[Tensor], cos: Tensor, sin: Tensor,
                     offsets: Optional[Tensor], interleaved: bool, backend: str) -> tuple[Tensor, Tensor]:
    dq, dk = backends.implementation(OP, backend).backward(grad_q, grad_k, cos, sin, offsets, interleaved)
    return dq, (grad_q.new_empty(0) if dk is None else dk)


_rotary_op = torch.library.custom_op("engine::rotary", _rotary_forward, mutates_args=())
_rotary_backward_op = torch.library.custom_op("engine::rotary_backward", _rotary_backward, mutates_args=())


@_rotary_op.register_fake
def _rotary_fake(q, k, cos, sin, offsets, interleaved, backend):
    return q.new_empty(q.shape), (k.new_empty(k.shape) if k is not None else q.new_empty(0))


@_rotary_backward_op.register_fake
def _rotary_backward_fake(grad_q, grad_k, cos, sin, offsets, interleaved, backend):
    return grad_q.new_empty(grad_q.shape), (grad_k.new_empty(grad_k.shape) if grad_k is not None
                                            else grad_q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, offsets, interleaved, backend = inputs
    ctx.save_for_backward(cos, sin, offsets)
    ctx.has_k, ctx.interleaved, ctx.backend = k is not None, interleaved, backend


def _backward_through(rotary_backward):
    """The autograd backward, calling `rotary_backward` (the custom op, or its function). Unused
    outputs arrive as zeros (autograd materializes them), which rotate to zeros."""
    def backward(ctx, grad_q, grad_k):
        cos, sin, offsets = ctx.saved_tensors
        dq, dk = rotary_backward(common.unit_last_stride(grad_q),
                                 common.unit_last_stride(grad_k) if ctx.has_k else None,
                                 cos, sin, offsets, ctx.interleaved, ctx.backend)
        return dq, (dk if ctx.has_k else None), None, None, None, None, None
    return backward


torch.library.register_autograd("engine::rotary", _backward_through(_rotary_backward_op),
                                setup_context=_setup_context)
_RotaryEager = common.eager_op(_rotary_forward, _setup_context, _backward_through(_rotary_backward))


# ---------------------------------------------------------------------------------------------


def rotary(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, offsets: Optional[Tensor],
           interleaved: bool, backend: Optional[str]) -> tuple[Tensor, Optional[Tensor]]:
    """Rotate q [B, Hq, S, D] and k [B, Hk, S, D] (or None) in one pass on the chosen backend (None:
    automatic). Returns (q_out, k_out or None). Inputs are validated by engine.functional."""
    args = RotaryArgs(common.unit_last_stride(q), common.unit_last_stride(k) if k is not None else None,
                      cos.contiguous(), sin.contiguous(), offsets, interleaved)
    chosen = backends.select(OP, q.device, args, backend)
    q_out, k_out = common.run(_rotary_op, _RotaryEager, _rotary_plain, (*args, chosen), common.needs_grad(q, k))
    return q_out, (k_out if k is not None else None)
