"""GPT: the decoder-only, pre-LN transformer of GPT-2 (nanoGPT's module structure and names),
built directly on engine.functional, so it runs the fused kernels where they serve and the
reference backend elsewhere.

    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    model = GPT(config)
    logits, loss = model(idx, targets)                  # idx, targets [B, S]; logits [B, S, V]
    tokens = model.generate(idx, max_new_tokens=32)     # KV-cached decoding (engine/models/generate.py)
    model = GPT.from_hf("path/to/local/gpt2")           # a transformers GPT-2 object or a local folder

The residual stream x [B, S, C] through one block, with the norms fused into the residual adds
(C = n_embd, H = n_head, D = C / H):
    h      = LayerNorm_1(x)           block 0: add_layer_norm(token + position embeddings) makes x and h
    q,k,v  = h W_attn^T + b           one product [B, S, 3C], viewed (not copied) as 3 x [B, H, S, D]
    a      = softmax(q k^T / sqrt(D) + causal + padding) v      flash attention
    h2, x  = LayerNorm_2(x + a W_proj^T + b), x + a W_proj^T + b   add_layer_norm: one pass for both
    x      = gelu_tanh(h2 W_fc^T + b) W_mproj^T + b + x          feed_forward, residual in its epilogue
and after the last block ln_f normalizes x and lm_head (tied to wte) gives the logits.
With dropout active (training and dropout > 0) the residual dropouts of GPT-2 sit between the
products and the adds, so those two fusions are replaced by plain adds there.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from engine import functional as F
from engine import nn as enn

ACTIVATIONS = ("gelu_tanh", "gelu", "relu")


@dataclass
class GPTConfig:
    """GPT's hyper-parameters with nanoGPT's field names and defaults (GPT-2 small with the
    vocabulary padded to 50304). bias: biases in the linear layers and layer norms. The last three
    fields are extras with GPT-2's values, so that any transformers GPT-2 imports exactly:
    n_inner (MLP width, None = 4 * n_embd), layer_norm_eps, activation ("gelu_tanh" is GPT-2's
    gelu_new; "gelu" is the erf form)."""
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    n_inner: Optional[int] = None
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_inner is not None and (isinstance(self.n_inner, bool) or not isinstance(self.n_inner, int)
                                         or self.n_inner < 1):
            raise ValueError(f"GPTConfig.n_inner must be None or a positive int, got {self.n_inner!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_size(self) -> int:
        """Width of the MLP's hidden layer."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


# attend(layer, q, k, v) -> y: the attention of one layer, q, k, v [B, H, S, D] (strided views of
# the fused qkv product) -> y [B, H, S, D]. GPT.forward passes causal flash attention with the
# padding mask; generation passes functions that also fill and read a KV cache.
Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def _layer_norm(x: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _add_layer_norm(x: Tensor, residual: Tensor, norm: torch.nn.LayerNorm) -> tuple[Tensor, Tensor]:
    return F.add_layer_norm(x, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class CausalSelfAttention(torch.nn.Module):
    """Multi-head self-attention with one fused q/k/v product (c_attn, rows [q; k; v]) and the
    output projection (c_proj). x [B, S, C] -> [B, S, C]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = enn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = enn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def split_heads(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h [B, S, C] -> q, k, v [B, H, S, D]: views into the one [B, S, 3C] product (the
        attention ops take any strides with a unit last stride)."""
        b, s, _ = h.shape
        qkv = F.linear(h, self.c_attn.weight, self.c_attn.bias)                  # [B, S, 3C]
        qkv = qkv.view(b, s, 3, self.n_head, self.n_embd // self.n_head)          # [B, S, 3, H, D]
        return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)

    def merge_heads(self, y: Tensor) -> Tensor:
        """y [B, H, S, D] -> c_proj(y as [B, S, C]) [B, S, C], with GPT-2's residual dropout."""
        b, _, s, _ = y.shape
        out = F.linear(y.transpose(1, 2).reshape(b, s, self.n_embd), self.c_proj.weight, self.c_proj.bias)
        return torch.nn.functional.dropout(out, self.dropout, self.training) if self.dropout else out

    def forward(self, h: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """h [B, S, C] (already normalized); attn_mask: None or bool [B, 1, 1, S] (True = a real
        token). Causal attention, then c_proj."""
        q, k, v = self.split_heads(h)
        p = self.dropout if self.training else 0.0
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask, p, is_causal=True))


class MLP(torch.nn.Module):
    """c_proj(act(c_fc(h))) [B, S, C] -> [B, S, C], with the residual add fused into c_proj's
    epilogue (engine.functional.feed_forward) when there is no dropout in between."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = enn.Linear(config.n_embd, config.hidden_size, bias=config.bias)
        self.c_proj = enn.Linear(config.hidden_size, config.n_embd, bias=config.bias)
        self.activation = config.activation
        self.dropout = config.dropout

    def forward(self, h: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """h [B, S, C]; returns mlp(h) + residual (residual [B, S, C] or None)."""
        if self.training and self.dropout > 0:  # GPT-2 drops the MLP's output, before the residual add
            out = F.feed_forward(h, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                                 self.activation)
            out = torch.nn.functional.dropout(out, self.dropout, True)
            return out if residual is None else residual + out
        return F.feed_forward(h, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                              self.activation, residual=residual)


class Block(torch.nn.Module):
    """One pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(.)), on the residual stream x
    [B, S, C]. Every parameter it reads is its own and it runs through __call__, so module hooks
    (FSDP2's unshard/reshard, DDP) see it like any torch block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = enn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = enn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                attend: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None) -> Tensor:
        """x [B, S, C] -> the next residual stream [B, S, C].
        attn_mask: None or bool [B, 1, 1, S] (True = a real token) for the default attention.
        residual [B, S, C]: when given, the block's input is x + residual, added in ln_1's pass
            (GPT uses it for token + position embeddings).
        attend(q, k, v) -> [B, H, S, D]: replaces the default causal flash attention (generation
            passes one that also fills a KV cache)."""
        if residual is None:
            h = _layer_norm(x, self.ln_1)
        else:
            h, x = _add_layer_norm(x, residual, self.ln_1)     # h = ln_1(x + residual), x = x + residual
        if attend is None:
            p = self.attn.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(*self.attn.split_heads(h), attn_mask, p, is_causal=True)
        else:
            y = attend(*self.attn.split_heads(h))
        a = self.attn.merge_heads(y)
        h2, x = _add_layer_norm(a, x, self.ln_2)                # h2 = ln_2(x + a), x = x + a
        return self.mlp(h2, residual=x)                         # x + mlp(h2)


class GPT(torch.nn.Module):
    """GPT-2-style language model. Parameters as nanoGPT names them: transformer.wte [V, C],
    transformer.wpe [block_size, C], transformer.h[i].{ln_1, attn.c_attn, attn.c_proj, ln_2,
    mlp.c_fc, mlp.c_proj}, transformer.ln_f, lm_head (its weight is wte's: tied)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = torch.nn.ModuleDict(dict(
            wte=torch.nn.Embedding(config.vocab_size, config.n_embd),
            wpe=torch.nn.Embedding(config.block_size, config.n_embd),
            drop=torch.nn.Dropout(config.dropout),
            h=torch.nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=enn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = enn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_hf(cls, model_or_dir, dtype: Optional[torch.dtype] = None) -> "GPT":
        """A GPT with the weights of a transformers GPT2LMHeadModel / GPT2Model object, or of a
        local save_pretrained folder (model.safetensors or pytorch_model.bin, sharded or not;
        nothing is downloaded). dtype: None keeps the checkpoint's floating dtype. In eval mode."""
        from engine.models.hf import gpt_from_hf

        return gpt_from_hf(model_or_dir, dtype)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding subtracts the position embeddings (the token embeddings
        are the output layer's weight too, so they count), as nanoGPT reports it."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # -----------------------------------------------------------------------------------------

    def _check_tokens(self, idx: Tensor, position_ids: Optional[Tensor]) -> None:
        if not isinstance(idx, Tensor) or idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 2:
            raise TypeError(f"idx must be an int64/int32 tensor [B, S], got "
                            f"{idx.dtype if isinstance(idx, Tensor) else type(idx).__name__} "
                            f"{tuple(idx.shape) if isinstance(idx, Tensor) else ''}")
        if position_ids is None and idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}")

    def padding_mask(self, attention_mask: Optional[Tensor], idx: Tensor) -> Optional[Tensor]:
        """transformers' attention_mask [B, S] (1 = token, 0 = padding) -> bool [B, 1, 1, S], the
        key mask the attention ops read in place (never expanded to [B, H, S, S])."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(idx.shape):
            raise ValueError(f"attention_mask must be a tensor shaped like idx {tuple(idx.shape)}, got "
                             f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else attention_mask}")
        return (attention_mask != 0).reshape(idx.shape[0], 1, 1, idx.shape[1]).to(idx.device)

    def body(self, idx: Tensor, position_ids: Optional[Tensor], attend: Attend,
             hidden_states: Optional[list] = None) -> Tensor:
        """The transformer without lm_head. idx [B, S] token ids; position_ids [B, S] or [S]
        (None: 0..S-1); attend(layer, q, k, v): the attention of each layer (see Attend).
        Returns ln_f(x) [B, S, C]. hidden_states, if a list, receives what transformers'
        output_hidden_states gives: the embeddings, each block's output, the last one after ln_f."""
        b, s = idx.shape
        wte, wpe = self.transformer.wte, self.transformer.wpe
        if position_ids is None:
            position_ids = torch.arange(s, device=idx.device)
        tokens = wte(idx)                                               # [B, S, C]
        positions = wpe(position_ids).expand(b, s, self.config.n_embd)  # [B or 1, S, C] -> [B, S, C]
        if self.training and self.config.dropout > 0:
            x, residual = self.transformer.drop(tokens + positions), None
        else:  # block 0 adds them in its ln_1 pass
            x, residual = tokens, positions
        if hidden_states is not None:
            hidden_states.append(x if residual is None else tokens + positions)
        for i, block in enumerate(self.transformer.h):
            x = block(x, residual=residual, attend=lambda q, k, v, i=i: attend(i, q, k, v))
            residual = None
            if hidden_states is not None:
                hidden_states.append(x)
        h = _layer_norm(x, self.transformer.ln_f)
        if hidden_states is not None:
            hidden_states[-1] = h  # as transformers: the last entry is after ln_f
        return h

    def logits(self, h: Tensor) -> Tensor:
        """lm_head: h [..., C] -> logits [..., V] (the tied token embeddings)."""
        return F.linear(h, self.lm_head.weight)

    def _attend_causal(self, mask: Optional[Tensor]) -> Attend:
        p = self.config.dropout if self.training else 0.0
        return lambda i, q, k, v: F.scaled_dot_product_attention(q, k, v, mask, p, is_causal=True)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """idx [B, S] token ids. targets [B, S]: the token that should follow each position
        (idx shifted left by one, as nanoGPT's batches are; engine.training.next_token_targets
        makes them from idx), -100 where no loss is wanted. attention_mask [B, S]: 1 for tokens,
        0 for padding (padded keys are hidden from every query; a padded query's output is
        meaningless). position_ids [B, S] or [S]: default 0..S-1, as transformers' GPT-2 forward.
        Returns (logits [B, S, V] in the model's dtype, mean cross-entropy in fp32 or None)."""
        self._check_tokens(idx, position_ids)
        h = self.body(idx, position_ids, self._attend_causal(self.padding_mask(attention_mask, idx)))
        logits = self.logits(h)
        loss = None
        if targets is not None:
            from engine.training import next_token_loss

            loss = next_token_loss(logits, targets)
        return logits, loss

    def hidden_states(self, idx: Tensor, attention_mask: Optional[Tensor] = None,
                      position_ids: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        """n_layer + 1 tensors [B, S, C], as transformers' GPT-2 returns with
        output_hidden_states=True: the embeddings, the output of each block, the last one after
        ln_f (that one is what lm_head reads)."""
        self._check_tokens(idx, position_ids)
        states: list = []
        self.body(idx, position_ids, self._attend_causal(self.padding_mask(attention_mask, idx)), states)
        return tuple(states)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
                 attention_mask: Optional[Tensor] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Continues input_ids [B, T] by up to max_new_tokens tokens; returns [B, T + n] (the prompt
        and the new tokens). See engine.models.generate.generate for the arguments."""
        from engine.models.generate import generate

        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, attention_mask=attention_mask, pad_token_id=pad_token_id,
                        generator=generator)

    def configure_optimizer(self, weight_decay: float = 0.1, learning_rate: float = 6e-4,
                            betas: tuple = (0.9, 0.95)) -> torch.optim.AdamW:
        """AdamW with weight decay on the matrices (linear weights, embeddings) only, as nanoGPT."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate, betas=betas)
