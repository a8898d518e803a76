"""The layer-norm family (layer_norm, rms_norm, add_layer_norm) as one autograd op.

Where each piece lives:
    kernels          kernels/layer_norm.py (Triton), csrc/cpu/layer_norm.cpp, csrc/cuda/layer_norm.cu
    implementations  registered below for the reference, triton, cpu and cuda backends
    autograd         the custom ops engine::layer_norm / engine::layer_norm_backward below
    public API       engine.functional.layer_norm / rms_norm / add_layer_norm

Every implementation takes the same arguments:
    forward(x, residual, weight, bias, eps, rms) -> (y, sum, mean, rstd)
        x, residual: [M, N] with unit column stride (residual may be None); weight, bias: [N] or
        None. y: [M, N]; sum = x + residual [M, N] or None; mean (None for RMS norm), rstd: [M]
        in fp32 (fp64 for fp64 data).
    backward(grad_y, grad_sum, x, weight, mean, rstd, rms, need_weight_grad, need_bias_grad)
        -> (dx, dweight, dbias); x is the normalized input (x, or the stored sum), dx is also the
        residual's gradient.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from engine import _ext, backends, reference
from engine.ops import common

OP = "layer_norm"


class LayerNormArgs(NamedTuple):
    """The forward's arguments, as every implementation takes them (and `supports` reads them)."""
    x: Tensor
    residual: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float
    rms: bool


# ---------------------------------------------------------------------------------------------
# Backends


def _reference_forward(x, residual, weight, bias, eps, rms):
    y, total, mean, rstd = reference.layer_norm(x, residual, weight, bias, eps, rms)
    return y, total, (None if rms else mean), rstd


def _cpp_forward(kind: str):
    def forward(x, residual, weight, bias, eps, rms):
        y, total, mean, rstd = _ext.load(kind).layer_norm_forward(x, residual, weight, bias, eps, rms)
        return y, (total if residual is not None else None), (None if rms else mean), rstd
    return forward


def _cpp_backward(kind: str):
    def backward(grad_y, grad_sum, x, weight, mean, rstd, rms, need_weight_grad, need_bias_grad):
        dx, dweight, dbias = _ext.load(kind).layer_norm_backward(
            grad_y, grad_sum, x, weight, mean, rstd, rms, need_weight_grad, need_bias_grad)
        return dx, (dweight if need_weight_grad else None), (dbias if need_bias_grad else None)
    return backward


def _cpp_supports(kind: str):
    def supports(args: LayerNormArgs) -> list[str]:
        # csrc/cpu and csrc/cuda: any float dtype, rows of any width below 2^31 (checked upstream).
        return common.dtype_reason(args.x.dtype)
    return supports


backends.register(OP, "reference", _reference_forward, reference.layer_norm_backward)
backends.register_module(OP, "triton", "engine.kernels.layer_norm", "layer_norm_fwd", "layer_norm_bwd", "supports")
common.register_cpp(OP, _cpp_forward, _cpp_backward, _cpp_supports)


# ---------------------------------------------------------------------------------------------
# Autograd. Absent outputs travel as empty tensors (custom ops cannot return None).


def _layer_norm_plain(x, residual, weight, bias, eps, rms, backend):
    """The forward as eager code calls it: (y, sum or None, mean or None, rstd)."""
    return backends.implementation(OP, backend).forward(x, residual, weight, bias, eps, rms)


def _layer_norm_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                        eps: float, rms: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, total, mean, rstd = _layer_norm_plain(x, residual, weight, bias, eps, rms, backend)
    return (y, x.new_empty(0) if total is None else total, rstd.new_empty(0) if mean is None else mean, rstd)


def _layer_norm_backward(grad_y: Tensor, grad_sum: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                         mean: Optional[Tensor], rstd: Tensor, rms: bool, need_weight_grad: bool,
                         need_bias_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = backends.implementation(OP, backend).backward(
        grad_y, grad_sum, x, weight, mean, rstd, rms, need_weight_grad, need_bias_grad)
    return (dx, x.new_empty(0) if dweight is None else dweight, x.new_empty(0) if dbias is None else dbias)


_layer_norm_op = torch.library.custom_op("engine::layer_norm", _layer_norm_forward, mutates_args=())
_layer_norm_backward_op = torch.library.custom_op("engine::layer_norm_backward", _layer_norm_backward,
                                                  mutates_args=())


@_layer_norm_op.register_fake
def _layer_norm_fake(x, residual, weight, bias, eps, rms, backend):
    m, n = x.shape
    acc = reference.accumulator_dtype(x.dtype)
    return (x.new_empty(m, n), x.new_empty((m, n) if residual is not None else (0,)),
            x.new_empty(0 if rms else m, dtype=acc), x.new_empty(m, dtype=acc))


@_layer_norm_backward_op.register_fake
def _layer_norm_backward_fake(grad_y, grad_sum, x, weight, mean, rstd, rms, need_weight_grad, need_bias_grad,
                              backend):
    n = x.shape[1]
    grad_dtype = weight.dtype if weight is not None else x.dtype
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(n if need_weight_grad else 0, dtype=grad_dtype),
            x.new_empty(n if need_bias_grad else 0, dtype=grad_dtype))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms, backend = inputs
    y, total, mean, rstd = output
    normalized_input = total if residual is not None else x
    ctx.save_for_backward(normalized_input, weight, mean, rstd)
    ctx.has_residual, ctx.has_bias, ctx.rms, ctx.backend = residual is not None, bias is not None, rms, backend
    ctx.set_materialize_grads(False)  # an unused sum output sends no gradient, not zeros


def _backward_through(layer_norm_backward):
    """The autograd backward, calling `layer_norm_backward` (the custom op, or its function)."""
    def backward(ctx, grad_y, grad_sum, grad_mean, grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        if grad_y is None:  # only the sum output was used
            grad_y = torch.zeros_like(x)
        need_weight_grad = weight is not None and ctx.needs_input_grad[2]
        need_bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
        dx, dweight, dbias = layer_norm_backward(
            grad_y, grad_sum if ctx.has_residual else None, x, weight, None if ctx.rms else mean, rstd,
            ctx.rms, need_weight_grad, need_bias_grad, ctx.backend)
        return (dx, dx if ctx.has_residual else None, dweight if need_weight_grad else None,
                dbias if need_bias_grad else None, None, None, None)
    return backward


torch.library.register_autograd("engine::layer_norm", _backward_through(_layer_norm_backward_op),
                                setup_context=_setup_context)
_LayerNormEager = common.eager_op(_layer_norm_forward, _setup_context, _backward_through(_layer_norm_backward))


# ---------------------------------------------------------------------------------------------


def layer_norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float, rms: bool, backend: Optional[str]) -> tuple[Tensor, Optional[Tensor]]:
    """Normalize the rows of x [M, N] (+ residual [M, N]) on the chosen backend (None: automatic).
    Returns (y [M, N], x + residual or None). Inputs are validated and laid out (unit column
    stride) by engine.functional."""
    args = LayerNormArgs(x, residual, weight, bias, eps, rms)
    chosen = backends.select(OP, x.device, args, backend)
    y, total, _, _ = common.run(_layer_norm_op, _LayerNormEager, _layer_norm_plain, (*args, chosen),
                                common.needs_grad(x, residual, weight, bias))
    return y, (total if residual is not None else None)
