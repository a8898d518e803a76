"""What training a language model on the engine needs besides the model: the losses, the masked-LM
corruption, a warmup + cosine learning-rate schedule, a byte-level tokenizer, and text that every
Python install carries offline (the documentation bundled with the standard library).

    from engine import training
    tok = training.ByteTokenizer()
    data = torch.tensor(tok.encode(training.stdlib_text()))       # ~470k byte tokens
    train, val = training.split(data, 0.1)
    x, y = training.random_batch(train, 16, 128, generator)        # y = x shifted by one token
    logits, loss = model(x, y)
    _, loss = model(x, y, return_logits=False)                     # the loss alone: no [B, S, V] logits
    schedule = training.warmup_cosine_schedule(optimizer, warmup_steps=50, total_steps=1000)

Conventions: token ids are int64; -100 marks a position without a loss (IGNORE_INDEX, as torch's
cross_entropy and transformers use); losses are means over the positions that count, in nats,
computed in fp32 whatever the logits' dtype.
"""
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from engine import functional

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Losses


def next_token_loss(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy of logits [..., V] against targets [...] (already aligned: targets[b, t]
    is the token that should follow position t; see next_token_targets), over the positions whose
    target is not ignore_index. fp32 scalar (NaN if every position is ignored, as torch)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits without the vocabulary "
                         f"dim), got {tuple(targets.shape)}")
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             ignore_index=ignore_index)


def next_token_loss_from_hidden(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                                ignore_index: int = IGNORE_INDEX) -> Tensor:
    """next_token_loss(hidden @ weight^T + bias, targets) without the logits: hidden [..., C] is
    what the output projection (an LM head, weight [V, C], bias [V]) reads, and
    engine.functional.linear_cross_entropy takes the products in chunks of rows, so that the
    [..., V] logits never exist whole. fp32 scalar (for 16-bit hidden states, their loss rounded
    to that dtype)."""
    return functional.linear_cross_entropy(hidden, weight, targets, bias, ignore_index=ignore_index).float()


def next_token_targets(input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                       ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The targets of next-token prediction for input_ids [B, S]: input_ids shifted left by one,
    ignore_index at the last position (nothing follows it) and wherever the next token is padding
    (attention_mask [B, S] == 0)."""
    targets = torch.full_like(input_ids, ignore_index)
    targets[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        targets[:, :-1].masked_fill_(attention_mask[:, 1:] == 0, ignore_index)
    return targets


def masked_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy of logits [..., V] at the positions mask_tokens selected (labels [...],
    ignore_index elsewhere). fp32 scalar."""
    return next_token_loss(logits, labels, ignore_index)


def mask_tokens(input_ids: Tensor, mask_token_id: int, vocab_size: int, generator: Optional[torch.Generator] = None,
                mlm_probability: float = 0.15, special_tokens_mask: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """BERT's masked-LM corruption of input_ids [...]. Each token is selected with probability
    mlm_probability (never where special_tokens_mask is True or attention_mask is 0); a selected
    token becomes mask_token_id with probability 0.8, a uniformly random token of [0, vocab_size)
    with 0.1, and stays itself with 0.1. Returns (inputs, labels): labels hold the original token
    at the selected positions and IGNORE_INDEX elsewhere. All draws come from `generator` (on the
    CPU), so a seeded generator reproduces the corruption."""
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} must lie in [0, vocab_size={vocab_size})")
    device = input_ids.device
    select_u = torch.rand(input_ids.shape, generator=generator).to(device)   # which tokens to predict
    action_u = torch.rand(input_ids.shape, generator=generator).to(device)   # mask / random / keep
    random_tokens = torch.randint(0, vocab_size, input_ids.shape, generator=generator).to(device, input_ids.dtype)
    eligible = torch.ones_like(input_ids, dtype=torch.bool)
    if special_tokens_mask is not None:
        eligible &= ~special_tokens_mask.to(device, torch.bool)
    if attention_mask is not None:
        eligible &= attention_mask.to(device) != 0
    selected = eligible & (select_u < mlm_probability)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    inputs = torch.where(selected & (action_u < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    inputs = torch.where(selected & (action_u >= 0.8) & (action_u < 0.9), random_tokens, inputs)
    return inputs, labels


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """The learning-rate multiplier at `step` (0-based): linear warmup (step + 1) / warmup_steps
    over the first warmup_steps steps, then a cosine decay from 1 to min_ratio at total_steps,
    then min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                           min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying warmup_cosine to each parameter group's initial lr; call .step() after
    each optimizer step."""
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got warmup_steps="
                         f"{warmup_steps}, total_steps={total_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_ratio))


# ---------------------------------------------------------------------------------------------
# Byte-level tokenizer


class ByteTokenizer:
    """Text as its UTF-8 bytes: token ids 0..255 are the byte values, so any text encodes and
    decodes losslessly with a 256-token vocabulary. special_tokens (e.g. "<mask>", "<pad>") get the
    ids 256, 257, ... in order; they are never produced by encode, only by token_id."""

    def __init__(self, special_tokens: Sequence[str] = ()):
        self.special_tokens = tuple(special_tokens)
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"special_tokens must be distinct, got {self.special_tokens}")
        self._special_ids = {token: 256 + i for i, token in enumerate(self.special_tokens)}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def token_id(self, special_token: str) -> int:
        if special_token not in self._special_ids:
            raise KeyError(f"{special_token!r} is not one of this tokenizer's special tokens {self.special_tokens}")
        return self._special_ids[special_token]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """ids: a sequence or 1-D tensor of token ids. Bytes that are not valid UTF-8 (a sample can
        end mid-character) become U+FFFD; special tokens appear as their names."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        pieces, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            if run:
                pieces.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            if not 256 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            pieces.append(self.special_tokens[i - 256])
        if run:
            pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)


# ---------------------------------------------------------------------------------------------
# Data


def stdlib_text() -> str:
    """The documentation text bundled with CPython: pydoc_data.topics, the pages help() shows for
    keywords and language topics (about 465k characters, English prose and code), concatenated in
    sorted topic order. Raises RuntimeError on the rare installs that strip pydoc_data."""
    try:
        from pydoc_data import topics
    except ImportError as error:
        raise RuntimeError(f"this Python install has no pydoc_data (the bundled documentation): {error}") from None
    return "\n\n".join(topics.topics[name] for name in sorted(topics.topics))


def split(data: Tensor, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """data [N] -> (train [N - n], val [n]) with n = round(val_fraction * N): the tail is held out."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = round(val_fraction * data.numel())
    return data[:data.numel() - n], data[data.numel() - n:]


def random_batch(data: Tensor, batch_size: int, block_size: int,
                 generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """batch_size windows of data [N] at random offsets: x [B, block_size] and y = the same
    windows one token later (next-token targets), both int64."""
    if data.numel() < block_size + 1:
        raise ValueError(f"data has {data.numel()} tokens, fewer than block_size + 1 = {block_size + 1}")
    starts = torch.randint(0, data.numel() - block_size, (batch_size,), generator=generator)
    index = starts.view(-1, 1) + torch.arange(block_size + 1).view(1, -1)        # [B, block_size + 1]
    windows = data[index].long()
    return windows[:, :-1], windows[:, 1:]


def unigram_entropy(data: Tensor, vocab_size: int) -> float:
    """Entropy (nats) of the token frequencies of data [N]: the cross-entropy of the best model
    that ignores context, the baseline a language model's loss must fall below."""
    counts = torch.bincount(data.long().reshape(-1), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, data: Tensor, batch_size: int, block_size: int, batches: int,
                  generator: Optional[torch.Generator] = None) -> float:
    """Mean next-token loss of model (called as model(x, y) -> (logits, loss)) over `batches`
    random batches of data, in eval mode (the mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        losses = []
        for _ in range(batches):
            x, y = random_batch(data, batch_size, block_size, generator)
            losses.append(float(model(x.to(device), y.to(device))[1]))
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)
