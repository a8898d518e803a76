"""Drop-in replacements for torch.nn modules, running the engine's kernels."""
from engine.nn.linear import GELU, FeedForward, Linear
from engine.nn.normalization import LayerNorm, RMSNorm
from engine.nn.attention import MultiheadAttention
from engine.nn.transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                                   TransformerEncoderLayer)
from engine.nn.embedding import Embedding, LearnedPositionalEmbedding, SinusoidalPositionalEncoding

__all__ = ["LayerNorm", "RMSNorm", "GELU", "Linear", "FeedForward", "MultiheadAttention", "TransformerEncoderLayer",
           "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder", "Transformer", "Embedding",
           "LearnedPositionalEmbedding", "SinusoidalPositionalEncoding"]
