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
           "attention_with_kv_cache", "gelu", "linear", "feed_forward", "rotary", "rotary_qk", "rotary_cos_sin",
           "linear_cross_entropy"]

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

# The activation names of linear and feed_forward (None: none); the gated ones halve the width
# (engine/reference.py GATED_ACTIVATIONS).
ACTIVATION_NAMES = (None, *reference.ACTIVATIONS, *reference.GATED_ACTIVATIONS)


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
    activation None, "gelu", "gelu_tanh", "relu" or "silu". With activation=None it is
    torch.nn.functional.linear.

    Gated activations "swiglu" (silu gate), "geglu" (erf gelu gate) and "geglu_tanh" take one
    weight [2 * hidden, in] holding the gate projection's rows first, then the up projection's,
    and bias [2 * hidden] likewise; the result [..., hidden] is act(input W_gate^T + b_gate) *
    (input W_up^T + b_up), from one product 2 * hidden wide whose epilogue combines the halves.
    transformers' Llama MLP loads as weight = torch.cat([gate_proj.weight, up_proj.weight])."""
    x, w, b, act = _check_linear("input", input, "weight", weight, "bias", bias, activation)
    return _run_linear(x, w, b, act, 0.0, None, backend)


def feed_forward(input: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                 activation: str = "gelu", dropout_p: float = 0.0, residual: Optional[Tensor] = None, *,
                 backend: Optional[str] = None) -> Tensor:
    """The transformer feed-forward block, dropout(act(x W1^T + b1)) W2^T + b2 (+ residual), as two
    products whose epilogues carry the bias, the activation, the dropout and the residual add.
    input [..., d_model], w1 [d_ff, d_model], b1 [d_ff], w2 [d_model, d_ff], b2 [d_model],
    residual like input. Dropout (on the hidden activation) is applied whenever dropout_p > 0, as
    in torch.nn.functional.dropout(training=True). A gated activation ("swiglu", "geglu",
    "geglu_tanh"; see linear) takes w1 [2 * d_ff, d_model] (gate rows, then up rows) and b1
    [2 * d_ff]: Llama's MLP is feed_forward(x, torch.cat([gate_proj.weight, up_proj.weight]), None,
    down_proj.weight, None, "swiglu")."""
    x, w1, b1, act = _check_linear("input", input, "w1", w1, "b1", b1, activation)
    _validate.rank("w2", _validate.tensor("w2", w2), (2,))
    hidden = reference.output_width(act, w1.shape[0])
    if w2.shape[1] != hidden:
        raise ValueError(f"w2 takes {w2.shape[1]} hidden features but w1 makes {hidden} (w1 "
                         f"{'[2 * d_ff, d_model]' if hidden != w1.shape[0] else '[d_ff, d_model]'} has shape "
                         f"{tuple(w1.shape)}, w2 [d_model, d_ff] has shape {tuple(w2.shape)})")
    _, w2, b2, _ = _check_linear("hidden", x.new_empty(0, hidden), "w2", w2, "b2", b2, None)
    dropout_p = _validate.number("dropout_p", dropout_p, low=0.0, high=1.0, include_high=False)
    if residual is not None:
        _validate.tensor("residual", residual)
        _validate.same_dtypes_and_device("input", x, residual=residual)
        _validate.shape("residual", residual, (*x.shape[:-1], w2.shape[0]))
    hidden_values = _run_linear(x, w1, b1, act, dropout_p, None, backend)
    return _run_linear(hidden_values, w2, b2, "none", 0.0, residual, backend)


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
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATION_NAMES))}, got {activation!r}")
    if activation in reference.GATED_ACTIVATIONS and w.shape[0] % 2:
        raise ValueError(f"{weight_name} of the gated activation {activation!r} must have an even number of rows "
                         f"(gate rows, then as many up rows), got shape {tuple(w.shape)}")
    return x, w, b, activation or "none"


def _run_linear(x, w, b, activation, dropout_p, residual, backend):
    if x.numel() == 0 or w.numel() == 0:  # nothing to multiply: the plain torch math answers
        m = math.prod(x.shape[:-1])
        width = reference.output_width(activation, w.shape[0])
        out, _ = reference.linear(x.reshape(m, w.shape[1]), w, b, activation, residual=(
            residual.reshape(m, width) if residual is not None else None))
        return out.view(*x.shape[:-1], width)
    out, _ = ops.linear.linear(x, w, b, activation, dropout_p, residual, backend)
    return out


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings


def rotary(input: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False,
           positions: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Rotary position embedding (RoPE) of input [B, H, S, D], the attention layout.

    cos, sin [P, R/2] (from rotary_cos_sin, in input's dtype): row p holds the cos and sin of the
    R/2 angles of position p. The rotary dim is R = 2 * cos.shape[-1] <= D: the first R features
    rotate as R/2 pairs, the other D - R pass through (partial rotary, as Phi and GPT-NeoX). A pair
    is (x[i], x[i + R/2]) by default, the half-split of Llama, GPT-NeoX and transformers'
    rotate_half, or (x[2i], x[2i + 1]) with interleaved=True (GPT-J):
        y1 = x1 cos[p, i] - x2 sin[p, i],  y2 = x2 cos[p, i] + x1 sin[p, i].
    positions: None (token s at position s), or int [B] start offsets: token s of sequence b at
    positions[b] + s, as a decode step's new tokens after cached ones (cache_seqlens - S).
    Every position must lie in [0, P). transformers' cos [..., R] is cat(c, c): pass c = cos[...,
    :R/2]. cos and sin get no gradient.
    """
    x = _validate.tensor("input", input)
    _validate.rank("input", x, (4,))
    out, _ = _rotate("input", x, None, cos, sin, interleaved, positions, backend)
    return out


def rotary_qk(query: Tensor, key: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False,
              positions: Optional[Tensor] = None, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """rotary of query [B, Hq, S, D] and key [B, Hk, S, D] in one pass (one kernel launch, the
    angles read once per token): returns (rotary(query, ...), rotary(key, ...)). Hk may differ
    from Hq (grouped-query attention); the other dims must match."""
    q = _validate.tensor("query", query)
    k = _validate.tensor("key", key)
    _validate.rank("query", q, (4,))
    _validate.rank("key", k, (4,))
    _validate.same_dtypes_and_device("query", q, key=k)
    if (k.shape[0], k.shape[2], k.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]):
        raise ValueError(f"key [B, Hk, S, D] must match query's B, S and D, got key {tuple(k.shape)} and query "
                         f"{tuple(q.shape)}")
    return _rotate("query", q, k, cos, sin, interleaved, positions, backend)


def _rotate(name: str, x: Tensor, k: Optional[Tensor], cos, sin, interleaved, positions, backend):
    """Validates the tables and positions for x [B, H, S, D] (and k), then runs the rotary op."""
    c = _validate.tensor("cos", cos)
    s = _validate.tensor("sin", sin)
    _validate.same_dtypes_and_device(name, x, cos=c, sin=s)
    _validate.rank("cos", c, (2,))
    _validate.shape("sin", s, c.shape)
    b, _, seq, d = x.shape
    table_length, half = c.shape
    if not 1 <= half <= d // 2:
        raise ValueError(f"cos and sin [P, R/2] set the rotary dim R = {2 * half}; it must be in [2, {d - d % 2}] "
                         f"(the head dim {d}, rounded down to even)")
    if (c.requires_grad or s.requires_grad) and torch.is_grad_enabled():
        raise ValueError("cos and sin get no gradient; pass them detached")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    offsets = None
    if positions is None:
        if seq > table_length:
            raise ValueError(f"{name} has {seq} positions but cos and sin hold {table_length}")
    else:
        offsets = _validate.tensor("positions", positions, (torch.int32, torch.int64))
        _validate.same_device("positions", offsets, name, x)
        _validate.shape("positions", offsets, (b,))
        offsets = offsets.to(torch.int64)
        if offsets.numel() and seq and not torch.compiler.is_compiling():
            low, high = (int(v) for v in torch.aminmax(offsets))
            if low < 0 or high + seq > table_length:
                raise ValueError(f"positions (start offsets) must lie in [0, {table_length - seq}] so that "
                                 f"offset + {seq} tokens fit the {table_length} rows of cos and sin, got "
                                 f"[{low}, {high}]")
    if x.numel() == 0 and (k is None or k.numel() == 0):  # nothing to rotate: the plain torch math answers
        rotated = reference.rotary(x, c, s, offsets, interleaved)
        return rotated, (reference.rotary(k, c, s, offsets, interleaved) if k is not None else None)
    return ops.rotary.rotary(x, k, c, s, offsets, interleaved, backend)


_ROPE_TYPES = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rotary_cos_sin(seq_len: int, rotary_dim: int, *, theta: float = 10000.0, scaling: Optional[dict] = None,
                   device=None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The angle tables of rotary: (cos, sin), each [seq_len, rotary_dim / 2] in `dtype`.

    Position p turns pair i by p * inv_freq[i], inv_freq[i] = theta^(-2i / rotary_dim) (theta is
    transformers' rope_theta). scaling is transformers' rope_scaling dict: None or
    {"rope_type": "default"}; {"rope_type": "linear", "factor"} (positions divided by factor);
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} (Llama 3.1's per-frequency scaling). The older key "type"
    is read as "rope_type". Computed in float64, rounded once to dtype.
    """
    for name, value in (("seq_len", seq_len), ("rotary_dim", rotary_dim)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even and >= 2 (features rotate in pairs), got {rotary_dim}")
    theta = _validate.number("theta", theta, low=0.0)
    if theta <= 1.0:
        raise ValueError(f"theta must be > 1, got {theta}")
    if dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {_validate.FLOAT_DTYPES}, got {dtype}")
    inv_freq = theta ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    inv_freq = _scaled_frequencies(inv_freq, scaling)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq  # [seq_len, rotary_dim / 2]
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def _scaled_frequencies(inv_freq: Tensor, scaling: Optional[dict]) -> Tensor:
    """inv_freq [R/2] (float64) after transformers' rope_scaling (see rotary_cos_sin)."""
    if scaling is None:
        return inv_freq
    if not isinstance(scaling, dict):
        raise TypeError(f"scaling must be a dict (transformers' rope_scaling) or None, got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    _validate.choice("scaling's rope_type", rope_type, tuple(_ROPE_TYPES))
    missing = [key for key in _ROPE_TYPES[rope_type] if key not in scaling]
    if missing:
        raise ValueError(f"scaling of rope_type {rope_type!r} needs {', '.join(missing)}")
    if rope_type == "default":
        return inv_freq
    factor = _validate.number("scaling's factor", scaling["factor"], low=0.0)
    if factor == 0:
        raise ValueError("scaling's factor must be > 0, got 0.0")
    if rope_type == "linear":
        return inv_freq / factor
    low = _validate.number("scaling's low_freq_factor", scaling["low_freq_factor"], low=0.0)
    high = _validate.number("scaling's high_freq_factor", scaling["high_freq_factor"], low=0.0)
    if not 0 < low < high:
        raise ValueError(f"scaling needs 0 < low_freq_factor < high_freq_factor, got {low} and {high}")
    context = _validate.number("scaling's original_max_position_embeddings",
                               scaling["original_max_position_embeddings"], low=1.0)
    # Wavelengths longer than context / low are divided by factor, shorter than context / high kept,
    # and those between blend the two by where context / wavelength falls in [low, high].
    wavelength = 2 * math.pi / inv_freq
    blend = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - blend) * inv_freq / factor + blend * inv_freq


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
