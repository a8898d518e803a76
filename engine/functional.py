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

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "scaled_dot_product_attention",
           "attention_with_kv_cache", "gelu", "linear", "feed_forward", "linear_cross_entropy"]

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
    _validate.companion("residual", residual, "input", x, x.shape)
    _validate.companion("weight", weight, "input", x, dims)
    _validate.companion("bias", bias, "input", x, dims)
    if eps is None:  # rms_norm's default, as in torch
        eps = torch.finfo(x.dtype).eps
    eps = _validate.number("eps", eps, low=0.0)

    n = dims[0] if len(dims) == 1 else math.prod(dims)
    weight_flat = weight.reshape(n) if weight is not None and weight.dim() != 1 else weight
    bias_flat = bias.reshape(n) if bias is not None and bias.dim() != 1 else bias
    if x.numel() == 0:  # nothing to compute: the plain torch math gives the empty results
        leading = x.shape[:x.dim() - len(dims)]
        y, total, _, _ = reference.layer_norm(x.reshape(*leading, n), residual.reshape(*leading, n) if residual
                                              is not None else None, weight_flat, bias_flat, eps, rms)
    else:
        x_rows = ops.common.rows(x, n)
        residual_rows = ops.common.rows(residual, n) if residual is not None else None
        y, total = ops.layer_norm.layer_norm(x_rows, residual_rows, weight_flat, bias_flat, eps, rms, backend)
        if x.dim() == 2 and x.shape[1] == n:  # the rows are x's own shape: no view (~1 us)
            return y, total
    return y.view_as(x), (total.view_as(x) if total is not None else None)  # view_as: ~2 us; view(x.shape): ~5


# ---------------------------------------------------------------------------------------------
# Attention


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, backend: Optional[str] = None,
                                 return_lse: bool = False):
    """Same as torch.nn.functional.scaled_dot_product_attention, computed flash-style (the
    [Sq, Sk] score matrix is never stored).

    query [B, Hq, Sq, D], key [B, Hk, Sk, D], value [B, Hk, Sk, Dv] (or 3-D [B, S, D] without
    heads); attn_mask broadcastable to [B, Hq, Sq, Sk]: bool (True = attend) or float (added to
    the scores), read in place (a [B, 1, 1, Sk] padding mask is never expanded in memory);
    is_causal: query i sees keys j <= i (top-left, as torch). Hk < Hq needs enable_gqa=True and
    Hq a multiple of Hk. A query row whose keys are all masked gives zeros and zero gradients.
    Extras: attn_mask and is_causal may be combined (torch rejects it); return_lse=True also
    returns the log-sum-exp of each row's scaled scores [B, Hq, Sq] in fp32 (-inf for rows with no
    visible key), for callers that merge partial attentions.
    """
    q = _validate.tensor("query", query)
    k = _validate.tensor("key", key)
    v = _validate.tensor("value", value)
    for name, t in (("query", q), ("key", k), ("value", v)):
        _validate.rank(name, t, (3, 4))
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"query, key and value must have the same rank, got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    _validate.same_dtypes_and_device("query", q, key=k, value=v)
    without_heads = q.dim() == 3
    if without_heads:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    b, hq, sq, d = q.shape
    k_shape, v_shape = k.shape, v.shape  # each .shape builds a Size (~0.1 us): read once
    if k_shape[0] != b or v_shape[0] != b:
        raise ValueError(f"key and value must have query's batch size {b}, got {k_shape[0]} and {v_shape[0]}")
    if k_shape[-1] != d:
        raise ValueError(f"key's head dim {k_shape[-1]} differs from query's {d}")
    if v_shape[-2] != k_shape[-2]:
        raise ValueError(f"value has {v_shape[-2]} positions but key has {k_shape[-2]}; they must match")
    if v_shape[1] != k_shape[1]:
        raise ValueError(f"value has {v_shape[1]} heads but key has {k_shape[1]}; they must match")
    hk = k_shape[1]
    if hk != hq and not enable_gqa:
        raise ValueError(f"key has {hk} heads but query has {hq}; pass enable_gqa=True for grouped-query attention")
    if hk == 0 and hq != 0:
        raise ValueError(f"key and value have 0 heads; query's {hq} heads need at least one")
    if hk != 0 and hq % hk != 0:
        raise ValueError(f"enable_gqa needs query heads ({hq}) to be a multiple of key heads ({hk})")
    sk = k_shape[2]
    mask = _attention_mask(attn_mask, q, (b, hq, sq, sk), without_heads)
    dropout_p = _validate.number("dropout_p", dropout_p, low=0.0, high=1.0, include_high=False)
    scale = _default_scale(d) if scale is None else _validate.number("scale", scale)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")

    if q.numel() == 0 or sk == 0 or v_shape[-1] == 0:  # nothing to compute: the plain torch math answers
        out, lse = reference.attention(q, k, v, mask, is_causal, scale)
    else:
        out, lse, _ = ops.attention.attention(q, k, v, mask, is_causal, scale, dropout_p, backend)
    if without_heads:
        out, lse = out.squeeze(1), lse.squeeze(1)
    return (out, lse) if return_lse else out


def attention_with_kv_cache(query: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                            attn_mask: Optional[Tensor] = None, scale: Optional[float] = None, *,
                            backend: Optional[str] = None, return_lse: bool = False):
    """Attention of a few new queries against a long, preallocated KV cache (the decode step of
    generation), with the keys split across programs (flash-decoding) so one query still fills
    the machine.

    query [B, Hq, Sq, D]; k_cache [B, Hk, S_max, D], v_cache [B, Hk, S_max, Dv] (Hq a multiple of
    Hk); cache_seqlens int [B]: the valid length L of each sequence, the new keys included. Query i
    sits at position L - Sq + i and sees the cached keys j <= that position (causal, aligned to
    the end of each sequence). attn_mask broadcastable to [B, Hq, Sq, S_max] (bool or float), for
    instance a [B, 1, 1, S_max] mask hiding left padding. return_lse as in
    scaled_dot_product_attention. No autograd (inference only).
    """
    q = _validate.tensor("query", query)
    kc = _validate.tensor("k_cache", k_cache)
    vc = _validate.tensor("v_cache", v_cache)
    for name, t in (("query", q), ("k_cache", kc), ("v_cache", vc)):
        _validate.rank(name, t, (4,))
    _validate.same_dtypes_and_device("query", q, k_cache=kc, v_cache=vc)
    lengths = _validate.tensor("cache_seqlens", cache_seqlens, (torch.int32, torch.int64))
    _validate.same_device("cache_seqlens", lengths, "query", q)
    b, hq, sq, d = q.shape
    hk, s_max = kc.shape[1], kc.shape[2]
    if kc.shape[0] != b or vc.shape[0] != b:
        raise ValueError(f"k_cache and v_cache must have query's batch size {b}, got {kc.shape[0]} and {vc.shape[0]}")
    if kc.shape[-1] != d:
        raise ValueError(f"k_cache's head dim {kc.shape[-1]} differs from query's {d}")
    if vc.shape[1:3] != kc.shape[1:3]:
        raise ValueError(f"v_cache's heads and length {tuple(vc.shape[1:3])} differ from k_cache's {tuple(kc.shape[1:3])}")
    if (hk == 0 and hq != 0) or (hk != 0 and hq % hk != 0):
        raise ValueError(f"query heads ({hq}) must be a multiple of k_cache heads ({hk})")
    if lengths.shape != (b,):
        raise ValueError(f"cache_seqlens must have shape ({b},), got {tuple(lengths.shape)}")
    if lengths.is_cpu and lengths.numel():
        values = lengths.tolist()  # one call (~1 us at B = 1) where min() < 0 or max() > s_max took ~10 us
        if min(values) < 0 or max(values) > s_max:
            raise ValueError(f"cache_seqlens must lie in [0, {s_max}] (the cache length), got {values}")
    mask = _attention_mask(attn_mask, q, (b, hq, sq, s_max), False)
    scale = _default_scale(d) if scale is None else _validate.number("scale", scale)
    if q.numel() == 0 or s_max == 0:
        out, lse = reference.attention_with_kv_cache(q, kc, vc, lengths, mask, scale)
    else:
        with torch.no_grad():
            out, lse = ops.attention.attention_decode(q, kc, vc, lengths, mask, scale, backend)
    return (out, lse) if return_lse else out


def _default_scale(head_dim: int) -> float:
    """1 / sqrt(head dim), torch's default; any finite value for head dim 0, whose scores are all 0."""
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def _attention_mask(attn_mask, q: Tensor, shape: tuple, without_heads: bool) -> Optional[Tensor]:
    if attn_mask is None:
        return None
    mask = _validate.tensor("attn_mask", attn_mask, (torch.bool,) + _validate.FLOAT_DTYPES)
    _validate.same_device("attn_mask", mask, "query", q)
    if without_heads and mask.dim() == 3:  # [B, Sq, Sk] for 3-D inputs
        mask = mask.unsqueeze(1)
    _validate.broadcastable("attn_mask", mask, shape)
    return mask


# ---------------------------------------------------------------------------------------------
# GeLU, linear layers, the feed-forward block

_ACTIVATIONS = {None: "none", "none": "none", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "relu": "relu"}


def gelu(input: Tensor, approximate: str = "none", *, backend: Optional[str] = None) -> Tensor:
    """Same as torch.nn.functional.gelu: x * Phi(x), or its tanh approximation (approximate="tanh")."""
    x = _validate.tensor("input", input)
    _validate.choice("approximate", approximate, ("none", "tanh"))
    if x.numel() == 0:
        return x.clone()
    return ops.linear.gelu(x, approximate, backend).view_as(x)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None, *,
           backend: Optional[str] = None) -> Tensor:
    """activation(input @ weight^T + bias), with bias and activation fused into the matrix
    product's epilogue. input [..., in], weight [out, in] (torch.nn.Linear's layout), bias [out];
    activation None, "gelu", "gelu_tanh" or "relu". With activation=None it is
    torch.nn.functional.linear."""
    x, w, b, act = _check_linear("input", input, "weight", weight, "bias", bias, activation)
    return _run_linear(x, w, b, act, 0.0, None, backend)


def feed_forward(input: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                 activation: str = "gelu", dropout_p: float = 0.0, residual: Optional[Tensor] = None, *,
                 backend: Optional[str] = None) -> Tensor:
    """The transformer feed-forward block, dropout(act(x W1^T + b1)) W2^T + b2 (+ residual), as two
    products whose epilogues carry the bias, the activation, the dropout and the residual add.
    input [..., d_model], w1 [d_ff, d_model], b1 [d_ff], w2 [d_model, d_ff], b2 [d_model],
    residual like input. Dropout (on the hidden activation) is applied whenever dropout_p > 0, as
    in torch.nn.functional.dropout(training=True)."""
    x, w1, b1, act = _check_linear("input", input, "w1", w1, "b1", b1, activation)
    _validate.rank("w2", _validate.tensor("w2", w2), (2,))
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"w2 takes {w2.shape[1]} hidden features but w1 makes {w1.shape[0]} (w1 [d_ff, d_model] "
                         f"has shape {tuple(w1.shape)}, w2 [d_model, d_ff] has shape {tuple(w2.shape)})")
    _, w2, b2, _ = _check_linear("hidden", x.new_empty(0, w1.shape[0]), "w2", w2, "b2", b2, None)
    dropout_p = _validate.number("dropout_p", dropout_p, low=0.0, high=1.0, include_high=False)
    if residual is not None:
        _validate.tensor("residual", residual)
        _validate.same_dtypes_and_device("input", x, residual=residual)
        _validate.shape("residual", residual, (*x.shape[:-1], w2.shape[0]))
    hidden = _run_linear(x, w1, b1, act, dropout_p, None, backend)
    return _run_linear(hidden, w2, b2, "none", 0.0, residual, backend)


def _check_linear(input_name, input, weight_name, weight, bias_name, bias, activation):
    x = _validate.tensor(input_name, input)
    w = _validate.tensor(weight_name, weight)
    _validate.rank(weight_name, w, (2,))
    if x.dim() == 0:
        raise ValueError(f"{input_name} must have at least 1 dim, got a scalar")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"{weight_name} takes {w.shape[1]} input features but {input_name} has {x.shape[-1]} "
                         f"(last dim of shape {tuple(x.shape)})")
    b = _validate.optional_tensor(bias_name, bias)
    _validate.shape(bias_name, b, (w.shape[0],))
    _validate.same_dtypes_and_device(input_name, x, **{weight_name: w, bias_name: b})
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of None, 'gelu', 'gelu_tanh', 'relu', got {activation!r}")
    return x, w, b, _ACTIVATIONS[activation]


def _run_linear(x, w, b, activation, dropout_p, residual, backend):
    if x.numel() == 0 or w.numel() == 0:  # nothing to multiply: the plain torch math answers
        m = math.prod(x.shape[:-1])
        out, _ = reference.linear(x.reshape(m, w.shape[1]), w, b, activation, residual=(
            residual.reshape(m, w.shape[0]) if residual is not None else None))
        return out.view(*x.shape[:-1], w.shape[0])
    out, _ = ops.linear.linear(x, w, b, activation, dropout_p, residual, backend)
    return out


# ---------------------------------------------------------------------------------------------
# Loss


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean", *,
                         backend: Optional[str] = None) -> Tensor:
    """torch.nn.functional.cross_entropy(linear(hidden, weight, bias), targets, ignore_index=...,
    label_smoothing=..., reduction=...) without holding the [N, V] logits: rows go in chunks
    (engine/ops/cross_entropy.py). hidden [..., d], weight [V, d] (an output embedding or LM head),
    targets [...] int64 class ids in [0, V) or ignore_index, bias [V]. Returns a scalar for
    "mean" (NaN when every target is ignored, as in torch) and "sum", targets' shape for "none"."""
    x, w, b, _ = _check_linear("hidden", hidden, "weight", weight, "bias", bias, None)
    vocab = w.shape[0]
    if not 0 < vocab < 2**31:
        raise ValueError(f"weight must have between 1 and 2^31 - 1 rows (the vocabulary), got {vocab}")
    t = _validate.tensor("targets", targets, (torch.int64,))
    _validate.same_device("targets", t, "hidden", x)
    _validate.shape("targets", t, x.shape[:-1])
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    label_smoothing = _validate.number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    _validate.choice("reduction", reduction, ("mean", "sum", "none"))
    t = t.reshape(-1).contiguous()
    if not torch.compiler.is_compiling():  # the filter's shape depends on the values (ids_in_range skips then too)
        _validate.ids_in_range("targets", t[t != ignore_index], vocab, "weight.shape[0]")
    loss = ops.cross_entropy.linear_cross_entropy(ops.common.rows(x, w.shape[1]), w, t, b, ignore_index,
                                                  label_smoothing, reduction, backend)
    return loss.view(targets.shape) if reduction == "none" else loss
