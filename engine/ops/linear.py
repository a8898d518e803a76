"""Linear layers with fused epilogues (bias, activation, dropout, residual) and GeLU, as
autograd ops. The transformer feed-forward block is two of them (engine.functional.feed_forward).

Where each piece lives:
    kernels          kernels/linear.py (Triton), csrc/cpu/linear.cpp, csrc/cuda/linear.cu
    implementations  registered below for the reference, triton, cpu and cuda backends
    autograd         the custom ops engine::linear / linear_backward / gelu / gelu_backward
    public API       engine.functional.linear, feed_forward, gelu

Every implementation of "linear" takes the same arguments (validated and laid out by `linear()`):
    forward(x, weight, bias, activation, dropout_p, seed, residual, return_dropout_mask)
        -> (out, pre_activation, dropout_mask)
        out = dropout(act(x @ weight^T + bias)) + residual
    backward(grad_out, x, weight, pre_activation, activation, dropout_p, seed, need_weight_grad,
             need_bias_grad) -> (dx, dweight, dbias)
        g = grad_out * keep / (1 - p) * act'(pre_activation)   (applied inside the product kernels)
        dx = g @ weight,  dweight = g^T @ x,  dbias = g summed over rows; the residual's gradient is
        grad_out itself (the autograd layer passes it on).
    x [M, K] with unit column stride; weight [N, K] (torch.nn.Linear's layout) with any strides;
    bias [N] or None; activation one of "none", "gelu" (erf form), "gelu_tanh", "relu", "silu", or
    a gated one, "swiglu", "geglu", "geglu_tanh" (engine/reference.py GATED_ACTIVATIONS); dropout_p
    in [0, 1) with seed: the dropout stream of engine/reference.py (Philox, counters (n, m, 0) for
    element [m, n] of out).
    The output width H is N, or N / 2 for a gated activation: the weight's first N / 2 rows make
    the gate, the others the up projection, out = act(gate) * up (dropout, residual after that),
    and the backward's g [M, N] = [g_out * up * act'(gate), g_out * act(gate)] with
    g_out = grad_out * keep / (1 - p) [M, H].
    residual [M, H] or None. out [M, H] contiguous in x's dtype. pre_activation [M, N]
    (x @ W^T + b, in x's dtype) is returned only when backward needs it (activation != "none"),
    else None. dropout_mask: bool [M, H] of kept elements when return_dropout_mask (a debug path
    for tests), else None. grad_out [M, H].
    dx [M, K] contiguous in x's dtype; dweight [N, K] and dbias [N] in the weight's dtype, or None
    when not needed.

"gelu": forward(x, approximate) -> y;  backward(grad_y, x, approximate) -> dx
    elementwise on a contiguous tensor of any shape; approximate "none" (erf) or "tanh".
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from engine import _ext, backends, reference
from engine.ops import common

OP = "linear"
GELU_OP = "gelu"


class LinearArgs(NamedTuple):
    """The linear forward's arguments but the seed (drawn per call inside the op), for `supports`."""
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    activation: str
    dropout_p: float
    residual: Optional[Tensor]
    return_dropout_mask: bool


class GeluArgs(NamedTuple):
    x: Tensor
    approximate: str


# ---------------------------------------------------------------------------------------------
# Backends. The reference backend: plain torch math (engine/reference.py).


def _reference_keep(seed, dropout_p, m, n, device):
    return reference.dropout_keep_mask(seed, dropout_p, m, n).view(m, n).to(device)


def _reference_forward(x, weight, bias, activation, dropout_p, seed, residual, return_dropout_mask):
    width = reference.output_width(activation, weight.shape[0])
    keep = _reference_keep(seed, dropout_p, x.shape[0], width, x.device) if dropout_p > 0 else None
    out, pre = reference.linear(x, weight, bias, activation, dropout_p, keep, residual)
    return (out, pre.to(x.dtype) if activation != "none" else None, keep if return_dropout_mask else None)


def _reference_backward(grad_out, x, weight, pre_activation, activation, dropout_p, seed, need_weight_grad,
                        need_bias_grad):
    acc = reference.accumulator_dtype(x.dtype)
    g = grad_out.to(acc)
    if dropout_p > 0:
        keep = _reference_keep(seed, dropout_p, x.shape[0], grad_out.shape[1], x.device)
        g = g * keep / (1.0 - dropout_p)
    if activation != "none":
        g = reference.activation_backward(g, pre_activation.to(acc), activation)
    dx = (g @ weight.to(acc)).to(x.dtype)
    dweight = (g.t() @ x.to(acc)).to(weight.dtype) if need_weight_grad else None
    dbias = g.sum(0).to(weight.dtype) if need_bias_grad else None
    return dx, dweight, dbias


def _reference_gelu(x, approximate):
    acc = reference.accumulator_dtype(x.dtype)
    return reference.activate(x.to(acc), "gelu" if approximate == "none" else "gelu_tanh").to(x.dtype)


def _reference_gelu_backward(grad_y, x, approximate):
    acc = reference.accumulator_dtype(x.dtype)
    slope = reference.activation_grad(x.to(acc), "gelu" if approximate == "none" else "gelu_tanh")
    return (grad_y.to(acc) * slope).to(x.dtype)


def _cpp_forward(kind: str):
    def forward(x, weight, bias, activation, dropout_p, seed, residual, return_dropout_mask):
        out, pre, keep = _ext.load(kind).linear_forward(x, weight, bias, activation, dropout_p, seed, residual,
                                                        return_dropout_mask)
        return (out, pre if activation != "none" else None,
                keep if return_dropout_mask and dropout_p > 0 else None)
    return forward


def _cpp_backward(kind: str):
    def backward(grad_out, x, weight, pre_activation, activation, dropout_p, seed, need_weight_grad, need_bias_grad):
        dx, dweight, dbias = _ext.load(kind).linear_backward(grad_out, x, weight, pre_activation, activation,
                                                             dropout_p, seed, need_weight_grad, need_bias_grad)
        return dx, (dweight if need_weight_grad else None), (dbias if need_bias_grad else None)
    return backward


def _cpp_supports(kind: str):
    def supports(args: LinearArgs) -> list[str]:
        # csrc/cpu and csrc/cuda: any float dtype; the dropout counters (n, m) are 32-bit.
        reasons = common.dtype_reason(args.x.dtype)
        if args.x.shape[0] >= 2**31 or args.weight.shape[0] >= 2**31:
            reasons.append(f"{args.x.shape[0]} rows x {args.weight.shape[0]} outputs: the C++ kernels take fewer "
                           "than 2^31 of each")
        return reasons
    return supports


def _cpp_gelu_forward(kind: str):
    def forward(x, approximate):
        return _ext.load(kind).gelu_forward(x, approximate)
    return forward


def _cpp_gelu_backward(kind: str):
    def backward(grad_y, x, approximate):
        return _ext.load(kind).gelu_backward(grad_y, x, approximate)
    return backward


def _cpp_gelu_supports(kind: str):
    def supports(args: GeluArgs) -> list[str]:
        return common.dtype_reason(args.x.dtype)
    return supports


backends.register(OP, "reference", _reference_forward, _reference_backward)
backends.register(GELU_OP, "reference", _reference_gelu, _reference_gelu_backward)
backends.register_module(OP, "triton", "engine.kernels.linear", "linear_fwd", "linear_bwd", "supports")
backends.register_module(GELU_OP, "triton", "engine.kernels.linear", "gelu_fwd", "gelu_bwd", "supports_gelu")
common.register_cpp(OP, _cpp_forward, _cpp_backward, _cpp_supports)
common.register_cpp(GELU_OP, _cpp_gelu_forward, _cpp_gelu_backward, _cpp_gelu_supports)


# ---------------------------------------------------------------------------------------------
# Autograd. The dropout seed is drawn inside the forward op from torch's default generator and
# returned as a tensor, so backward regenerates the same mask.


def _linear_plain(x, weight, bias, activation, dropout_p, residual, return_dropout_mask, backend):
    """The forward as eager code calls it: (out, pre-activation or None, seed, keep mask or None)."""
    seed = common.draw_seed() if dropout_p > 0 else 0
    out, pre, keep = backends.implementation(OP, backend).forward(
        x, weight, bias, activation, dropout_p, seed, residual, return_dropout_mask)
    return out, pre, seed, keep


def _linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, dropout_p: float,
                    residual: Optional[Tensor], return_dropout_mask: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out, pre, seed, keep = _linear_plain(x, weight, bias, activation, dropout_p, residual, return_dropout_mask,
                                         backend)
    return (out, pre if pre is not None else x.new_empty(0), torch.tensor(seed, dtype=torch.int64),
            keep if keep is not None else torch.empty(0, dtype=torch.bool, device=x.device))


def _linear_backward(grad_out: Tensor, x: Tensor, weight: Tensor, pre_activation: Optional[Tensor],
                     activation: str, dropout_p: float, seed: Tensor, need_weight_grad: bool,
                     need_bias_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = backends.implementation(OP, backend).backward(
        grad_out, x, weight, pre_activation, activation, dropout_p, int(seed.item()), need_weight_grad,
        need_bias_grad)
    return (dx, dweight if dweight is not None else weight.new_empty(0),
            dbias if dbias is not None else weight.new_empty(0))


_linear_op = torch.library.custom_op("engine::linear", _linear_forward, mutates_args=())
_linear_backward_op = torch.library.custom_op("engine::linear_backward", _linear_backward, mutates_args=())


@_linear_op.register_fake
def _linear_fake(x, weight, bias, activation, dropout_p, residual, return_dropout_mask, backend):
    m, n = x.shape[0], weight.shape[0]
    width = reference.output_width(activation, n)
    pre_shape = (m, n) if activation != "none" else (0,)
    keep_shape = (m, width) if return_dropout_mask and dropout_p > 0 else (0,)
    return (x.new_empty(m, width), x.new_empty(pre_shape), torch.empty((), dtype=torch.int64),
            x.new_empty(keep_shape, dtype=torch.bool))


@_linear_backward_op.register_fake
def _linear_backward_fake(grad_out, x, weight, pre_activation, activation, dropout_p, seed, need_weight_grad,
                          need_bias_grad, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape if need_weight_grad else (0,)),
            weight.new_empty(weight.shape[0] if need_bias_grad else 0))


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, activation, dropout_p, residual, return_dropout_mask, backend = inputs
    out, pre, seed, _ = output
    ctx.save_for_backward(x, weight, pre if activation != "none" else None, seed)
    ctx.activation, ctx.dropout_p, ctx.backend = activation, dropout_p, backend
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None


def _linear_backward_through(linear_backward):
    """The autograd backward, calling `linear_backward` (the custom op, or its function)."""
    def backward(ctx, grad_out, grad_pre, grad_seed, grad_keep):
        x, weight, pre, seed = ctx.saved_tensors
        need_weight_grad = ctx.needs_input_grad[1]
        need_bias_grad = ctx.has_bias and ctx.needs_input_grad[2]
        grad_out = grad_out.contiguous()
        dx, dweight, dbias = linear_backward(grad_out, x, weight, pre, ctx.activation, ctx.dropout_p, seed,
                                             need_weight_grad, need_bias_grad, ctx.backend)
        return (dx, dweight if need_weight_grad else None, dbias if need_bias_grad else None, None, None,
                grad_out if ctx.has_residual else None, None, None)
    return backward


torch.library.register_autograd("engine::linear", _linear_backward_through(_linear_backward_op),
                                setup_context=_linear_setup_context)
_LinearEager = common.eager_op(_linear_forward, _linear_setup_context, _linear_backward_through(_linear_backward))


def _gelu_forward(x: Tensor, approximate: str, backend: str) -> Tensor:
    return backends.implementation(GELU_OP, backend).forward(x, approximate)


def _gelu_backward(grad_y: Tensor, x: Tensor, approximate: str, backend: str) -> Tensor:
    return backends.implementation(GELU_OP, backend).backward(grad_y, x, approximate)


_gelu_op = torch.library.custom_op("engine::gelu", _gelu_forward, mutates_args=())
_gelu_backward_op = torch.library.custom_op("engine::gelu_backward", _gelu_backward, mutates_args=())


@_gelu_op.register_fake
def _gelu_fake(x, approximate, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_gelu_backward_op.register_fake
def _gelu_backward_fake(grad_y, x, approximate, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _gelu_setup_context(ctx, inputs, output):
    x, approximate, backend = inputs
    ctx.save_for_backward(x)
    ctx.approximate, ctx.backend = approximate, backend


def _gelu_backward_through(gelu_backward):
    """The autograd backward, calling `gelu_backward` (the custom op, or its function)."""
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        return gelu_backward(grad_y.contiguous(), x, ctx.approximate, ctx.backend), None, None
    return backward


torch.library.register_autograd("engine::gelu", _gelu_backward_through(_gelu_backward_op),
                                setup_context=_gelu_setup_context)
_GeluEager = common.eager_op(_gelu_forward, _gelu_setup_context, _gelu_backward_through(_gelu_backward))


# ---------------------------------------------------------------------------------------------


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, dropout_p: float,
           residual: Optional[Tensor], backend: Optional[str], return_dropout_mask: bool = False):
    """Runs the linear op on x [..., K] on the chosen backend (None: automatic). Inputs are
    validated (engine.functional). Returns (out [..., H], dropout_mask [M, H] or None), H = N or,
    for a gated activation, N / 2."""
    k, n = x.shape[-1], reference.output_width(activation, weight.shape[0])
    x2d = common.rows(x, k)
    residual2d = residual.reshape(-1, n).contiguous() if residual is not None else None
    args = LinearArgs(x2d, weight, bias, activation, float(dropout_p), residual2d, bool(return_dropout_mask))
    chosen = backends.select(OP, x.device, args, backend)
    out, _, _, keep = common.run(_linear_op, _LinearEager, _linear_plain, (*args, chosen),
                                 common.needs_grad(x, weight, bias, residual))
    out = out if x.dim() == 2 else out.view(*x.shape[:-1], n)
    return out, (keep if return_dropout_mask and dropout_p > 0 else None)


def gelu(x: Tensor, approximate: str, backend: Optional[str]) -> Tensor:
    """Runs the gelu op on the chosen backend. Inputs are validated."""
    x = x.contiguous()
    args = GeluArgs(x, approximate)
    chosen = backends.select(GELU_OP, x.device, args, backend)
    return common.run(_gelu_op, _GeluEager, _gelu_forward, (*args, chosen), common.needs_grad(x))
