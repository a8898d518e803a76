"""Autoregressive generation for engine.models.GPT with a preallocated KV cache.

    tokens = generate(model, input_ids, max_new_tokens=64)                       # greedy-or-sampled
    tokens = generate(model, ids, 64, top_k=1, attention_mask=mask, pad_token_id=0)  # left-padded batch

How one call runs (B prompts of T tokens, left-padded to a common T; S_max = T + max_new_tokens):
    cache     per layer K and V [B, H, S_max, D], allocated once (zeros, so that a backend that
              reads past a sequence's valid length reads finite numbers), plus a bool key mask
              [B, 1, 1, S_max] that is False on the padded prompt slots and True elsewhere.
    prefill   the whole prompt in one forward pass: causal flash attention with the padding mask
              (engine.functional.scaled_dot_product_attention); each layer's K and V are copied
              into cache slots [0, T). Only the last position goes through lm_head.
    decode    one token per step: its K and V go to slot L - 1 (L = T + tokens generated so far,
              the same for every sequence thanks to left padding), and its query attends to the
              cache with engine.functional.attention_with_kv_cache (cache_seqlens [B] = L, the key
              mask hiding the padding). Nothing is re-allocated or recomputed per step beyond the
              one new token.
    positions as transformers computes them for GPT-2 with an attention mask: cumsum(mask) - 1
              (0 on padding), so a left-padded prompt gets the same positions as unpadded.
Greedy decoding (top_k=1 or temperature=0) takes the argmax, as transformers' greedy generate.
"""
from typing import Optional

import torch
from torch import Tensor

from engine import functional as F


class KVCache:
    """Keys and values of every layer for one generate call: k, v [n_layer, B, H, S_max, D] (one
    allocation each; layer i's cache is the view k[i]); slots bool [B, 1, 1, S_max] (False: a
    padded prompt slot that no query may see); length: slots filled so far (the same for every
    sequence); seqlens int32 [B]: `length` per sequence, as attention_with_kv_cache takes it."""

    def __init__(self, n_layer: int, batch: int, n_head: int, s_max: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.k = torch.zeros(n_layer, batch, n_head, s_max, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(n_layer, batch, n_head, s_max, head_dim, dtype=dtype, device=device)
        self.slots = torch.ones(batch, 1, 1, s_max, dtype=torch.bool, device=device)
        self.length = 0
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    def prefill(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The prompt's attention of one layer: q, k, v [B, H, T, D] -> [B, H, T, D]. Stores k, v
        in slots [0, T) (self.length must already be T)."""
        t = k.shape[2]
        self.k[layer, :, :, :t].copy_(k)
        self.v[layer, :, :, :t].copy_(v)
        return F.scaled_dot_product_attention(q, k, v, self.slots[..., :t], is_causal=True)

    def decode(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One new token's attention of one layer: q, k, v [B, H, 1, D] -> [B, H, 1, D]. Stores k, v
        in slot length - 1 and attends to slots [0, length) (the views passed end at `length`,
        so no backend spends time on slots not filled yet)."""
        n = self.length
        self.k[layer, :, :, n - 1:n].copy_(k)
        self.v[layer, :, :, n - 1:n].copy_(v)
        return F.attention_with_kv_cache(q, self.k[layer, :, :, :n], self.v[layer, :, :, :n], self.seqlens,
                                         attn_mask=self.slots[..., :n])

    def advance(self, n: int) -> None:
        """n more slots are (about to be) filled."""
        self.length += n
        self.seqlens.fill_(self.length)


def _check(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("input_ids must be an int64/int32 tensor [B, T]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one token per prompt, got shape {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    total = input_ids.shape[1] + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
                         f"block_size {model.config.block_size} (the model has no positions beyond it)")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
        if not bool((attention_mask != 0).any(-1).all()):
            raise ValueError("every prompt needs at least one token that is not padding")
        if not bool((attention_mask[:, -1] != 0).all()):
            raise ValueError("attention_mask has padding at the end of a prompt; generation needs left padding "
                             "(pad before the prompt, as tokenizer.padding_side = 'left')")


def select_next(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """The next token of each row of logits [B, V] -> int64 [B]. Greedy (argmax, first index on
    ties as torch.argmax) when top_k == 1 or temperature == 0; else samples from
    softmax(logits / temperature) restricted to the top_k most likely tokens and then to the
    smallest set whose probability reaches top_p (the most likely token always stays)."""
    if top_k == 1 or temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]           # [B, 1]: the k-th largest score
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # drop a token when the tokens more likely than it already reach top_p
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0] = False
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
             attention_mask: Optional[Tensor] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """Continues each prompt of input_ids [B, T] by up to max_new_tokens tokens.

    attention_mask [B, T] (1 = token, 0 = padding) for a batch of prompts of different lengths,
    left-padded. temperature, top_k, top_p: see select_next (greedy when top_k=1 or
    temperature=0). eos_token_id: a sequence that produced it is finished, and gets pad_token_id
    (default: eos_token_id) from then on; generation stops when every sequence is finished.
    generator: the torch.Generator sampling draws from. The model runs in eval mode (restored
    afterwards). Returns int64 [B, T + n], the prompts followed by the n <= max_new_tokens new
    tokens, as transformers' generate returns them.
    """
    _check(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
    config = model.config
    batch, t = input_ids.shape
    device = input_ids.device
    input_ids = input_ids.long()
    out = torch.empty(batch, t + max_new_tokens, dtype=torch.long, device=device)
    out[:, :t] = input_ids
    if max_new_tokens == 0:
        return out
    pad = pad_token_id if pad_token_id is not None else eos_token_id

    param = model.lm_head.weight
    cache = KVCache(config.n_layer, batch, config.n_head, t + max_new_tokens, config.head_dim, param.dtype, device)
    if attention_mask is None:
        positions = None                                       # 0..T-1
        next_position = torch.full((batch, 1), t, dtype=torch.long, device=device)
    else:
        tokens = attention_mask.to(device) != 0                # [B, T]
        cache.slots[:, 0, 0, :t] = tokens
        counts = tokens.long().cumsum(-1)                      # [B, T]
        positions = (counts - 1).masked_fill(~tokens, 0)
        next_position = counts[:, -1:].clone()                 # [B, 1]: the first new token's position
    finished = torch.zeros(batch, dtype=torch.bool, device=device) if eos_token_id is not None else None

    was_training = model.training
    model.eval()
    try:
        cache.advance(t)
        h = model.body(input_ids, positions, cache.prefill)    # [B, T, C]
        logits = model.logits(h[:, -1])                        # [B, V]: only the last position's
        for step in range(max_new_tokens):
            token = select_next(logits, temperature, top_k, top_p, generator)   # [B]
            if finished is not None:
                token = torch.where(finished, pad, token)
                finished |= token == eos_token_id
            out[:, t + step] = token
            if step + 1 == max_new_tokens:
                break
            if finished is not None and bool(finished.all()):
                return out[:, :t + step + 1]
            cache.advance(1)
            h = model.body(token.view(batch, 1), next_position, cache.decode)    # [B, 1, C]
            logits = model.logits(h[:, -1])
            next_position += 1
    finally:
        model.train(was_training)
    return out
