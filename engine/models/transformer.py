"""The original encoder-decoder Transformer ("Attention Is All You Need", Vaswani et al. 2017),
built from engine.nn's layers (engine.nn.TransformerEncoderLayer / DecoderLayer: fused
projections, flash attention, add + norm in one pass, fused feed-forward).

    config = TransformerConfig(src_vocab_size=32000, d_model=512, nhead=8)
    model = Transformer(config)
    logits, loss = model(src, tgt_in, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad, labels=tgt_out)
    out = model.translate(src, src_key_padding_mask=src_pad, max_new_tokens=50)   # greedy

Shapes are batch-first: src [B, S], tgt [B, T] token ids; padding masks [B, S] / [B, T] bool with
torch's convention (True = padding, not attended). Embeddings are scaled by sqrt(d_model) and
added to sinusoidal position encodings; the decoder's self-attention is causal; cross-attention
reads the encoder output (memory) with the source padding mask. post-LN by default (the paper),
pre-LN with norm_first=True (then a final LayerNorm closes each stack, as is usual for pre-LN).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from engine import nn as enn


@dataclass
class TransformerConfig:
    """Hyper-parameters, named like torch.nn.Transformer's (d_model, nhead, num_encoder_layers,
    num_decoder_layers, dim_feedforward, dropout, activation, layer_norm_eps, norm_first, bias)
    plus the vocabularies and special tokens. Defaults: the paper's base model.

    tgt_vocab_size None = src_vocab_size. share_embeddings: one embedding table for source and
    target (needs equal vocabularies). tie_output: the output projection is the target embedding
    matrix (as in the paper). max_len: the longest sequence the sinusoidal table covers.
    label_smoothing: of the training loss (the paper used 0.1)."""
    src_vocab_size: int = 32000
    tgt_vocab_size: Optional[int] = None
    d_model: int = 512
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    layer_norm_eps: float = 1e-5
    norm_first: bool = False
    bias: bool = True
    max_len: int = 1024
    share_embeddings: bool = False
    tie_output: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.tgt_vocab_size is None:
            self.tgt_vocab_size = self.src_vocab_size
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "nhead", "num_encoder_layers",
                     "num_decoder_layers", "dim_feedforward", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.nhead:
            raise ValueError(f"TransformerConfig.d_model ({self.d_model}) must be a multiple of nhead ({self.nhead})")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"TransformerConfig.activation must be 'relu' or 'gelu', got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"TransformerConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(f"share_embeddings needs src_vocab_size == tgt_vocab_size, got {self.src_vocab_size} "
                             f"and {self.tgt_vocab_size}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < min(self.src_vocab_size, self.tgt_vocab_size):
                raise ValueError(f"TransformerConfig.{name} ({value}) must be a valid token id of both vocabularies")


class Transformer(torch.nn.Module):
    """Encoder-decoder Transformer: token embeddings * sqrt(d_model) + sinusoidal positions
    (dropout), num_encoder_layers encoder layers, num_decoder_layers decoder layers (causal
    self-attention, cross-attention over the memory, feed-forward), then a projection to the
    target vocabulary (tied to the target embeddings by default)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        self.src_embed = enn.Embedding(c.src_vocab_size, c.d_model, padding_idx=c.pad_token_id)
        self.tgt_embed = self.src_embed if c.share_embeddings else \
            enn.Embedding(c.tgt_vocab_size, c.d_model, padding_idx=c.pad_token_id)
        self.positions = enn.SinusoidalPositionalEncoding(c.d_model, c.max_len)
        layer_args = dict(d_model=c.d_model, nhead=c.nhead, dim_feedforward=c.dim_feedforward, dropout=c.dropout,
                          activation=c.activation, layer_norm_eps=c.layer_norm_eps, batch_first=True,
                          norm_first=c.norm_first, bias=c.bias)
        # pre-LN stacks end with a LayerNorm (the last layer's output is an un-normalized residual
        # sum); post-LN layers already end normalized, as in the paper
        final_norm = (lambda: enn.LayerNorm(c.d_model, eps=c.layer_norm_eps, bias=c.bias)) if c.norm_first \
            else (lambda: None)
        self.encoder = enn.TransformerEncoder(enn.TransformerEncoderLayer(**layer_args), c.num_encoder_layers,
                                              final_norm(), enable_nested_tensor=False)
        self.decoder = enn.TransformerDecoder(enn.TransformerDecoderLayer(**layer_args), c.num_decoder_layers,
                                              final_norm())
        self.output = enn.Linear(c.d_model, c.tgt_vocab_size, bias=False)
        self.reset_parameters()
        if c.tie_output:
            self.output.weight = self.tgt_embed.weight

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices (as torch.nn.Transformer), zero biases, unit norms; embeddings
        N(0, d_model^-1/2) so that, scaled by sqrt(d_model), they have unit variance (and, tied,
        the output logits start at a sensible scale); the padding row zero."""
        for name, p in self.named_parameters():
            if p.dim() > 1:
                torch.nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)
            elif isinstance(module, torch.nn.LayerNorm):
                torch.nn.init.ones_(module.weight)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
        for emb in {id(self.src_embed): self.src_embed, id(self.tgt_embed): self.tgt_embed}.values():
            torch.nn.init.normal_(emb.weight, 0.0, self.config.d_model ** -0.5)
            with torch.no_grad():
                emb.weight[self.config.pad_token_id].zero_()

    # -----------------------------------------------------------------------------------------

    def _embed(self, table: torch.nn.Embedding, ids: Tensor, offset: int = 0) -> Tensor:
        """[B, L] ids -> [B, L, d_model]: table(ids) * sqrt(d_model) + sinusoids, then dropout."""
        length = ids.shape[1]
        if offset + length > self.config.max_len:
            raise ValueError(f"sequence of {offset + length} positions exceeds max_len {self.config.max_len}")
        x = table(ids) * math.sqrt(self.config.d_model) + self.positions(length, offset)
        return F.dropout(x, self.config.dropout, self.training)

    def encode(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """The encoder: src [B, S] ids -> memory [B, S, d_model]."""
        self._check_ids("src", src)
        mask = self._check_padding("src_key_padding_mask", src_key_padding_mask, src)
        return self.encoder(self._embed(self.src_embed, src), src_key_padding_mask=mask, is_causal=False)

    def decode(self, tgt: Tensor, memory: Tensor, tgt_key_padding_mask: Optional[Tensor] = None,
               memory_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """The decoder and the output projection: tgt [B, T] ids, memory [B, S, d_model] ->
        logits [B, T, tgt_vocab_size]. Position t sees target positions <= t (causal) and every
        unpadded memory position."""
        self._check_ids("tgt", tgt)
        tgt_mask = self._check_padding("tgt_key_padding_mask", tgt_key_padding_mask, tgt)
        memory_mask = self._check_padding("memory_key_padding_mask", memory_key_padding_mask, memory[..., 0])
        h = self.decoder(self._embed(self.tgt_embed, tgt), memory, tgt_key_padding_mask=tgt_mask,
                         memory_key_padding_mask=memory_mask, tgt_is_causal=True)
        return self.output(h)

    def forward(self, src: Tensor, tgt: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Teacher-forced pass: src [B, S], tgt [B, T] (the decoder input, usually BOS + target
        without its last token) -> (logits [B, T, tgt_vocab_size], loss). labels [B, T] (usually
        the target shifted left, -100 where no prediction is scored, e.g. padding): loss = mean
        cross-entropy (with config.label_smoothing) over the scored positions; None without
        labels."""
        memory = self.encode(src, src_key_padding_mask)
        logits = self.decode(tgt, memory, tgt_key_padding_mask, src_key_padding_mask)
        loss = None
        if labels is not None:
            if tuple(labels.shape) != tuple(tgt.shape):
                raise ValueError(f"labels must have tgt's shape {tuple(tgt.shape)}, got {tuple(labels.shape)}")
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=-100, label_smoothing=self.config.label_smoothing)
        return logits, loss

    @torch.no_grad()
    def translate(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None, max_new_tokens: int = 64,
                  bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None) -> Tensor:
        """Greedy decoding: src [B, S] -> [B, 1 + n] target ids starting with BOS, n <=
        max_new_tokens. A sequence that has produced EOS is padded with pad_token_id afterwards;
        decoding stops when every sequence has. The memory is computed once; each step re-runs
        the decoder over the prefix (no KV cache: this is the simple reference decoder)."""
        c = self.config
        bos = c.bos_token_id if bos_token_id is None else bos_token_id
        eos = c.eos_token_id if eos_token_id is None else eos_token_id
        was_training = self.training
        self.eval()
        try:
            memory = self.encode(src, src_key_padding_mask)
            out = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
            done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
            for _ in range(max_new_tokens):
                if out.shape[1] >= c.max_len:
                    break
                logits = self.decode(out, memory, None, src_key_padding_mask)   # [B, t, V]
                token = logits[:, -1].argmax(-1)
                token = torch.where(done, torch.full_like(token, c.pad_token_id), token)
                out = torch.cat([out, token.unsqueeze(1)], dim=1)
                done |= token == eos
                if bool(done.all()):
                    break
            return out
        finally:
            self.train(was_training)

    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _check_ids(name: str, ids: Tensor) -> None:
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32/int64 tensor of token ids, got "
                            f"{ids.dtype if isinstance(ids, Tensor) else type(ids).__name__}")
        if ids.dim() != 2:
            raise ValueError(f"{name} must have shape [batch, seq], got {tuple(ids.shape)}")

    @staticmethod
    def _check_padding(name: str, mask: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
        """A [B, L] padding mask as bool (True = padding), or None."""
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(like.shape[:2]):
            raise ValueError(f"{name} must be a tensor of shape {tuple(like.shape[:2])} (True = padding), got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        return mask if mask.dtype == torch.bool else mask != 0

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
