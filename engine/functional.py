"""The engine's ops with torch.nn.functional's signatures (plus documented extras).

Each function validates its arguments (a TypeError or ValueError naming the argument, before any
kernel runs), then hands them to its op in engine/ops/, which chooses the backend (engine.backends)
and runs it under autograd. Every op takes a keyword-only `backend=` ("reference", "triton",
"cpu", "cuda"): an explicit choice that raises engine.backends.BackendError if that backend
cannot serve the call. Without it, `engine.backends.use(...)`, then ENGINE_BACKEND, then the
automatic order apply.
"""
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from engine import _validate, ops, reference

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]

ShapeLike = Union[int, Sequence[int], torch.Size]


# ---------------------------------------------------------------------------------------------
# Normalization


def layer_norm(input: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *, backend: Optional[str] = None) -> Tensor:
    """Same as torch.nn.functional.layer_norm: normalize over the trailing `normalized_shape`
    dims of input [..., *normalized_shape], then scale by weight and shift by bias (both shaped
    like normalized_shape). Statistics in fp32 (fp64 for fp64 input)."""
    y, _ = _normalize(input, None, normalized_shape, weight, bias, eps, rms=False, backend=backend)
    return y


def rms_norm(input: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
             eps: Optional[float] = None, *, backend: Optional[str] = None) -> Tensor:
    """Same as torch.nn.functional.rms_norm: input / sqrt(mean(input^2) + eps) * weight over the
    trailing dims; eps=None means torch.finfo(input.dtype).eps."""
    y, _ = _normalize(input, None, normalized_shape, weight, None, eps, rms=True, backend=backend)
    return y


def add_layer_norm(input: Tensor, residual: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, *,
                   backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """The pre-LN residual step in one pass: returns (layer_norm(input + residual), input + residual).
    The sum is returned (in input's dtype) to serve as the next residual; what is normalized is
    that stored sum."""
    y, total = _normalize(input, residual, normalized_shape, weight, bias, eps, rms=False, backend=backend)
    return y, total


def add_rms_norm(input: Tensor, residual: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
                 eps: Optional[float] = None, *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """add_layer_norm's RMS-norm twin: returns (rms_norm(input + residual), input + residual)."""
    y, total = _normalize(input, residual, normalized_shape, weight, None, eps, rms=True, backend=backend)
    return y, total


def _normalize(input, residual, normalized_shape, weight, bias, eps, rms: bool, backend):
    """Validates, flattens normalized_shape to one trailing dim N, and runs the layer-norm op."""
    x = _validate.tensor("input", input)
    dims = _validate.normalized_shape(normalized_shape, x)
    for name, value in (("residual", residual), ("weight", weight), ("bias", bias)):
        _validate.optional_tensor(name, value)
        _validate.same_dtype(name, value, "input", x)
        _validate.same_device(name, value, "input", x)
    _validate.shape("residual", residual, x.shape)
    _validate.shape("weight", weight, dims)
    _validate.shape("bias", bias, dims)
    if eps is None:  # rms_norm's default, as in torch
        eps = torch.finfo(x.dtype).eps
    eps = _validate.number("eps", eps, low=0.0)

    n = math.prod(dims)
    leading = x.shape[:x.dim() - len(dims)]
    x_rows = x.reshape(*leading, n)
    residual_rows = residual.reshape(*leading, n) if residual is not None else None
    weight_flat = weight.reshape(n) if weight is not None else None
    bias_flat = bias.reshape(n) if bias is not None else None
    if x.numel() == 0:  # nothing to compute: the plain torch math gives the empty results
        y, total, _, _ = reference.layer_norm(x_rows, residual_rows, weight_flat, bias_flat, eps, rms)
    else:
        y, total = ops.layer_norm.layer_norm(x_rows, residual_rows, weight_flat, bias_flat, eps, rms, backend)
    return y.view(x.shape), (total.view(x.shape) if total is not None else None)
