"""Token and position embeddings.

- Embedding: torch.nn.Embedding itself, re-exported as the one token embedding (a row gather has
  no fused kernel to gain; models scale or add positions themselves).
- LearnedPositionalEmbedding: an nn.Embedding over position ids (GPT-2, BERT).
- SinusoidalPositionalEncoding: the fixed sin/cos table of "Attention Is All You Need".

Both position modules share one call: module(positions, offset=0), positions an int length L (ids
offset .. offset + L - 1) or a tensor of position ids, offset an int or a [B] tensor (per-sequence
starts, e.g. the cache length during generation). They return the position vectors only; the
caller adds them to the token embeddings.
"""
import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

Embedding = torch.nn.Embedding

Positions = Union[int, Tensor]
Offset = Union[int, Tensor]


class LearnedPositionalEmbedding(torch.nn.Embedding):
    """A learned table of max_positions position vectors [max_positions, dim] (parameter `weight`,
    initialized N(0, 1) as torch.nn.Embedding; loads an nn.Embedding state_dict).

    forward(positions, offset=0):
        int L, int offset          -> [L, dim]     (positions offset .. offset + L - 1)
        int L, offset [B]          -> [B, L, dim]  (row b starts at offset[b])
        ids [..., L] (integer), offset int or [B] (ids [B, L]) -> [..., L, dim] (ids + offset)
    Positions outside [0, max_positions) raise a ValueError (checked without a device sync for CPU
    tensors and Python ints; CUDA index tensors are checked by the gather itself).
    """

    def __init__(self, max_positions: int, dim: int, device=None, dtype=None) -> None:
        _check_size("max_positions", max_positions)
        _check_size("dim", dim)
        super().__init__(max_positions, dim, device=device, dtype=dtype)

    @property
    def max_positions(self) -> int:
        return self.num_embeddings

    def forward(self, positions: Positions, offset: Offset = 0) -> Tensor:
        return super().forward(_position_ids(positions, offset, self.num_embeddings, self.weight.device))

    def extra_repr(self) -> str:
        return f"max_positions={self.num_embeddings}, dim={self.embedding_dim}"


class SinusoidalPositionalEncoding(torch.nn.Module):
    """The fixed encodings of "Attention Is All You Need": for position p and pair index i,
    pe[p, 2i] = sin(p / 10000^(2i / dim)), pe[p, 2i + 1] = cos(p / 10000^(2i / dim)); an odd dim
    ends with a sine. The table `pe` [max_len, dim] is computed in float64, stored in `dtype`
    (default: torch's default dtype) as a non-persistent buffer (not in the state_dict; it moves
    with .to()). forward(positions, offset=0) as LearnedPositionalEmbedding's."""

    def __init__(self, dim: int, max_len: int = 5000, device=None, dtype=None) -> None:
        super().__init__()
        _check_size("dim", dim)
        _check_size("max_len", max_len)
        self.dim = dim
        self.max_len = max_len
        position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # [max_len, 1]
        # 1 / 10000^(2i / dim) for i = 0 .. ceil(dim / 2) - 1
        inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
        angles = position * inv_freq  # [max_len, ceil(dim / 2)]
        pe = torch.empty(max_len, dim, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(angles)
        pe[:, 1::2] = torch.cos(angles[:, :dim // 2])
        self.register_buffer("pe", pe.to(device=device, dtype=dtype or torch.get_default_dtype()), persistent=False)

    def forward(self, positions: Positions, offset: Offset = 0) -> Tensor:
        return F.embedding(_position_ids(positions, offset, self.max_len, self.pe.device), self.pe)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_len={self.max_len}"


def _position_ids(positions: Positions, offset: Offset, limit: int, device) -> Tensor:
    """Position ids (int64) from a length or explicit ids plus an offset; see the classes above."""
    if isinstance(offset, Tensor):
        if offset.dtype.is_floating_point or offset.dtype == torch.bool or offset.dim() > 1:
            raise TypeError(f"offset must be an int or an integer tensor of shape [B], got {offset.dtype} "
                            f"with shape {tuple(offset.shape)}")
    elif isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int or an integer tensor, got {type(offset).__name__}")

    if isinstance(positions, Tensor):
        if positions.dtype.is_floating_point or positions.dtype == torch.bool or positions.is_complex():
            raise TypeError(f"position ids must be an integer tensor, got {positions.dtype}")
        ids = positions.long()
        if isinstance(offset, Tensor):
            if offset.dim() == 1 and (ids.dim() < 1 or ids.shape[0] != offset.shape[0]):
                raise ValueError(f"an offset of shape {tuple(offset.shape)} needs position ids [B, L] with "
                                 f"B = {offset.shape[0]}, got shape {tuple(ids.shape)}")
            ids = ids + offset.long().reshape(offset.shape + (1,) * (ids.dim() - offset.dim()))
        else:
            ids = ids + offset
    elif isinstance(positions, int) and not isinstance(positions, bool):
        if positions < 0:
            raise ValueError(f"the number of positions must be non-negative, got {positions}")
        if isinstance(offset, int):
            if offset < 0 or offset + positions > limit:
                raise ValueError(f"positions {offset} .. {offset + positions - 1} exceed the table of {limit} "
                                 f"positions")
            return torch.arange(offset, offset + positions, device=device)
        ids = offset.to(device=device, dtype=torch.long).reshape(-1, 1) + torch.arange(positions, device=device)
    else:
        raise TypeError(f"positions must be an int (a length) or a tensor of position ids, got "
                        f"{type(positions).__name__}")
    if ids.device.type == "cpu" and ids.numel() and (ids.min() < 0 or ids.max() >= limit):
        raise ValueError(f"position ids must lie in [0, {limit}), got values in "
                         f"[{ids.min().item()}, {ids.max().item()}]")
    return ids.to(device)


def _check_size(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
