"""Autoregressive generation for engine.models.GPT with preallocated KV caches.

    tokens = generate(model, input_ids, max_new_tokens=64)                       # greedy-or-sampled
    tokens = generate(model, ids, 64, top_k=1, attention_mask=mask, pad_token_id=0)  # left-padded batch

How one call runs (B prompts of T tokens, left-padded to a common T; S_max = T + max_new_tokens):
    cache     model.kv_caches gives each attention layer a KVCache of S_max slots (allocated
              once), whose mask hides the padded prompt slots. How a layer attends with its cache
              is the attention module's business (engine/models/gpt.py, CausalSelfAttention).
    prefill   the whole prompt in one forward pass; each layer stores its keys and values in
              slots [0, T) and attends with causal flash attention. Only the last position goes
              through lm_head.
    decode    one token per step; each layer appends its key and value in the next slot (the same
              for every sequence thanks to left padding) and attends to the cache with
              engine.functional.attention_with_kv_cache. Nothing is re-allocated or recomputed per
              step beyond the one new token.
    positions as transformers computes them for GPT-2 with an attention mask: cumsum(mask) - 1
              (0 on padding), so a left-padded prompt gets the same positions as unpadded.
Greedy decoding (top_k=1 or temperature=0) takes the argmax, as transformers' greedy generate.
"""
from typing import Optional

import torch
from torch import Tensor

from engine import _validate


def _check(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("input_ids must be an int64/int32 tensor [B, T]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one token per prompt, got shape {tuple(input_ids.shape)}")
    _validate.ids_in_range("input_ids", input_ids, model.config.vocab_size, "vocab_size")
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
    batch, t = input_ids.shape
    device = input_ids.device
    input_ids = input_ids.long()
    out = torch.empty(batch, t + max_new_tokens, dtype=torch.long, device=device)
    out[:, :t] = input_ids
    if max_new_tokens == 0:
        return out
    pad = pad_token_id if pad_token_id is not None else eos_token_id

    if attention_mask is None:
        positions = None                                       # 0..T-1
        next_position = torch.full((batch, 1), t, dtype=torch.long, device=device)
    else:
        tokens = attention_mask.to(device) != 0                # [B, T]
        counts = tokens.long().cumsum(-1)                      # [B, T]
        positions = (counts - 1).masked_fill(~tokens, 0)
        next_position = counts[:, -1:].clone()                 # [B, 1]: the first new token's position
    finished = torch.zeros(batch, dtype=torch.bool, device=device) if eos_token_id is not None else None

    was_training = model.training
    model.eval()
    try:
        with model.kv_caches(batch, t + max_new_tokens, attention_mask):
            h = model.body(input_ids, positions)                   # [B, T, C]: the prefill
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
                h = model.body(token.view(batch, 1), next_position)   # [B, 1, C]: a decode step
                logits = model.logits(h[:, -1])
                next_position += 1
    finally:
        model.train(was_training)
    return out
