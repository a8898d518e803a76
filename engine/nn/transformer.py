"""TransformerEncoderLayer, TransformerDecoderLayer, TransformerEncoder, TransformerDecoder and
Transformer: torch.nn's modules (same constructors, submodule names, state_dict keys; the same
parameter initialization for the same seed) whose forward methods are the engine's own:

- attention: engine.nn.MultiheadAttention (fused projections, flash-style attention);
- residual + norm: engine.functional.add_layer_norm, one pass for "x + sublayer(x)" and its
  normalization (post-LN: the normalized sum is the output; pre-LN: the sum is the next residual
  and the normalized sum the next sublayer's input);
- feed-forward: engine.functional.feed_forward, bias and activation (and the hidden dropout) in
  the products' epilogues, and in eval mode the residual add too.

In training mode the outer dropouts (dropout1/2/3, on a sublayer's output before the residual add)
run as torch.nn.Dropout: no kernel fuses them with the add, and the feed-forward residual is then
added outside the kernel. Nothing here converts inputs to nested tensors or takes torch's fast
paths.
"""
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

import engine.functional as EF
from engine.nn.attention import MultiheadAttention, check_attention_args, multi_head_attention
from engine.nn.normalization import LayerNorm

Activation = Union[str, Callable[[Tensor], Tensor]]


# ---------------------------------------------------------------------------------------------
# The layers


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=2048, dropout=0.1,
    activation=relu, layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True,
    device=None, dtype=None) running the engine's fused ops. activation: "relu", "gelu",
    torch.nn.functional.relu/gelu, torch.nn.ReLU/GELU modules (fused into the first product), or
    any other callable (run between two engine linears, unfused).

    forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False): src [S, B, E]
    ([B, S, E] with batch_first, [S, E] unbatched); masks as torch.nn.MultiheadAttention's (bool
    True = not allowed, float added; src_mask [S, S] or [B * nhead, S, S], src_key_padding_mask
    [B, S]); is_causal=True without src_mask means causal. A fully masked query row attends to
    nothing (zeros) where torch gives NaN.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Activation = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None,
                 dtype=None) -> None:
        _check_layer_args(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps)
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        _adopt(self)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            # x + sa(norm1(x)), then (norm2(sum), sum) in one pass; then sum + ff(norm2(sum))
            a = _attend(self, self.self_attn, self.dropout1, _norm(self.norm1, x), None, src_mask,
                        src_key_padding_mask, is_causal)
            h, x = _add_norm(self.norm2, a, x)
            return _feed_forward(self, h, self.dropout2, residual=x)
        # post-LN: norm1(x + sa(x)), then norm2(x + ff(x)), each add + norm one pass
        a = _attend(self, self.self_attn, self.dropout1, x, None, src_mask, src_key_padding_mask, is_causal)
        x, _ = _add_norm(self.norm1, a, x)
        f = _feed_forward(self, x, self.dropout2, residual=None)
        x, _ = _add_norm(self.norm2, f, x)
        return x


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """torch.nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward=2048, dropout=0.1,
    activation=relu, layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True,
    device=None, dtype=None) running the engine's fused ops (activation as in
    TransformerEncoderLayer).

    forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False): tgt [T, B, E],
    memory [S, B, E] (batch-first / unbatched as torch); tgt_mask [T, T] or [B * nhead, T, T],
    memory_mask [T, S] or [B * nhead, T, S], padding masks [B, T] / [B, S], with
    torch.nn.MultiheadAttention's conventions; tgt_is_causal=True without tgt_mask means causal.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Activation = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None,
                 dtype=None) -> None:
        _check_layer_args(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps)
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        _adopt(self)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        x = tgt
        if self.norm_first:
            a = _attend(self, self.self_attn, self.dropout1, _norm(self.norm1, x), None, tgt_mask,
                        tgt_key_padding_mask, tgt_is_causal)
            h, x = _add_norm(self.norm2, a, x)  # (norm2(x + sa), x + sa)
            c = _attend(self, self.multihead_attn, self.dropout2, h, memory, memory_mask, memory_key_padding_mask,
                        memory_is_causal)
            h, x = _add_norm(self.norm3, c, x)  # (norm3(x + ca), x + ca)
            return _feed_forward(self, h, self.dropout3, residual=x)
        a = _attend(self, self.self_attn, self.dropout1, x, None, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x, _ = _add_norm(self.norm1, a, x)
        c = _attend(self, self.multihead_attn, self.dropout2, x, memory, memory_mask, memory_key_padding_mask,
                    memory_is_causal)
        x, _ = _add_norm(self.norm2, c, x)
        f = _feed_forward(self, x, self.dropout3, residual=None)
        x, _ = _add_norm(self.norm3, f, x)
        return x


# ---------------------------------------------------------------------------------------------
# The stacks and the encoder-decoder


class TransformerEncoder(torch.nn.TransformerEncoder):
    """torch.nn.TransformerEncoder(encoder_layer, num_layers, norm=None, enable_nested_tensor=True,
    mask_check=True): num_layers deep copies of encoder_layer, then the optional final norm.
    Copies of a torch.nn.TransformerEncoderLayer become engine layers (same parameters).
    enable_nested_tensor and mask_check are accepted for compatibility: inputs are never converted
    to nested tensors, so padded positions get computed values (torch's nested fast path gives
    zeros there in eval mode); positions that are not padding match torch.

    forward(src, mask=None, src_key_padding_mask=None, is_causal=None): as torch. With
    is_causal=None a mask equal to Transformer.generate_square_subsequent_mask (float -inf above
    the diagonal, or bool True above it) is detected, as torch does, and then run as causal
    attention without reading the mask.
    """

    def __init__(self, encoder_layer: torch.nn.Module, num_layers: int, norm: Optional[torch.nn.Module] = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        _check_stack_args("encoder_layer", encoder_layer, num_layers, norm)
        # enable_nested_tensor=False to torch: its checks only decide a fast path never taken here
        super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor=False, mask_check=mask_check)
        self.enable_nested_tensor = enable_nested_tensor
        _adopt(self.layers)

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        mask, is_causal = _causal_hint(mask, is_causal, _seq_len(src, _batch_first(self.layers[0])))
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        return _norm(self.norm, output) if self.norm is not None else output


class TransformerDecoder(torch.nn.TransformerDecoder):
    """torch.nn.TransformerDecoder(decoder_layer, num_layers, norm=None): num_layers deep copies of
    decoder_layer (copies of a torch.nn.TransformerDecoderLayer become engine layers), then the
    optional final norm. forward(tgt, memory, tgt_mask=None, memory_mask=None,
    tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal=None,
    memory_is_causal=False) as torch, with causal tgt_mask detection as in TransformerEncoder."""

    def __init__(self, decoder_layer: torch.nn.Module, num_layers: int,
                 norm: Optional[torch.nn.Module] = None) -> None:
        _check_stack_args("decoder_layer", decoder_layer, num_layers, norm)
        super().__init__(decoder_layer, num_layers, norm)
        _adopt(self.layers)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: Optional[bool] = None,
                memory_is_causal: bool = False) -> Tensor:
        tgt_mask, tgt_is_causal = _causal_hint(tgt_mask, tgt_is_causal, _seq_len(tgt, _batch_first(self.layers[0])))
        output = tgt
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                           tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
        return _norm(self.norm, output) if self.norm is not None else output


class Transformer(torch.nn.Transformer):
    """torch.nn.Transformer(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
    dim_feedforward=2048, dropout=0.1, activation=relu, custom_encoder=None, custom_decoder=None,
    layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device=None, dtype=None)
    built from the engine's encoder and decoder (final LayerNorms included); custom_encoder /
    custom_decoder are used as given. Same parameters, keys and (for the same seed) initial values
    as torch's.

    forward(src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
    tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None,
    tgt_is_causal=None, memory_is_causal=False) -> [T, B, E] ([B, T, E] with batch_first), as
    torch. generate_square_subsequent_mask(sz) is torch's (float, -inf above the diagonal).
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, activation: Activation = F.relu,
                 custom_encoder: Optional[torch.nn.Module] = None, custom_decoder: Optional[torch.nn.Module] = None,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False, bias: bool = True,
                 device=None, dtype=None) -> None:
        factory = {"device": device, "dtype": dtype}
        # built in torch's order (encoder layer, its norm, decoder layer, its norm) so the random
        # draws and then torch's xavier re-initialization give torch's values for the same seed
        if custom_encoder is None:
            layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                                            batch_first, norm_first, bias, **factory)
            custom_encoder = TransformerEncoder(layer, num_encoder_layers,
                                                LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory))
        if custom_decoder is None:
            layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                                            batch_first, norm_first, bias, **factory)
            custom_decoder = TransformerDecoder(layer, num_decoder_layers,
                                                LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory))
        super().__init__(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation,
                         custom_encoder, custom_decoder, layer_norm_eps, batch_first, norm_first, bias, device, dtype)

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Optional[Tensor] = None, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None, memory_key_padding_mask: Optional[Tensor] = None,
                src_is_causal: Optional[bool] = None, tgt_is_causal: Optional[bool] = None,
                memory_is_causal: bool = False) -> Tensor:
        for name, t in (("src", src), ("tgt", tgt)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if src.dim() == 3:
            batch_dim = 0 if self.batch_first else 1
            if tgt.dim() != 3 or src.shape[batch_dim] != tgt.shape[batch_dim]:
                raise ValueError(f"src and tgt must have the same batch size (dim {batch_dim}, batch_first="
                                 f"{self.batch_first}), got shapes {tuple(src.shape)} and {tuple(tgt.shape)}")
        if src.shape[-1] != self.d_model or tgt.shape[-1] != self.d_model:
            raise ValueError(f"src and tgt must have d_model={self.d_model} features, got shapes {tuple(src.shape)} "
                             f"and {tuple(tgt.shape)}")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                            memory_is_causal=memory_is_causal)


# ---------------------------------------------------------------------------------------------
# Shared steps


def _attend(layer, attn: torch.nn.Module, dropout: torch.nn.Module, x: Tensor, memory: Optional[Tensor],
            attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], is_causal: bool) -> Tensor:
    """attn(x, kv, kv)[0] with kv = memory (cross-attention) or x (self-attention), then the outer
    dropout in training mode. Any torch.nn.MultiheadAttention (also one a caller put in place of
    the engine's) runs the engine's path, weights not computed."""
    kv = x if memory is None else memory
    if isinstance(attn, torch.nn.MultiheadAttention):
        out = multi_head_attention(attn, x, kv, kv, key_padding_mask, False, attn_mask, True, bool(is_causal))[0]
    else:  # some other module: called as torch's layers call theirs
        out = attn(x, kv, kv, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                   is_causal=is_causal)[0]
    return dropout(out) if layer.training else out


def _norm(norm: torch.nn.Module, x: Tensor) -> Tensor:
    """norm(x) through the engine's kernels for torch's LayerNorm / RMSNorm (and their engine
    subclasses); any other module is called as is."""
    if isinstance(norm, torch.nn.LayerNorm):
        return EF.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    if isinstance(norm, torch.nn.RMSNorm):
        return EF.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)
    return norm(x)


def _add_norm(norm: torch.nn.Module, sublayer_out: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """(norm(residual + sublayer_out), residual + sublayer_out): one fused pass for LayerNorm and
    RMSNorm. Both tensors [..., E]."""
    if isinstance(norm, torch.nn.LayerNorm):
        return EF.add_layer_norm(sublayer_out, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    if isinstance(norm, torch.nn.RMSNorm):
        return EF.add_rms_norm(sublayer_out, residual, norm.normalized_shape, norm.weight, norm.eps)
    total = residual + sublayer_out
    return norm(total), total


def _feed_forward(layer, h: Tensor, outer_dropout: torch.nn.Module, residual: Optional[Tensor]) -> Tensor:
    """outer_dropout(linear2(dropout(activation(linear1(h))))) (+ residual), h [..., E].

    Fused: bias + activation (+ hidden dropout) in the first product's epilogue; the residual in
    the second's when no outer dropout stands between the product and the add (eval mode, or
    p = 0). An activation the kernels do not know runs between two engine linears."""
    w1, b1, w2, b2 = layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias
    activation = _activation_name(layer.activation)
    outer = layer.training and outer_dropout.p > 0
    fuse_residual = residual is not None and not outer
    if activation is not None:
        hidden_p = layer.dropout.p if layer.training else 0.0
        out = EF.feed_forward(h, w1, b1, w2, b2, activation, hidden_p, residual if fuse_residual else None)
    else:
        hidden = layer.activation(EF.linear(h, w1, b1))
        hidden = layer.dropout(hidden) if layer.training else hidden
        out = EF.linear(hidden, w2, b2)
        fuse_residual = False
    if outer:
        out = outer_dropout(out)  # torch.nn.Dropout: no kernel fuses it with the residual add
    if residual is not None and not fuse_residual:
        out = residual + out
    return out


def _activation_name(activation) -> Optional[str]:
    """The fused-kernel name of a layer's activation, or None for a callable run unfused."""
    if activation is F.relu or activation is torch.relu or isinstance(activation, torch.nn.ReLU):
        return "relu"
    if activation is F.gelu:
        return "gelu"
    if isinstance(activation, torch.nn.GELU):
        return "gelu" if activation.approximate == "none" else "gelu_tanh"
    return None


def _causal_hint(mask: Optional[Tensor], is_causal: Optional[bool], seq_len: int) -> tuple[Optional[Tensor], bool]:
    """torch's causal-mask detection for the stacks: with is_causal=None a mask equal to the square
    subsequent mask means causal; it is then dropped, so the kernel applies causality itself (and
    skips the blocks above the diagonal) instead of reading an [S, S] mask. An explicit
    is_causal=True keeps the mask (the layers apply both)."""
    if is_causal is not None:
        return mask, bool(is_causal)
    if mask is not None and _is_square_subsequent_mask(mask, seq_len):
        return None, True
    return mask, False


def _is_square_subsequent_mask(mask: Tensor, size: int) -> bool:
    if tuple(mask.shape) != (size, size):
        return False
    hidden = torch.ones(size, size, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, hidden))
    if not mask.is_floating_point():
        return False
    expected = torch.zeros(size, size, dtype=mask.dtype, device=mask.device).masked_fill_(hidden, float("-inf"))
    return bool(torch.equal(mask, expected))


def _batch_first(layer: torch.nn.Module) -> bool:
    attn = getattr(layer, "self_attn", None)
    return bool(getattr(attn, "batch_first", False))


def _seq_len(x: Tensor, batch_first: bool) -> int:
    if x.dim() == 2:  # unbatched [S, E]
        return x.shape[0]
    return x.shape[1 if batch_first else 0]


def _adopt(module: torch.nn.Module) -> None:
    """Turns the exact torch.nn types that torch's constructors build (or that deep copies of a
    torch layer hold) into the engine's subclasses, in place: same objects and parameters, only
    the forward changes. The engine classes add no state, so a class change is all it takes (and
    the parameters keep torch's initial values: no module is rebuilt, no random draw repeated)."""
    swaps = {
        torch.nn.MultiheadAttention: MultiheadAttention,
        torch.nn.LayerNorm: LayerNorm,
        torch.nn.TransformerEncoderLayer: TransformerEncoderLayer,
        torch.nn.TransformerDecoderLayer: TransformerDecoderLayer,
    }
    for m in module.modules():
        cls = swaps.get(type(m))
        if cls is not None:
            m.__class__ = cls


def _check_layer_args(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps) -> None:
    check_attention_args(d_model, nhead, dropout)
    if isinstance(dim_feedforward, bool) or not isinstance(dim_feedforward, int):
        raise TypeError(f"dim_feedforward must be an int, got {type(dim_feedforward).__name__}")
    if dim_feedforward <= 0:
        raise ValueError(f"dim_feedforward must be positive, got {dim_feedforward}")
    if isinstance(activation, str):
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")
    elif not callable(activation):
        raise TypeError(f"activation must be 'relu', 'gelu' or a callable, got {type(activation).__name__}")
    if isinstance(layer_norm_eps, bool) or not isinstance(layer_norm_eps, (int, float)) or layer_norm_eps < 0:
        raise ValueError(f"layer_norm_eps must be a non-negative number, got {layer_norm_eps!r}")


def _check_stack_args(layer_name, layer, num_layers, norm) -> None:
    if not isinstance(layer, torch.nn.Module):
        raise TypeError(f"{layer_name} must be a torch.nn.Module, got {type(layer).__name__}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise TypeError(f"num_layers must be an int, got {type(num_layers).__name__}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    if norm is not None and not isinstance(norm, torch.nn.Module):
        raise TypeError(f"norm must be a torch.nn.Module or None, got {type(norm).__name__}")
