"""LayerNorm and RMSNorm: torch.nn's modules (same constructor, parameters, state_dict keys and
repr) whose forward runs the engine's fused kernels."""
import torch
from torch import Tensor

import engine.functional as EF


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
    device=None, dtype=None), computed by engine.functional.layer_norm."""

    def forward(self, input: Tensor) -> Tensor:
        return EF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True, device=None,
    dtype=None), computed by engine.functional.rms_norm."""

    def forward(self, input: Tensor) -> Tensor:
        return EF.rms_norm(input, self.normalized_shape, self.weight, self.eps)
