"""Drop-in replacements for torch.nn modules, running the engine's kernels."""
from engine.nn.linear import GELU, FeedForward, Linear
from engine.nn.normalization import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm", "GELU", "Linear", "FeedForward"]
