"""Plain-PyTorch versions of every engine op: the test oracle and the fallback backend.

Each forward function is the op's math written once, as directly as torch allows, and is
differentiable by torch's autograd: the tests run it on float64 inputs as the ground truth.
The `reference` backend (engine/ops/*.py) runs the forward functions, and for backward the
closed-form gradients below them, which the kernels implement too; the tests check those
against torch's autograd of the forward. Inputs are already validated (engine/functional.py).
"""
from typing import Optional

import torch
from torch import Tensor


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate in: fp64 for fp64 data, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float, rms: bool) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Layer norm (or RMS norm) over the last dim of x [..., N], after adding `residual`.

    Returns (y, sum, mean, rstd): y [..., N] in x's dtype; sum = x + residual as stored in x's
    dtype (None without residual; the normalized value is this rounded sum, as in the kernels);
    mean and rstd [...] in the accumulator dtype (mean is zeros for RMS norm).
    """
    total = x if residual is None else x + residual
    v = total.to(accumulator_dtype(x.dtype))
    mean = torch.zeros_like(v[..., 0]) if rms else v.mean(-1)
    centered = v - mean.unsqueeze(-1)
    rstd = torch.rsqrt(centered.square().mean(-1) + eps)
    y = centered * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(v.dtype)
    if bias is not None:
        y = y + bias.to(v.dtype)
    return y.to(x.dtype), (None if residual is None else total), mean, rstd


def layer_norm_backward(grad_y: Tensor, grad_sum: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                        mean: Optional[Tensor], rstd: Tensor, rms: bool, need_weight_grad: bool,
                        need_bias_grad: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of `layer_norm` from its saved statistics, x [M, N] being the normalized input
    (x, or the stored sum): the closed form every kernel implements, in the accumulator dtype.
    Returns (dx [M, N], dweight [N] or None, dbias [N] or None)."""
    acc = rstd.dtype
    dy = grad_y.to(acc)
    centered = x.to(acc) if rms else x.to(acc) - mean.unsqueeze(-1)
    xhat = centered * rstd.unsqueeze(-1)
    g = dy if weight is None else dy * weight.to(acc)
    dx = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if not rms:
        dx = dx - g.mean(-1, keepdim=True)
    dx = dx * rstd.unsqueeze(-1)
    if grad_sum is not None:
        dx = dx + grad_sum.to(acc)
    grad_dtype = weight.dtype if weight is not None else x.dtype
    dweight = (dy * xhat).sum(0).to(grad_dtype) if need_weight_grad else None
    dbias = dy.sum(0).to(grad_dtype) if need_bias_grad else None
    return dx.to(x.dtype), dweight, dbias
