"""Plain-PyTorch versions of every engine op: the test oracle and the fallback backend.

Each forward function is the op's math written once, as directly as torch allows, and is
differentiable by torch's autograd: the tests run it on float64 inputs as the ground truth.
The `reference` backend (engine/ops/*.py) runs the forward functions, and for backward the
closed-form gradients written next to them (the formulas the kernels implement; autograd cannot
run inside a custom op), which the tests check against torch's autograd of the forward. Inputs
are already validated (engine/functional.py).
"""
import math
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
    # The statistics are computed on v / p, p the power of two of max |v| (clamped to the normal
    # range, as csrc/common/layer_norm.h's layer_norm_row_scale): exact, and the sums cannot
    # overflow (|v| up to the dtype's max) or lose the squares to subnormals (eps = 0). The
    # kernels do this only for rows whose direct statistics fall outside that range.
    top = v.abs().amax(-1, keepdim=True) if v.shape[-1] > 0 else v.new_ones(*v.shape[:-1], 1)  # rows of 0: any
    scale = 1.0 / _power_of_two_below(top)
    scaled = v * scale
    mean = scaled.new_zeros(top.shape) if rms else scaled.mean(-1, keepdim=True)
    centered = scaled if rms else scaled - mean
    rstd = torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps * scale * scale)
    y = centered * rstd
    mean, rstd = (mean / scale).squeeze(-1), (rstd * scale).squeeze(-1)
    if weight is not None:
        y = y * weight.to(v.dtype)
    if bias is not None:
        y = y + bias.to(v.dtype)
    return y.to(x.dtype), (None if residual is None else total), mean, rstd


def _power_of_two_below(top: Tensor) -> Tensor:
    """2^floor(log2 top) (top's exponent bits), clamped to [smallest normal, 1 / smallest normal]
    of top's dtype (fp32 or fp64), so that its reciprocal is exact too; inf and NaN give the top."""
    bits, mask = (torch.int32, 0x7F800000) if top.dtype == torch.float32 else (torch.int64, 0x7FF0000000000000)
    tiny = torch.finfo(top.dtype).tiny
    return (top.view(bits) & mask).view(top.dtype).clamp(tiny, 1.0 / tiny)


def layer_norm_backward(grad_y: Tensor, grad_sum: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                        mean: Optional[Tensor], rstd: Tensor, rms: bool, need_weight_grad: bool,
                        need_bias_grad: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of `layer_norm` from its saved statistics, x [M, N] being the normalized input
    (x, or the stored sum): the closed form every kernel implements, in the accumulator dtype.
    Returns (dx [M, N], dweight [N] or None, dbias [N] or None)."""
    acc = rstd.dtype
    dy = grad_y.to(acc)
    # x - mean as (x / 2 - mean / 2) * 2 where it could overflow (csrc/common/layer_norm.h's
    # layer_norm_centering): in rows whose std exceeds 1
    half = torch.where(rstd < 1.0, 0.5, 1.0).unsqueeze(-1)
    centered = x.to(acc) * half if rms else x.to(acc) * half - mean.unsqueeze(-1) * half
    xhat = centered * (rstd.unsqueeze(-1) / half)
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


# ---------------------------------------------------------------------------------------------
# Dropout's random numbers: one counter-based stream shared by every backend
#
# The uniform number for an element is word 0 of Philox4x32-10 (the generator of Triton's
# tl.philox / tl.rand) with key = seed (low 32 bits, high 32 bits) and counter
# (c0, c1, c2, 0) = (column, row, plane), mapped to [0, 1) as tl.rand maps it. An element is kept
# when u >= p and scaled by 1 / (1 - p). Attention's probabilities [B, H, Sq, Sk] use
# (key j, query i, b * H + h); a [M, N] activation uses (n, m, 0). Every backend computes the same
# bits, so a seed reproduces the same mask everywhere; the seed comes from torch's default
# generator (engine/ops), so torch.manual_seed reproduces a result exactly.

_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_UINT32 = 0xFFFFFFFF


def _mul_hi_lo(constant: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of constant * x for uint32 values held in int64 tensors,
    without overflowing int64: x is split into 16-bit halves."""
    x_hi, x_lo = x >> 16, x & 0xFFFF
    p_hi, p_lo = constant * x_hi, constant * x_lo          # each < 2^48
    middle = ((p_hi & 0xFFFF) << 16) + p_lo                # < 2^49
    return (p_hi >> 16) + (middle >> 32), middle & _UINT32


def dropout_uniform(seed: int, c0: Tensor, c1: Tensor, c2: Tensor) -> Tensor:
    """Uniform [0, 1) float32 numbers of the dropout stream for counters (c0, c1, c2) (integer
    tensors of one broadcast shape); bit-identical to the kernels'."""
    c0, c1, c2 = (torch.broadcast_tensors(c0.long(), c1.long(), c2.long()))
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _UINT32, (seed >> 32) & _UINT32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _UINT32, (k1 + _PHILOX_KEY_B) & _UINT32
    # word 0 as int32, negatives folded (~x), times the largest scale keeping the result < 1
    folded = torch.where(c0 >= 2**31, _UINT32 - c0, c0)
    return folded.to(torch.float32) * 4.6566127342e-10


def dropout_keep_mask(seed: int, p: float, rows: int, cols: int, planes: int = 1) -> Tensor:
    """Which elements of a [planes, rows, cols] block dropout keeps (True = kept)."""
    c0 = torch.arange(cols).view(1, 1, cols)
    c1 = torch.arange(rows).view(1, rows, 1)
    c2 = torch.arange(planes).view(planes, 1, 1)
    return dropout_uniform(seed, c0, c1, c2) >= p


# ---------------------------------------------------------------------------------------------
# Attention


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float,
              dropout_p: float = 0.0, dropout_keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale + mask) v, the math every attention kernel computes.

    q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv] with Hq a multiple of Hk (query head h
    reads key/value head h // (Hq // Hk)); mask broadcastable to [B, Hq, Sq, Sk], bool (True =
    attend) or float (added to the scores); causal: query i sees keys j <= i (top-left, as torch);
    dropout_keep: bool [B, Hq, Sq, Sk] applied to the probabilities, kept ones scaled by
    1 / (1 - dropout_p). Returns (out [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq] in the
    accumulator dtype). A row whose keys are all masked has lse = -inf, output 0 and gradient 0.
    """
    acc = accumulator_dtype(q.dtype)
    group = q.shape[1] // k.shape[1] if k.shape[1] else 1  # no heads at all: nothing to repeat
    k = k.to(acc).repeat_interleave(group, dim=1)
    v = v.to(acc).repeat_interleave(group, dim=1)
    scores = (q.to(acc) @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.to(acc)
    if causal:
        sq, sk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    # softmax with a detached row max (softmax does not depend on it) that is 0 for rows with no
    # visible key, so that such rows give exp(-inf) = 0 everywhere and no NaN in any gradient
    if scores.shape[-1] == 0:  # no keys at all
        row_max = scores.new_zeros(*scores.shape[:-1], 1)
    else:
        row_max = scores.detach().amax(-1, keepdim=True)
        row_max = torch.where(torch.isinf(row_max), 0.0, row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(total == 0, 1.0, total)
    lse = (row_max + torch.log(total)).squeeze(-1)
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p)
    return (probs @ v).to(q.dtype), lse


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool,
                       scale: float, dropout_p: float = 0.0,
                       dropout_keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `attention` in closed form, as the flash-attention backward kernels compute
    them (probabilities P recomputed, Z = keep / (1 - p) the dropout factor):
        dV = (P*Z)^T dO,  dP = (dO V^T) * Z,  D = rowsum(dO * O),  dS = P * (dP - D),
        dQ = dS K * scale,  dK = dS^T Q * scale
    with dK, dV summed over the query heads that share a key/value head. Returns (dq, dk, dv)."""
    acc = accumulator_dtype(q.dtype)
    b, hq = q.shape[:2]
    hk, sk = k.shape[1], k.shape[2]
    group = hq // hk
    out, lse = attention(q.to(acc), k.to(acc), v.to(acc), mask, causal, scale, dropout_p, dropout_keep)
    kq = k.to(acc).repeat_interleave(group, dim=1)
    vq = v.to(acc).repeat_interleave(group, dim=1)
    probs = _probabilities_from_lse(q.to(acc), kq, lse, mask, causal, scale)
    factor = dropout_keep.to(acc) / (1.0 - dropout_p) if dropout_keep is not None else 1.0
    d_out = grad_out.to(acc)
    dv = ((probs * factor).transpose(-1, -2) @ d_out).view(b, hk, group, sk, -1).sum(2)
    dp = (d_out @ vq.transpose(-1, -2)) * factor
    ds = probs * (dp - (d_out * out).sum(-1, keepdim=True))
    dq = (ds @ kq) * scale
    dk = ((ds.transpose(-1, -2) @ q.to(acc)) * scale).view(b, hk, group, sk, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention_mask_gradient(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, mask: Tensor,
                            causal: bool, scale: float, dropout_p: float = 0.0,
                            dropout_keep: Optional[Tensor] = None) -> Tensor:
    """The gradient of a float mask (added to the scores), dS = P * (dP - D), for every backend:
    P recomputed from the forward's lse, dP = (dO V^T) * Z, and D = rowsum(P * dP), which equals
    rowsum(dO * O) but keeps the accumulator's precision instead of the output's rounding. One
    batch element at a time ([Hq, Sq, Sk] in the accumulator dtype). mask [B, Hq, Sq, Sk] (a
    broadcast view is fine); returns [B, Hq, Sq, Sk] in mask's dtype, which autograd then sums over
    the dims the user's mask was broadcast along."""
    acc = accumulator_dtype(q.dtype)
    group = q.shape[1] // k.shape[1] if k.shape[1] else 1
    grad = torch.empty(*q.shape[:3], k.shape[2], dtype=mask.dtype, device=q.device)
    for i in range(q.shape[0]):
        kq = k[i].to(acc).repeat_interleave(group, dim=0)
        vq = v[i].to(acc).repeat_interleave(group, dim=0)
        probs = _probabilities_from_lse(q[i].to(acc), kq, lse[i].to(acc), mask[i], causal, scale)
        dp = grad_out[i].to(acc) @ vq.transpose(-1, -2)
        if dropout_keep is not None:
            dp = dp * dropout_keep[i].to(acc) / (1.0 - dropout_p)
        grad[i] = probs * (dp - (probs * dp).sum(-1, keepdim=True))
    return grad


def _probabilities_from_lse(q: Tensor, k: Tensor, lse: Tensor, mask: Optional[Tensor], causal: bool,
                            scale: float) -> Tensor:
    """P = exp(q k^T * scale + mask - lse), recomputed from the forward's log-sum-exp as backward
    passes do (q, k with the same heads, in the accumulator dtype). Exactly 0 at hidden keys whatever
    q, k and the lse hold (a row whose lse is NaN has NaN probabilities at its visible keys only),
    and on rows that see no key (lse = -inf)."""
    sq, sk = q.shape[-2], k.shape[-2]
    bias = _mask_bias(mask, causal, sq, sk, q.dtype, q.device)
    scores = (q @ k.transpose(-1, -2)) * scale + bias
    row_lse = lse.unsqueeze(-1)
    return torch.where((bias == -math.inf) | (row_lse == -math.inf), 0.0, torch.exp(scores - row_lse))


def _mask_bias(mask: Optional[Tensor], causal: bool, sq: int, sk: int, dtype, device) -> Tensor:
    """The additive form of mask and causality: 0 where visible, -inf (or the float mask) else."""
    bias = torch.zeros(sq, sk, dtype=dtype, device=device)
    if causal:
        bias = bias.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1), -math.inf)
    if mask is not None:
        bias = bias.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else bias + mask.to(dtype)
    return bias


def attention_dropout_mask(seed: int, p: float, batch: int, heads: int, sq: int, sk: int) -> Tensor:
    """The keep mask [B, H, Sq, Sk] attention dropout uses for `seed` (see dropout_uniform)."""
    return dropout_keep_mask(seed, p, sq, sk, batch * heads).view(batch, heads, sq, sk)


def decode_mask(cache_seqlens: Tensor, sq: int, s_max: int) -> Tensor:
    """The visibility rule of attention against a KV cache, as a bool [B, 1, Sq, S_max]: with
    L = cache_seqlens[b], new query i sits at position L - Sq + i and sees keys j <= that
    position (causal, aligned to the end of each sequence); keys at j >= L are not valid."""
    lengths = cache_seqlens.long().view(-1, 1, 1, 1).clamp(max=s_max)
    positions = lengths - sq + torch.arange(sq, device=cache_seqlens.device).view(1, 1, sq, 1)
    keys = torch.arange(s_max, device=cache_seqlens.device).view(1, 1, 1, s_max)
    return (keys <= positions) & (keys < lengths)


def attention_with_kv_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                            mask: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """Attention of q [B, Hq, Sq, D] against the first cache_seqlens[b] entries of the caches
    [B, Hk, S_max, D/Dv] under decode_mask (and `mask`, broadcastable to [B, Hq, Sq, S_max]).
    Slots at or past cache_seqlens[b] are never read, as in the kernels: whatever they hold (NaN
    from an unwritten cache included) cannot reach the result."""
    s_max = k_cache.shape[2]
    valid = (torch.arange(s_max, device=q.device) < cache_seqlens.long().view(-1, 1)).view(-1, 1, s_max, 1)
    k_cache, v_cache = torch.where(valid, k_cache, 0.0), torch.where(valid, v_cache, 0.0)
    visible = decode_mask(cache_seqlens, q.shape[2], s_max)
    if mask is not None:
        visible = visible & mask if mask.dtype == torch.bool else torch.where(visible, mask, -math.inf)
    return attention(q, k_cache, v_cache, visible, False, scale)


# ---------------------------------------------------------------------------------------------
# GeLU, linear layers with fused epilogues

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu", "silu")
# Gated activations and the activation of their gate. A gated linear layer's weight [2 * H, K]
# holds the gate's rows first, then the up projection's: its product pre [M, 2 * H] splits into
# gate = pre[:, :H] and up = pre[:, H:], and out = act(gate) * up [M, H] (SwiGLU, GeGLU).
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}


def output_width(activation: str, width: int) -> int:
    """Columns of a linear layer's output for a product `width` wide: half of it when gated."""
    return width // 2 if activation in GATED_ACTIVATIONS else width


def rotary(x: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor], interleaved: bool,
           conjugate: bool = False) -> Tensor:
    """Rotary position embedding of x [B, H, S, D] by the angle tables cos, sin [P, R/2].

    Token s of sequence b sits at position p = s (+ offsets[b], int64 [B]). Its first R = 2 *
    cos.shape[-1] features form R/2 pairs (x1, x2): (x[i], x[i + R/2]) in the half-split
    convention (Llama, GPT-NeoX, transformers' rotate_half), (x[2i], x[2i + 1]) interleaved
    (GPT-J); pair i turns by the angle whose cos and sin are cos[p, i], sin[p, i]:
        y1 = x1 cos - x2 sin,  y2 = x2 cos + x1 sin.
    Features R..D-1 pass through. conjugate=True turns by -angle: the backward, since the
    gradient of a rotation is the opposite rotation of the output's gradient.
    Returns y [B, H, S, D] (contiguous) in x's dtype, computed in the accumulator dtype.
    """
    half = cos.shape[-1]
    acc = accumulator_dtype(x.dtype)
    positions = torch.arange(x.shape[2], device=x.device)
    if offsets is not None:
        positions = offsets[:, None, None] + positions  # [B, 1, S]: broadcasts over heads
    c, s = cos.to(acc)[positions], sin.to(acc)[positions]  # [S, R/2] or [B, 1, S, R/2]
    if conjugate:
        s = -s
    v = x.to(acc)
    pairs, rest = v[..., :2 * half], v[..., 2 * half:]
    if interleaved:
        x1, x2 = pairs[..., 0::2], pairs[..., 1::2]
    else:
        x1, x2 = pairs[..., :half], pairs[..., half:]
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    rotated = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
    return torch.cat((rotated, rest), -1).to(x.dtype)


def activate(x: Tensor, activation: str) -> Tensor:
    """gelu: x * Phi(x) (erf form); gelu_tanh: torch's approximate="tanh" form; relu;
    silu: x * sigmoid(x); none."""
    if activation == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if activation == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    if activation == "relu":
        return torch.clamp_min(x, 0.0)
    if activation == "silu":
        return x * torch.sigmoid(x)
    return x


def activation_grad(pre: Tensor, activation: str) -> Tensor:
    """d activate(pre) / d pre, elementwise."""
    if activation == "gelu":  # Phi(x) + x phi(x)
        return 0.5 * (1.0 + torch.erf(pre * (1.0 / math.sqrt(2.0)))) + pre * torch.exp(-0.5 * pre * pre) / math.sqrt(
            2.0 * math.pi)
    if activation == "gelu_tanh":  # y = x (1 + t) / 2, t = tanh(c (x + a x^3))
        # Past |x| = 20, t is +-1 to every digit and the second term 0; clamping keeps x^3 from
        # overflowing into inf * 0 = NaN there.
        c, a = math.sqrt(2.0 / math.pi), 0.044715
        x = pre.clamp(-20.0, 20.0)
        t = torch.tanh(c * (x + a * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * a * x * x)
    if activation == "relu":
        return (pre > 0).to(pre.dtype)
    if activation == "silu":  # s + x s (1 - s), s = sigmoid(x)
        s = torch.sigmoid(pre)
        return s * (1.0 + pre * torch.sigmoid(-pre))
    return torch.ones_like(pre)


def gated_activate(pre: Tensor, activation: str) -> Tensor:
    """act(x) of ACTIVATIONS on pre [..., N], or for GATED_ACTIVATIONS act(gate) * up [..., N / 2]."""
    if activation not in GATED_ACTIVATIONS:
        return activate(pre, activation)
    gate, up = pre.chunk(2, dim=-1)
    return activate(gate, GATED_ACTIVATIONS[activation]) * up


def activation_backward(grad: Tensor, pre: Tensor, activation: str) -> Tensor:
    """The gradient of pre [..., N] from the gradient of gated_activate(pre): grad [..., N], or for
    a gated activation grad [..., N / 2] and d pre = [grad * up * act'(gate), grad * act(gate)]."""
    if activation not in GATED_ACTIVATIONS:
        return grad * activation_grad(pre, activation)
    gate, up = pre.chunk(2, dim=-1)
    act = GATED_ACTIVATIONS[activation]
    return torch.cat([grad * up * activation_grad(gate, act), grad * activate(gate, act)], dim=-1)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, dropout_p: float = 0.0,
           dropout_keep: Optional[Tensor] = None, residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """out = dropout(activation(x @ weight^T + bias)) + residual, the epilogue order of every
    linear kernel. x [M, K], weight [N, K] (torch.nn.Linear's layout), bias [N]; the output is
    [M, H] with H = N, or N / 2 for a gated activation (gated_activate); residual [M, H],
    dropout_keep bool [M, H]. Returns (out [M, H] in x's dtype, pre-activation [M, N] in the
    accumulator dtype)."""
    acc = accumulator_dtype(x.dtype)
    pre = x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        pre = pre + bias.to(acc)
    out = gated_activate(pre, activation)
    if dropout_keep is not None:
        out = out * dropout_keep / (1.0 - dropout_p)
    if residual is not None:
        out = out + residual.to(acc)
    return out.to(x.dtype), pre


def cross_entropy_rows(logits: Tensor, targets: Tensor, ignore_index: int, label_smoothing: float) -> Tensor:
    """The per-chunk step of linear_cross_entropy (engine/ops/cross_entropy.py), which every
    backend implements. logits [R, V] (contiguous) is overwritten with each row's gradient of its
    own loss, softmax - label_smoothing / V - (1 - label_smoothing) * one_hot(target), in the
    logits' dtype; rows whose target is ignore_index get loss 0 and a zero gradient. Returns the
    per-row loss [R] in the accumulator dtype:
        loss = (1 - ls) * (lse - x[target]) + ls * (lse - mean(x)),  lse = logsumexp(x)
    which is torch.nn.functional.cross_entropy's per-row loss with label_smoothing = ls."""
    x = logits.to(accumulator_dtype(logits.dtype))
    vocab = x.shape[1]
    ignored = targets == ignore_index
    safe_targets = targets.masked_fill(ignored, 0)[:, None]
    lse = torch.logsumexp(x, dim=1)
    loss = (1.0 - label_smoothing) * (lse - x.gather(1, safe_targets)[:, 0]) + label_smoothing * (lse - x.mean(1))
    grad = torch.exp(x - lse[:, None]) - label_smoothing / vocab
    grad.scatter_add_(1, safe_targets, grad.new_full(safe_targets.shape, label_smoothing - 1.0))
    logits.copy_(grad.masked_fill_(ignored[:, None], 0.0))
    return loss.masked_fill_(ignored, 0.0)
