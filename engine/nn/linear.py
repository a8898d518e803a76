"""GELU, Linear and the transformer FeedForward block: torch.nn-compatible modules whose forward
runs the engine's fused kernels."""
from typing import Optional

import torch
from torch import Tensor

import engine.functional as EF
from engine.reference import GATED_ACTIVATIONS

# A feed-forward block has an activation: every name of linear's but None and "none".
FEED_FORWARD_ACTIVATIONS = tuple(a for a in EF.ACTIVATION_NAMES if a not in (None, "none"))


class GELU(torch.nn.GELU):
    """torch.nn.GELU(approximate="none"), computed by engine.functional.gelu."""

    def forward(self, input: Tensor) -> Tensor:
        return EF.gelu(input, self.approximate)


class Linear(torch.nn.Linear):
    """torch.nn.Linear(in_features, out_features, bias=True, device=None, dtype=None) with an
    `activation` (one of engine.functional.ACTIVATION_NAMES) fused into the product's epilogue.
    Loads a torch.nn.Linear state_dict (same parameters and keys). A gated activation ("swiglu",
    "geglu", "geglu_tanh") needs an even out_features: the weight's first half of the rows is the
    gate, the second the up projection, and the output has out_features / 2 features."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 activation: Optional[str] = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        if activation not in EF.ACTIVATION_NAMES:
            raise ValueError(f"activation must be one of {EF.ACTIVATION_NAMES}, got {activation!r}")
        if activation in GATED_ACTIVATIONS and out_features % 2:
            raise ValueError(f"the gated activation {activation!r} needs an even out_features (gate, then up "
                             f"rows), got {out_features}")
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        return EF.linear(input, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


class FeedForward(torch.nn.Module):
    """The transformer feed-forward block: dropout(act(x W1^T + b1)) W2^T + b2 (+ residual), with
    bias, activation, dropout and residual fused into the two products (engine.functional.
    feed_forward). Parameters are named like torch.nn.TransformerEncoderLayer's (linear1,
    linear2); dropout applies in training mode only. A gated activation ("swiglu", "geglu",
    "geglu_tanh") makes linear1 [2 * d_ff, d_model]: the gate's rows, then the up projection's."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if activation not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"activation must be one of {FEED_FORWARD_ACTIVATIONS}, got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        gated_width = 2 * d_ff if activation in GATED_ACTIVATIONS else d_ff
        self.linear1 = torch.nn.Linear(d_model, gated_width, bias, device, dtype)
        self.linear2 = torch.nn.Linear(d_ff, d_model, bias, device, dtype)
        self.activation = activation
        self.dropout = dropout

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return EF.feed_forward(input, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                               self.activation, self.dropout if self.training else 0.0, residual)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, dropout={self.dropout}"
