"""Fused linear + cross-entropy: the loss of cross_entropy(hidden @ weight^T + bias, targets)
without the [N, V] logits ever existing whole.

Where each piece lives:
    kernels          the per-chunk row step: kernels/cross_entropy.py (Triton),
                     csrc/cpu/cross_entropy.cpp, csrc/cuda/cross_entropy.cu, reference.cross_entropy_rows
    implementations  registered below for the reference, triton, cpu and cuda backends
    the chunk loop   _chunked below, shared by every backend: the matrix products are torch.mm
                     (the BLAS / cuBLAS), only the row step is the backend's
    autograd         the custom ops engine::linear_cross_entropy / engine::linear_cross_entropy_backward
    public API       engine.functional.linear_cross_entropy

Every implementation takes the same arguments:
    forward(logits, targets, ignore_index, label_smoothing) -> loss
        logits: [R, V] contiguous, overwritten with d loss_r / d logits (softmax minus the smoothed
        one-hot; zero rows where the target is ignore_index); targets: [R] int64, each in [0, V) or
        ignore_index. loss: [R] in fp32 (fp64 for fp64 data), 0 for ignored rows.

How the loop runs. The rows go in chunks of CHUNK_ELEMENTS // V rows (at least one), so that a
chunk's logits [C, V] hold about CHUNK_ELEMENTS values (32 MB in fp32). Per chunk:
    logits = h @ W^T + b                  [C, V]
    loss[rows] = row step (logits -> d_logits in place)
    d_logits *= scale                     (1 / non-ignored rows for "mean"; per-row grad for "none")
    d_hidden[rows] = d_logits @ W         [C, d]
    d_weight += d_logits^T @ h            [V, d]   (fp32 for 16-bit data: the chunks' roundings
    d_bias += column sums of d_logits     [V]       would otherwise add up)
For "mean" and "sum" the loss is a scalar, so the gradients are complete after the forward (as
Liger-Kernel computes them): the forward computes them whenever an input needs a gradient, and the
backward only multiplies them by the loss's gradient, out of place: returning the saved tensors
when that is 1 would spare a copy of d_weight, but AccumulateGrad then adopts them as .grad and
the next backward of a retained graph finds them modified. For "none" the gradient of each row's loss
is only known in the backward, which runs the loop again (the logits products once more) with that
gradient as the per-row scale; the forward then computes the losses alone.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from engine import _ext, backends, reference
from engine.ops import common

OP = "cross_entropy"

# A chunk's logits hold about this many values: 2^23 (32 MB in fp32, 8 rows of the 50257-token
# GPT-2 vocabulary short of 2^23)
CHUNK_ELEMENTS = 1 << 23


class CrossEntropyArgs(NamedTuple):
    """The call's arguments, which `supports` reads: the row step sees chunks of logits
    [<= chunk_rows(V), V] in hidden's dtype, V = weight.shape[0]."""
    hidden: Tensor
    weight: Tensor
    targets: Tensor
    ignore_index: int
    label_smoothing: float


# ---------------------------------------------------------------------------------------------
# Backends


def _cpp_forward(kind: str):
    def forward(logits, targets, ignore_index, label_smoothing):
        return _ext.load(kind).cross_entropy_rows(logits, targets, ignore_index, label_smoothing)
    return forward


def _cpp_supports(kind: str):
    def supports(args: CrossEntropyArgs) -> list[str]:
        # csrc/cpu and csrc/cuda: any float dtype, rows of any width below 2^31 (checked upstream).
        return common.dtype_reason(args.hidden.dtype)
    return supports


backends.register(OP, "reference", reference.cross_entropy_rows)
backends.register_module(OP, "triton", "engine.kernels.cross_entropy", "cross_entropy_rows", None, "supports")
common.register_cpp(OP, _cpp_forward, None, _cpp_supports)


# ---------------------------------------------------------------------------------------------
# The chunk loop


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of `vocab`: CHUNK_ELEMENTS // vocab, at least 1."""
    return max(1, CHUNK_ELEMENTS // vocab)


def _add_product(total: Tensor, a: Tensor, b: Tensor) -> None:
    """total += a @ b: in place when total has the operands' dtype; 16-bit products are added to
    an fp32 total."""
    if total.dtype == a.dtype:
        total.addmm_(a, b)
    else:
        total += torch.mm(a, b)


def _chunked(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], ignore_index: int,
             label_smoothing: float, scale: Optional[Tensor], need_hidden_grad: bool, need_weight_grad: bool,
             need_bias_grad: bool, backend: str) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The loop of the module docstring. hidden [N, d], weight [V, d], targets [N], bias [V];
    scale: [N] (a stride-0 view for one value) multiplying each row's gradient, or None for 1.
    Returns (loss [N] in the accumulator dtype, d_hidden [N, d], d_weight [V, d] and d_bias [V],
    each None where not needed; d_weight and d_bias in the accumulator dtype)."""
    row_step = backends.implementation(OP, backend).forward
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = reference.accumulator_dtype(hidden.dtype)
    loss = hidden.new_empty(n, dtype=acc)
    d_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight_grad else None
    d_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_bias_grad else None
    step = chunk_rows(vocab)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        h = hidden[rows]
        logits = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
        loss[rows] = row_step(logits, targets[rows], ignore_index, label_smoothing)
        if not (need_hidden_grad or need_weight_grad or need_bias_grad):
            continue
        d_logits = logits if scale is None else logits.mul_(scale[rows, None])
        if need_hidden_grad:
            torch.mm(d_logits, weight, out=d_hidden[rows])
        if need_weight_grad:
            _add_product(d_weight, d_logits.t(), h)
        if need_bias_grad:
            d_bias += d_logits.sum(0, dtype=acc)
    return loss, d_hidden, d_weight, d_bias


# ---------------------------------------------------------------------------------------------
# Autograd. Absent gradients travel as empty tensors (custom ops cannot return None).


def _linear_cross_entropy_plain(hidden, weight, targets, bias, ignore_index, label_smoothing, reduction,
                                need_hidden_grad, need_weight_grad, need_bias_grad, backend):
    """The forward as eager code calls it: (loss, d_hidden, d_weight, d_bias), the gradients of
    "mean" / "sum" in the inputs' dtypes where asked for, else None. loss is a scalar for "mean"
    and "sum" (NaN for "mean" when every target is ignored, as in torch), [N] for "none"."""
    if reduction == "none":
        loss, _, _, _ = _chunked(hidden, weight, targets, bias, ignore_index, label_smoothing, None,
                                 False, False, False, backend)
        return loss.to(hidden.dtype), None, None, None
    counted = (targets != ignore_index).sum()
    scale = None
    if reduction == "mean":  # the gradients of a mean over no rows are 0 (torch's), not NaN
        scale = (1.0 / counted.clamp(min=1).to(reference.accumulator_dtype(hidden.dtype))).expand(targets.shape[0])
    loss, d_hidden, d_weight, d_bias = _chunked(hidden, weight, targets, bias, ignore_index, label_smoothing, scale,
                                                need_hidden_grad, need_weight_grad, need_bias_grad, backend)
    total = loss.sum() / counted if reduction == "mean" else loss.sum()
    return total.to(hidden.dtype), d_hidden, _to(d_weight, weight.dtype), _to(d_bias, weight.dtype)


def _to(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _linear_cross_entropy_forward(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                                  ignore_index: int, label_smoothing: float, reduction: str, need_hidden_grad: bool,
                                  need_weight_grad: bool, need_bias_grad: bool,
                                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, d_hidden, d_weight, d_bias = _linear_cross_entropy_plain(
        hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, need_hidden_grad,
        need_weight_grad, need_bias_grad, backend)
    return loss, _empty_if_none(d_hidden, hidden), _empty_if_none(d_weight, weight), _empty_if_none(d_bias, weight)


def _linear_cross_entropy_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor,
                                   bias: Optional[Tensor], ignore_index: int, label_smoothing: float,
                                   need_hidden_grad: bool, need_weight_grad: bool, need_bias_grad: bool,
                                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of reduction="none" for the per-row loss gradient grad_loss [N]: the loop
    once more, grad_loss scaling each row's gradient."""
    acc = reference.accumulator_dtype(hidden.dtype)
    _, d_hidden, d_weight, d_bias = _chunked(hidden, weight, targets, bias, ignore_index, label_smoothing,
                                             grad_loss.to(acc), need_hidden_grad, need_weight_grad, need_bias_grad,
                                             backend)
    return (_empty_if_none(d_hidden, hidden), _empty_if_none(_to(d_weight, weight.dtype), weight),
            _empty_if_none(_to(d_bias, weight.dtype), weight))


_linear_cross_entropy_op = torch.library.custom_op("engine::linear_cross_entropy", _linear_cross_entropy_forward,
                                                   mutates_args=())
_linear_cross_entropy_backward_op = torch.library.custom_op("engine::linear_cross_entropy_backward",
                                                            _linear_cross_entropy_backward, mutates_args=())


@_linear_cross_entropy_op.register_fake
def _linear_cross_entropy_fake(hidden, weight, targets, bias, ignore_index, label_smoothing, reduction,
                               need_hidden_grad, need_weight_grad, need_bias_grad, backend):
    gradients = reduction != "none"
    return (hidden.new_empty(targets.shape if reduction == "none" else ()),
            hidden.new_empty(hidden.shape if gradients and need_hidden_grad else (0,)),
            weight.new_empty(weight.shape if gradients and need_weight_grad else (0,)),
            weight.new_empty(weight.shape[:1] if gradients and need_bias_grad else (0,)))


@_linear_cross_entropy_backward_op.register_fake
def _linear_cross_entropy_backward_fake(grad_loss, hidden, weight, targets, bias, ignore_index, label_smoothing,
                                        need_hidden_grad, need_weight_grad, need_bias_grad, backend):
    return (hidden.new_empty(hidden.shape if need_hidden_grad else (0,)),
            weight.new_empty(weight.shape if need_weight_grad else (0,)),
            weight.new_empty(weight.shape[:1] if need_bias_grad else (0,)))


def _setup_context(ctx, inputs, output):
    (hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, need_hidden_grad, need_weight_grad,
     need_bias_grad, backend) = inputs
    _, d_hidden, d_weight, d_bias = output
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, targets, bias)
    else:
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
    ctx.reduction, ctx.ignore_index, ctx.label_smoothing = reduction, ignore_index, label_smoothing
    ctx.backend = backend
    ctx.needs = need_hidden_grad, need_weight_grad, need_bias_grad


def _backward_through(linear_cross_entropy_backward):
    """The autograd backward, calling `linear_cross_entropy_backward` (the custom op, or its
    function) for reduction="none"; "mean" and "sum" scale the forward's gradients."""
    def backward(ctx, grad_loss, grad_d_hidden, grad_d_weight, grad_d_bias):
        need_hidden_grad, need_weight_grad, need_bias_grad = ctx.needs
        if ctx.reduction == "none":
            hidden, weight, targets, bias = ctx.saved_tensors
            d_hidden, d_weight, d_bias = linear_cross_entropy_backward(
                grad_loss, hidden, weight, targets, bias, ctx.ignore_index, ctx.label_smoothing, need_hidden_grad,
                need_weight_grad, need_bias_grad, ctx.backend)
        else:
            d_hidden, d_weight, d_bias = (g * grad_loss for g in ctx.saved_tensors)
        return (d_hidden if need_hidden_grad else None, d_weight if need_weight_grad else None, None,
                d_bias if need_bias_grad else None, None, None, None, None, None, None, None)
    return backward


torch.library.register_autograd("engine::linear_cross_entropy",
                                _backward_through(_linear_cross_entropy_backward_op), setup_context=_setup_context)
_LinearCrossEntropyEager = common.eager_op(_linear_cross_entropy_forward, _setup_context,
                                           _backward_through(_linear_cross_entropy_backward))


# ---------------------------------------------------------------------------------------------


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], ignore_index: int,
                         label_smoothing: float, reduction: str, backend: Optional[str]) -> Tensor:
    """cross_entropy(hidden @ weight^T + bias, targets) on the chosen backend (None: automatic),
    in chunks of rows. hidden [N, d] (unit column stride), weight [V, d], targets [N] int64
    (contiguous), bias [V]. Returns the loss: a scalar for "mean" and "sum", [N] for "none".
    Inputs are validated and laid out by engine.functional."""
    args = CrossEntropyArgs(hidden, weight, targets, ignore_index, label_smoothing)
    chosen = backends.select(OP, hidden.device, args, backend)
    record_grad = common.needs_grad(hidden, weight, bias)
    needs = (record_grad and hidden.requires_grad, record_grad and weight.requires_grad,
             record_grad and bias is not None and bias.requires_grad)
    inputs = (hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, *needs, chosen)
    loss, _, _, _ = common.run(_linear_cross_entropy_op, _LinearCrossEntropyEager, _linear_cross_entropy_plain, inputs,
                               record_grad)
    return loss
