"""MultiheadAttention: torch.nn.MultiheadAttention (same constructor, parameters, state_dict keys)
whose forward projects with engine.functional.linear and attends with the flash-style
engine.functional.scaled_dot_product_attention (the [L, S] score matrix is never stored unless
the caller asks for the attention weights)."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import engine.functional as EF


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None), computed
    by the engine's kernels. Loads a torch.nn.MultiheadAttention state_dict (in_proj_weight /
    in_proj_bias, or q/k/v_proj_weight when kdim or vdim differ from embed_dim; out_proj;
    bias_k / bias_v). add_bias_kv and add_zero_attn are supported (the extra key/value columns are
    appended after projection, as torch does).

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
            average_attn_weights=True, is_causal=False) -> (output, weights or None)
        query [L, B, E] ([B, L, E] with batch_first, [L, E] unbatched), key [S, B, kdim],
        value [S, B, vdim]; output like query.
        Masks follow torch.nn.MultiheadAttention, not SDPA: a bool mask is True where attending
        is NOT allowed; a float mask is added to the scores. attn_mask [L, S] or [B * H, L, S]
        ([H, L, S] unbatched), key_padding_mask [B, S] ([S] unbatched). A padding mask alone
        reaches the kernel as a [B, 1, 1, S] view; with an attn_mask too, the two are combined
        into one [B, 1, L, S] (or [B, H, L, S]) mask.
        is_causal=True with attn_mask=None means causal (query i sees keys j <= i; torch raises
        instead). With an attn_mask, torch treats is_causal as a hint that attn_mask is the causal
        mask; here the mask is applied as given and causality on top, which is the same result
        when the hint is true.
        need_weights=True (torch's default) takes a slower path that materializes the [B, H, L, S]
        probabilities with plain torch math and returns them ([B, L, S] averaged over heads when
        average_attn_weights, else [B, H, L, S]; after dropout in training mode, as torch).
        need_weights=False runs the fused kernel and returns (output, None).
        Dropout (the constructor's `dropout`) applies to the probabilities in training mode only.

    Differences from torch: a query row whose keys are all masked attends to nothing: its
    attention result is zero (so its output row is out_proj.bias), its weights are zero and its
    gradients zero, where torch gives NaN. Nested-tensor inputs are not accepted.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None) -> None:
        check_attention_args(embed_dim, num_heads, dropout, kdim, vdim)
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        # no state of its own: torch modules built by torch's constructors (inside the transformer
        # layers) become engine modules by a class change alone (engine/nn/transformer.py)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        return multi_head_attention(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)


def check_attention_args(embed_dim, num_heads, dropout, kdim=None, vdim=None) -> None:
    """The constructor checks of MultiheadAttention (and of the transformer layers, whose
    d_model/nhead/dropout reach it): one ValueError/TypeError naming the argument."""
    for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("kdim", kdim), ("vdim", vdim)):
        if value is None and name in ("kdim", "vdim"):
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a number, got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def multi_head_attention(m: torch.nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                         key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                         attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                         is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """MultiheadAttention.forward for any torch.nn.MultiheadAttention `m` (its parameters and
    settings; the engine's kernels). The transformer layers call it on their self_attn /
    multihead_attn even when a caller replaced those with torch's own module."""
    # `is` relations decide how many projections run: one [*, 3E] product for self-attention,
    # one [*, 2E] product for key/value when key is value (torch's rule, checked before any
    # reshaping breaks them)
    self_attention = query is key and key is value
    shared_kv = key is value
    _check_inputs(m, query, key, value, key_padding_mask, attn_mask, need_weights, average_attn_weights, is_causal)

    batched = query.dim() == 3
    batch_first = m.batch_first or not batched
    if not batched:  # unbatched [L, E]: a batch of one, batch-first
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    seq_dim = 1 if batch_first else 0
    b = query.shape[1 - seq_dim]
    e, h = m.embed_dim, m.num_heads
    dh = e // h

    # Projections, in the inputs' own layout ([B, L, E] or [L, B, E]; no transposed copy):
    # q [*, *, E], k/v [*, *, E] (views into one product where they share it)
    q, k, v = _project(m, query, key, value, self_attention, shared_kv)

    # torch's extra key/value columns: bias_k/bias_v [1, 1, E], then a zero column
    extra = 0
    if m.bias_k is not None and m.bias_v is not None:
        shape = (b, 1, e) if batch_first else (1, b, e)
        k = torch.cat([k, m.bias_k.expand(shape)], dim=seq_dim)
        v = torch.cat([v, m.bias_v.expand(shape)], dim=seq_dim)
        extra += 1
    if m.add_zero_attn:
        shape = (b, 1, e) if batch_first else (1, b, e)
        k = torch.cat([k, k.new_zeros(shape)], dim=seq_dim)
        v = torch.cat([v, v.new_zeros(shape)], dim=seq_dim)
        extra += 1

    # [*, *, E] -> [B, H, S, Dh] views (strided; the kernels take any strides with unit last stride)
    order = (0, 2, 1, 3) if batch_first else (1, 2, 0, 3)
    q, k, v = (t.unflatten(-1, (h, dh)).permute(order) for t in (q, k, v))
    length, s = q.shape[2], k.shape[2]

    mask = _engine_mask(attn_mask, key_padding_mask, b, h, length, s - extra, extra, q.dtype)
    causal = bool(is_causal)
    if causal and extra:
        # top-left causality over S + extra columns would hide the always-visible extra columns:
        # spell it out over the first S keys instead
        visible = torch.ones(length, s, dtype=torch.bool, device=q.device)
        visible[:, :s - extra] = torch.ones(length, s - extra, dtype=torch.bool, device=q.device).tril()
        mask = _combine(mask, visible, q.dtype)
        causal = False
    dropout_p = float(m.dropout) if m.training else 0.0

    if need_weights:
        out, weights = _attention_with_weights(q, k, v, mask, causal, dropout_p)
        weights = weights.mean(dim=1) if average_attn_weights else weights
        if not batched:
            weights = weights.squeeze(0)
    else:
        out = EF.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
        weights = None

    # [B, H, L, Dh] -> the input layout [B, L, E] / [L, B, E] (one copy), then the out projection
    out = out.permute(0, 2, 1, 3) if batch_first else out.permute(2, 0, 1, 3)
    out = out.reshape(*out.shape[:2], e)
    out = EF.linear(out, m.out_proj.weight, m.out_proj.bias)
    if not batched:
        out = out.squeeze(0)
    return out, weights


def _project(m, query: Tensor, key: Tensor, value: Tensor, self_attention: bool, shared_kv: bool):
    """The input projections: q [*, *, E], k [*, *, E], v [*, *, E] in the inputs' layout."""
    e = m.embed_dim
    bias = m.in_proj_bias
    if not m._qkv_same_embed_dim:  # kdim/vdim differ: three separate weights, one packed bias [3E]
        bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
        return (EF.linear(query, m.q_proj_weight, bq), EF.linear(key, m.k_proj_weight, bk),
                EF.linear(value, m.v_proj_weight, bv))
    w = m.in_proj_weight  # [3E, E]: rows [0, E) project queries, [E, 2E) keys, [2E, 3E) values
    if self_attention:
        q, k, v = EF.linear(query, w, bias).unflatten(-1, (3, e)).unbind(-2)
        return q, k, v
    bq = bias[:e] if bias is not None else None
    q = EF.linear(query, w[:e], bq)
    if shared_kv:
        k, v = EF.linear(key, w[e:], bias[e:] if bias is not None else None).unflatten(-1, (2, e)).unbind(-2)
        return q, k, v
    bk, bv = (bias[e:2 * e], bias[2 * e:]) if bias is not None else (None, None)
    return q, EF.linear(key, w[e:2 * e], bk), EF.linear(value, w[2 * e:], bv)


def _engine_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], b: int, h: int, length: int,
                 s: int, extra: int, dtype: torch.dtype) -> Optional[Tensor]:
    """torch.nn.MultiheadAttention's masks (bool True = NOT allowed; float added) as one mask in
    SDPA's convention (bool True = attend; float added), broadcastable to [B, H, L, S + extra]
    without expanding: attn_mask [L, S] stays 2-D, [B*H, L, S] becomes a [B, H, L, S] view,
    key_padding_mask [B, S] becomes a [B, 1, 1, S] view. The `extra` appended key columns
    (bias_k/bias_v, zero attention) are always visible."""
    am = kpm = None
    if attn_mask is not None:
        am = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
        if am.dim() == 3:
            am = am.reshape(b, h, length, s)
        am = _pad_visible(am, extra)
    if key_padding_mask is not None:
        kpm = ~key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask
        kpm = _pad_visible(kpm.reshape(b, 1, 1, s), extra)
    if am is None or kpm is None:
        return am if am is not None else kpm
    return _combine(am, kpm, dtype)


def _pad_visible(mask: Tensor, extra: int) -> Tensor:
    """mask [..., S] -> [..., S + extra] with the new columns visible (True, or 0.0 for floats)."""
    if extra == 0:
        return mask
    pad = (torch.ones if mask.dtype == torch.bool else torch.zeros)(
        *mask.shape[:-1], extra, dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, pad], dim=-1)


def _combine(a: Optional[Tensor], b: Tensor, dtype: torch.dtype) -> Tensor:
    """Two SDPA-convention masks as one (broadcast; materialized at their joint shape): bool & bool,
    else both as additive float masks (0 visible, -inf hidden; bool converted in `dtype`)."""
    if a is None:
        return b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return _additive(a, dtype) + _additive(b, dtype)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def _attention_with_weights(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool,
                            dropout_p: float) -> tuple[Tensor, Tensor]:
    """The need_weights path, plain torch math (autograd included): q [B, H, L, Dh], k/v
    [B, H, S, Dh], mask in SDPA's convention broadcastable to [B, H, L, S]. Returns
    (out [B, H, L, Dh], probabilities [B, H, L, S] after dropout). A row with no visible key gets
    zero probabilities (not NaN) and zero gradients."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2)  # [B, H, L, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    if causal:
        length, s = scores.shape[-2:]
        hidden = torch.ones(length, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, -math.inf)
    dead = None
    if mask is not None or causal:
        # rows with no visible key: softmax would give NaN (and NaN gradients through it), so give
        # it finite scores and zero its output instead
        dead = torch.isneginf(scores).all(dim=-1, keepdim=True)  # [B, H, L, 1]
        scores = scores.masked_fill(dead, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if dead is not None:
        probs = probs.masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v, probs


def _check_inputs(m, query, key, value, key_padding_mask, attn_mask, need_weights, average_attn_weights,
                  is_causal) -> None:
    """torch.nn.MultiheadAttention's shape rules, as TypeError/ValueError naming the argument."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:
            raise TypeError(f"{name}: nested tensors are not supported; pass a padded tensor and key_padding_mask")
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got {query.dim()}-D "
                         f"with shape {tuple(query.shape)}")
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"key and value must be {query.dim()}-D like query, got {key.dim()}-D and {value.dim()}-D")
    for name, t, width in (("query", query, m.embed_dim), ("key", key, m.kdim), ("value", value, m.vdim)):
        if t.shape[-1] != width:
            raise ValueError(f"{name} must have {width} features in its last dim, got shape {tuple(t.shape)}")
    batched = query.dim() == 3
    seq_dim = 1 if (m.batch_first and batched) else 0
    if batched:
        b = query.shape[1 - seq_dim]
        if key.shape[1 - seq_dim] != b or value.shape[1 - seq_dim] != b:
            raise ValueError(f"key and value must have query's batch size {b}, got shapes {tuple(key.shape)} and "
                             f"{tuple(value.shape)} (batch_first={m.batch_first})")
    else:
        b = 1
    length, s = query.shape[seq_dim], key.shape[seq_dim]
    if value.shape[seq_dim] != s:
        raise ValueError(f"value has {value.shape[seq_dim]} positions but key has {s}; they must match")
    for name, mask in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if mask is None:
            continue
        if not isinstance(mask, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"{name} must be bool (True = not allowed) or floating point (added to the scores), "
                            f"got {mask.dtype}")
        if mask.device != query.device:
            raise ValueError(f"{name} is on {mask.device} but query is on {query.device}")
    h = m.num_heads
    if attn_mask is not None:
        allowed = [(length, s), (b * h, length, s)]
        if tuple(attn_mask.shape) not in allowed:
            raise ValueError(f"attn_mask must have shape {allowed[0]} or {allowed[1]} ([batch * num_heads, L, S]), "
                             f"got {tuple(attn_mask.shape)}")
    if key_padding_mask is not None:
        expected = (b, s) if batched else (s,)
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(f"key_padding_mask must have shape {expected}, got {tuple(key_padding_mask.shape)}")
    for name, flag in (("need_weights", need_weights), ("average_attn_weights", average_attn_weights),
                       ("is_causal", is_causal)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
