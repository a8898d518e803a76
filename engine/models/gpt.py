"""GPT: the decoder-only, pre-LN transformer of GPT-2 (nanoGPT's module structure and names),
built on engine.nn modules and engine.functional ops, so it runs the fused kernels where they
serve and the reference backend elsewhere.

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

The attention module (CausalSelfAttention) decides how it attends: without a KV cache, causal
attention over the whole sequence (training, scoring); with one (inside GPT.kv_caches, as
generation runs), the first pass stores the prompt's keys and values and each later pass appends
its tokens' and attends to the cache with engine.functional.attention_with_kv_cache.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import engine.functional as EF
from engine import _validate
from engine import nn as enn
from engine.models import hf
from engine.models.generate import generate as generate_tokens
from engine.training import next_token_loss_from_hidden

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


def _add_layer_norm(x: Tensor, residual: Tensor, norm: torch.nn.LayerNorm) -> tuple[Tensor, Tensor]:
    return EF.add_layer_norm(x, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class KVCache:
    """The keys and values one attention layer has computed for the sequences of one generate
    call, in preallocated slots (gpt-fast's KVCache; GPT.kv_caches gives one to each layer).

        k, v     [B, H, S_max, D]: slot j holds the key and value of the j-th token (zeros until
                 written, so that a backend reading past a sequence's valid length reads finite
                 numbers)
        length   slots filled so far: the same for every sequence, since prompts are left-padded
        visible  bool [B, 1, 1, S_max]: False on the padded prompt slots, which no query may see
        seqlens_by_length  int32 [S_max + 1, B] whose row n is all n: attention_with_kv_cache's
                 cache_seqlens once n slots are filled, read as a view instead of written per step
    visible and seqlens_by_length are the same tensors in every layer's cache."""

    def __init__(self, batch: int, n_head: int, max_length: int, head_dim: int, dtype: torch.dtype,
                 visible: Tensor, seqlens_by_length: Tensor):
        self.k = torch.zeros(batch, n_head, max_length, head_dim, dtype=dtype, device=visible.device)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.visible = visible
        self.seqlens_by_length = seqlens_by_length

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Stores k, v [B, H, S, D] in the next S slots. Returns the keys and values of every filled
        slot, [B, H, length, D]: views that end at `length`, so that no backend spends time on the
        slots still empty."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"the KV cache holds {self.k.shape[2]} tokens; {end} do not fit")
        self.k[:, :, start:end].copy_(k)
        self.v[:, :, start:end].copy_(v)
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def key_mask(self) -> Tensor:
        """bool [B, 1, 1, length]: which filled slots a query may see."""
        return self.visible[..., :self.length]

    def seqlens(self) -> Tensor:
        """int32 [B]: the filled length of each sequence."""
        return self.seqlens_by_length[self.length]


class CausalSelfAttention(torch.nn.Module):
    """Multi-head self-attention with one fused q/k/v product (c_attn, rows [q; k; v]) and the
    output projection (c_proj). h [B, S, C] -> [B, S, C]. kv_cache: None, or this layer's
    KVCache while GPT.kv_caches is open."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = enn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = enn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.kv_cache: Optional[KVCache] = None

    def forward(self, h: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """h [B, S, C] (already normalized) -> c_proj(attention) [B, S, C], with GPT-2's residual
        dropout. The one attention policy of the model:
        - no kv_cache (training, scoring): causal attention among the S positions, with dropout in
          training; attn_mask None or bool [B, 1, 1, S] (True = a real token) hides padding keys;
        - an empty kv_cache (prefill): the prompt's keys and values go into the cache and the
          prompt attends among itself as without a cache, the cache's mask hiding its padding;
        - a filled kv_cache (decode): the new tokens' keys and values are appended and their
          queries attend to every filled slot with attention_with_kv_cache.
        attn_mask is ignored with a cache: the cache's mask says which slots are padding."""
        q, k, v = self._split_heads(h)
        cache = self.kv_cache
        if cache is None:                    # training, scoring
            p = self.dropout if self.training else 0.0
            y = EF.scaled_dot_product_attention(q, k, v, attn_mask, p, is_causal=True)
        elif cache.length == 0:              # prefill: flash attention over the prompt alone
            cache.append(k, v)
            y = EF.scaled_dot_product_attention(q, k, v, cache.key_mask(), is_causal=True)
        else:                                # decode
            keys, values = cache.append(k, v)
            y = EF.attention_with_kv_cache(q, keys, values, cache.seqlens(), attn_mask=cache.key_mask())
        return self._merge_heads(y)

    def _split_heads(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h [B, S, C] -> q, k, v [B, H, S, D]: views into the one [B, S, 3C] product (the
        attention ops take any strides with a unit last stride)."""
        b, s, _ = h.shape
        qkv = self.c_attn(h).view(b, s, 3, self.n_head, self.n_embd // self.n_head)   # [B, S, 3, H, D]
        return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)

    def _merge_heads(self, y: Tensor) -> Tensor:
        """y [B, H, S, D] -> c_proj(y as [B, S, C]) [B, S, C], with GPT-2's residual dropout."""
        b, _, s, _ = y.shape
        out = self.c_proj(y.transpose(1, 2).reshape(b, s, self.n_embd))
        return F.dropout(out, self.dropout, self.training) if self.dropout else out


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
            out = EF.feed_forward(h, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                                  self.activation)
            out = F.dropout(out, self.dropout, True)
            return out if residual is None else residual + out
        return EF.feed_forward(h, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                               self.activation, residual=residual)


class Block(torch.nn.Module):
    """One pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(.)), on the residual stream x
    [B, S, C]. Every parameter it reads is its own and it calls its submodules, so module hooks
    (FSDP2's unshard/reshard, DDP, forward hooks on attn or mlp) see it like any torch block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = enn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = enn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, residual: Optional[Tensor] = None) -> Tensor:
        """x [B, S, C] -> the next residual stream [B, S, C].
        attn_mask: None or bool [B, 1, 1, S] (True = a real token), passed to attn.
        residual [B, S, C]: when given, the block's input is x + residual, added in ln_1's pass
            (GPT uses it for token + position embeddings)."""
        if residual is None:
            h = self.ln_1(x)
        else:
            h, x = _add_layer_norm(x, residual, self.ln_1)     # h = ln_1(x + residual), x = x + residual
        a = self.attn(h, attn_mask)
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
        hf_config, state = hf.read_checkpoint(model_or_dir, "GPT-2")
        config = gpt_config_from_hf(hf_config)
        ours = gpt_state_dict_from_hf(state, config)
        if dtype is None:
            dtype = ours["transformer.wte.weight"].dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        model = cls(config)
        model.load_state_dict(ours, strict=True)
        return model.to(dtype).eval()

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
        _validate.ids_in_range("idx", idx, self.config.vocab_size, "vocab_size")
        if position_ids is not None:
            _validate.ids_in_range("position_ids", position_ids, self.config.block_size, "block_size")

    def padding_mask(self, attention_mask: Optional[Tensor], idx: Tensor) -> Optional[Tensor]:
        """transformers' attention_mask [B, S] (1 = token, 0 = padding) -> bool [B, 1, 1, S], the
        key mask the attention ops read in place (never expanded to [B, H, S, S])."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(idx.shape):
            raise ValueError(f"attention_mask must be a tensor shaped like idx {tuple(idx.shape)}, got "
                             f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else attention_mask}")
        return (attention_mask != 0).reshape(idx.shape[0], 1, 1, idx.shape[1]).to(idx.device)

    @contextlib.contextmanager
    def kv_caches(self, batch_size: int, max_length: int, prompt_mask: Optional[Tensor] = None):
        """Inside the with block every attention layer holds a KVCache (gpt-fast's setup_caches)
        for batch_size sequences of up to max_length tokens: the first pass through body() stores
        the prompt, each later pass appends its tokens and attends to all the cached ones (see
        CausalSelfAttention.forward). Pass body() the position ids: they do not start at 0 after
        the prompt. prompt_mask [B, T]: the prompts' attention_mask (0 = left padding), whose
        padded slots no query sees. The caches are dropped when the block exits."""
        weight = self.lm_head.weight
        visible = torch.ones(batch_size, 1, 1, max_length, dtype=torch.bool, device=weight.device)
        if prompt_mask is not None:
            visible[:, 0, 0, :prompt_mask.shape[1]] = prompt_mask.to(weight.device) != 0
        seqlens_by_length = torch.arange(max_length + 1, dtype=torch.int32, device=weight.device)
        seqlens_by_length = seqlens_by_length.unsqueeze(1).repeat(1, batch_size)           # [S_max + 1, B]
        layers = [block.attn for block in self.transformer.h]
        for attn in layers:
            attn.kv_cache = KVCache(batch_size, self.config.n_head, max_length, self.config.head_dim, weight.dtype,
                                    visible, seqlens_by_length)
        try:
            yield
        finally:
            for attn in layers:
                attn.kv_cache = None

    def body(self, idx: Tensor, position_ids: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
             hidden_states: Optional[list] = None) -> Tensor:
        """The transformer without lm_head. idx [B, S] token ids; position_ids [B, S] or [S]
        (None: 0..S-1); attn_mask: None or the padding mask bool [B, 1, 1, S] (padding_mask
        makes it). Returns ln_f(x) [B, S, C]. hidden_states, if a list, receives what
        transformers' output_hidden_states gives: the embeddings, each block's output, the last
        one after ln_f."""
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
        for block in self.transformer.h:
            x = block(x, attn_mask, residual=residual)
            residual = None
            if hidden_states is not None:
                hidden_states.append(x)
        h = self.transformer.ln_f(x)
        if hidden_states is not None:
            hidden_states[-1] = h  # as transformers: the last entry is after ln_f
        return h

    def logits(self, h: Tensor) -> Tensor:
        """lm_head: h [..., C] -> logits [..., V] (the tied token embeddings)."""
        return self.lm_head(h)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None,
                return_logits: bool = True) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """idx [B, S] token ids. targets [B, S]: the token that should follow each position
        (idx shifted left by one, as nanoGPT's batches are; engine.training.next_token_targets
        makes them from idx), -100 where no loss is wanted. attention_mask [B, S]: 1 for tokens,
        0 for padding (padded keys are hidden from every query; a padded query's output is
        meaningless). position_ids [B, S] or [S]: default 0..S-1, as transformers' GPT-2 forward.
        Returns (logits [B, S, V] in the model's dtype, mean cross-entropy in fp32 or None). The loss
        comes from ln_f's output and lm_head's weight through linear_cross_entropy, in chunks of
        rows, without the logits; return_logits=False (with targets) skips them too and returns
        None in their place, as a training step that needs only the loss does."""
        self._check_tokens(idx, position_ids)
        h = self.body(idx, position_ids, self.padding_mask(attention_mask, idx))
        logits = self.logits(h) if return_logits or targets is None else None
        loss = None
        if targets is not None:
            loss = next_token_loss_from_hidden(h, self.lm_head.weight, targets, self.lm_head.bias)
        return logits, loss

    def hidden_states(self, idx: Tensor, attention_mask: Optional[Tensor] = None,
                      position_ids: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        """n_layer + 1 tensors [B, S, C], as transformers' GPT-2 returns with
        output_hidden_states=True: the embeddings, the output of each block, the last one after
        ln_f (that one is what lm_head reads)."""
        self._check_tokens(idx, position_ids)
        states: list = []
        self.body(idx, position_ids, self.padding_mask(attention_mask, idx), states)
        return tuple(states)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
                 attention_mask: Optional[Tensor] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Continues input_ids [B, T] by up to max_new_tokens tokens; returns [B, T + n] (the prompt
        and the new tokens). See engine.models.generate.generate for the arguments."""
        return generate_tokens(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
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


# ---------------------------------------------------------------------------------------------
# transformers' GPT-2 checkpoints (GPT2LMHeadModel, GPT2Model) as GPT's config and state_dict;
# engine/models/hf.py reads them.
#
# transformers' GPT-2 stores its linear layers as Conv1D, whose weight is [in, out] (x @ W + b);
# engine's Linear is torch's [out, in] (x @ W^T + b), so every Conv1D weight is transposed. The
# module names are the same (nanoGPT copied them), under "transformer." in GPT2LMHeadModel and at
# the top level in GPT2Model (and in the original OpenAI checkpoints).

# transformers' activation_function names -> the activation engine's linear epilogue fuses
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt_config_from_hf(hf_config: dict) -> GPTConfig:
    """GPTConfig from a transformers GPT2Config as a dict (config.json's fields). Raises
    ValueError for the GPT-2 variants engine's GPT does not implement (cross-attention, other
    attention scalings, untied embeddings, other activations)."""
    get = hf_config.get
    model_type = get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"expected a GPT-2 checkpoint (model_type 'gpt2'), got model_type {model_type!r}")
    if get("add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported")
    if not get("scale_attn_weights", True):
        raise ValueError("scale_attn_weights=False (unscaled attention scores) is not supported")
    if get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("scale_attn_by_inverse_layer_idx=True is not supported (engine scales by 1/sqrt(head_dim))")
    if not get("tie_word_embeddings", True):
        raise ValueError("tie_word_embeddings=False is not supported: engine's GPT ties lm_head to wte")
    act = get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise ValueError(f"activation_function {act!r} is not supported; supported: {sorted(_GPT2_ACTIVATIONS)}")
    # GPT-2 has three dropout rates; engine's GPT (as nanoGPT) has one. They are all 0.1 in GPT-2's
    # checkpoints and only matter in training: take the residual one.
    return GPTConfig(vocab_size=get("vocab_size", 50257), block_size=get("n_positions", 1024),
                     n_layer=get("n_layer", 12), n_head=get("n_head", 12), n_embd=get("n_embd", 768),
                     dropout=float(get("resid_pdrop", 0.1)), bias=True, n_inner=get("n_inner", None),
                     layer_norm_eps=float(get("layer_norm_epsilon", 1e-5)), activation=_GPT2_ACTIVATIONS[act])


def gpt_state_dict_from_hf(state: dict, config: GPTConfig) -> dict:
    """A transformers GPT-2 state_dict (keys with or without "transformer.") as GPT's state_dict:
    Conv1D weights [in, out] transposed to [out, in]; the causal-mask buffers of old checkpoints
    (attn.bias, attn.masked_bias) dropped; lm_head.weight = wte.weight (a checkpoint whose lm_head
    differs from wte is refused, since engine's GPT ties them)."""
    src = {}
    for key, value in state.items():
        key = key[len("transformer."):] if key.startswith("transformer.") else key
        if key.endswith(("attn.bias", "attn.masked_bias")) and key.count(".") == 3:
            continue  # h.{i}.attn.bias: the causal mask buffer, not a parameter
        src[key] = value
    lm_head = src.pop("lm_head.weight", None)
    out = {}
    expected = ["wte.weight", "wpe.weight", "ln_f.weight"] + (["ln_f.bias"] if config.bias else [])
    for i in range(config.n_layer):
        for name in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            expected.append(f"h.{i}.{name}.weight")
            if config.bias:
                expected.append(f"h.{i}.{name}.bias")
    missing = [k for k in expected if k not in src]
    if missing:
        raise ValueError(f"the checkpoint lacks GPT-2 weights: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    unexpected = sorted(set(src) - set(expected))
    if unexpected:
        raise ValueError(f"the checkpoint has weights engine's GPT does not know: {unexpected[:6]}")
    for key in expected:
        value = src[key]
        out["transformer." + key] = value.t().contiguous() if key.endswith(_GPT2_CONV1D) else value
    wte = out["transformer.wte.weight"]
    if lm_head is not None and lm_head.data_ptr() != wte.data_ptr() and not torch.equal(lm_head, wte):
        raise ValueError("the checkpoint's lm_head.weight differs from wte.weight; engine's GPT ties them")
    out["lm_head.weight"] = wte
    return out
