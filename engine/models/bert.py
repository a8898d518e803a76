"""BERT: the encoder-only, post-LN transformer, with a masked-LM head and a sequence-classification
head, built directly on engine.functional (so it runs the fused kernels where they serve and the
reference backend elsewhere).

    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
    model = BERT(config)
    out = model(input_ids, attention_mask=mask, labels=labels)            # masked-LM logits and loss
    out = model(input_ids, attention_mask=mask, labels=y, head="classification")
    model = BERT.from_hf("path/to/local/bert")   # a transformers BERT object or a local folder

One layer, x [B, S, H] (post-LN, as in the BERT paper):
    qkv   = x W_qkv^T + b_qkv                            one product for q, k and v: [B, S, 3H]
    a     = softmax(q k^T / sqrt(d) + padding) v          flash attention, padding mask [B, 1, 1, S]
    x     = LayerNorm(a W_o^T + b_o + x)                  add_layer_norm: residual add fused into the norm
    x     = LayerNorm(gelu(x W_1^T + b_1) W_2^T + b_2 + x) feed_forward, then add_layer_norm
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from engine import functional as F
from engine import nn as enn
from engine import training

# transformers' hidden_act names -> the activation the engine's linear epilogue fuses
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclass
class BertConfig:
    """BERT's hyper-parameters, with transformers.BertConfig's field names and defaults
    (BERT-base). hidden_act: "gelu" (erf form, BERT's), "gelu_new"/"gelu_pytorch_tanh" (tanh
    form) or "relu". classifier_dropout None means hidden_dropout_prob (as in transformers)."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2
    initializer_range: float = 0.02
    classifier_dropout: Optional[float] = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "num_labels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"BertConfig.classifier_dropout must be None or in [0, 1), got {self.classifier_dropout}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"BertConfig.pad_token_id ({self.pad_token_id}) must lie in [0, vocab_size)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class BertOutput:
    """What BERT.forward returns. last_hidden_state [B, S, H]; pooler_output [B, H] (tanh of the
    pooler over the first token; for head="classification" or "pooled"); logits [B, S, V] for
    head="mlm", [B, num_labels] for head="classification", else None; loss: a scalar when labels
    were given, else None."""
    last_hidden_state: Tensor
    pooler_output: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    loss: Optional[Tensor] = None


class BertEmbeddings(torch.nn.Module):
    """word + token-type + position embeddings, then LayerNorm (the add fused into the norm) and
    dropout. input_ids, token_type_ids [B, S] -> [B, S, H]."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word = torch.nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = torch.nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = torch.nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = enn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = config.hidden_dropout_prob

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, position_ids: Tensor) -> Tensor:
        words = self.word(input_ids)                                              # [B, S, H]
        # position embeddings [1 or B, S, H] broadcast over the batch in the add
        rest = self.token_type(token_type_ids) + self.position(position_ids)      # [B, S, H]
        x, _ = F.add_layer_norm(words, rest, self.norm.normalized_shape, self.norm.weight, self.norm.bias,
                                self.norm.eps)
        return torch.nn.functional.dropout(x, self.dropout, self.training)


class BertLayer(torch.nn.Module):
    """One post-LN encoder layer: self-attention (q, k and v from one fused product), add & norm,
    feed-forward (bias and activation fused into the first product), add & norm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = enn.Linear(h, 3 * h)              # rows [q; k; v], each [H, H]
        self.attn_out = enn.Linear(h, h)
        self.attn_norm = enn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ffn = enn.FeedForward(h, config.intermediate_size, _ACTIVATIONS[config.hidden_act])
        self.ffn_norm = enn.LayerNorm(h, eps=config.layer_norm_eps)
        self.hidden_dropout = config.hidden_dropout_prob
        self.attention_dropout = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """x [B, S, H]; mask None or bool [B, 1, 1, S] (True = attend) -> [B, S, H]."""
        b, s, h = x.shape
        heads = self.num_heads
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)                         # [B, S, 3H]
        # [B, S, 3, heads, d] -> three [B, heads, S, d] strided views (no copy: attention reads strides)
        q, k, v = qkv.view(b, s, 3, heads, h // heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(b, s, h)                                   # [B, S, H]
        a = self._dropout(F.linear(a, self.attn_out.weight, self.attn_out.bias))
        x, _ = F.add_layer_norm(a, x, (h,), self.attn_norm.weight, self.attn_norm.bias, self.attn_norm.eps)
        f = self._dropout(F.feed_forward(x, self.ffn.linear1.weight, self.ffn.linear1.bias, self.ffn.linear2.weight,
                                         self.ffn.linear2.bias, self.ffn.activation))
        x, _ = F.add_layer_norm(f, x, (h,), self.ffn_norm.weight, self.ffn_norm.bias, self.ffn_norm.eps)
        return x

    def _dropout(self, t: Tensor) -> Tensor:
        # BERT drops out the sublayer's output (after the second product), which is not where
        # feed_forward's fused dropout sits (the hidden activation), so it is a separate step
        return torch.nn.functional.dropout(t, self.hidden_dropout, self.training) if self.hidden_dropout else t


class BERT(torch.nn.Module):
    """BERT (Devlin et al.): embeddings, num_hidden_layers post-LN encoder layers, and two heads:
    masked-LM (dense + activation + LayerNorm, then a decoder tied to the word embeddings plus its
    own bias) and sequence classification (tanh pooler over the first token, dropout, linear)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embeddings = BertEmbeddings(config)
        self.layers = torch.nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = enn.Linear(h, h)
        self.classifier = enn.Linear(h, config.num_labels)
        self.mlm_transform = enn.Linear(h, h, activation=_ACTIVATIONS[config.hidden_act])
        self.mlm_norm = enn.LayerNorm(h, eps=config.layer_norm_eps)
        self.mlm_bias = torch.nn.Parameter(torch.zeros(config.vocab_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """transformers' BERT initialization: normal(0, initializer_range) weights, zero biases,
        unit norm weights, a zero embedding row for the padding token."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, torch.nn.Embedding):
                torch.nn.init.normal_(module.weight, 0.0, std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, torch.nn.LayerNorm):
                torch.nn.init.ones_(module.weight)
                torch.nn.init.zeros_(module.bias)
        torch.nn.init.zeros_(self.mlm_bias)

    # -----------------------------------------------------------------------------------------

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        """The encoder: input_ids [B, S] (int) -> last hidden states [B, S, H].

        attention_mask [B, S]: 1 (or True) for tokens to attend to, 0 for padding; None = all
        tokens. token_type_ids [B, S] (segment A = 0, B = 1; default zeros); position_ids [B, S]
        or [S] (default 0..S-1)."""
        ids = self._check_ids("input_ids", input_ids)
        b, s = ids.shape
        if s > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {s} positions but max_position_embeddings is "
                             f"{self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(ids)
        else:
            token_type_ids = self._check_ids("token_type_ids", token_type_ids, (b, s))
        if position_ids is None:
            position_ids = torch.arange(s, device=ids.device).unsqueeze(0)       # [1, S]
        else:
            position_ids = position_ids.view(-1, s)
        mask = self._padding_mask(attention_mask, b, s, ids.device)
        x = self.embeddings(ids, token_type_ids, position_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def pool(self, hidden: Tensor) -> Tensor:
        """tanh(W_p h_0 + b_p): the first ([CLS]) token's hidden state [B, H] through the pooler."""
        return torch.tanh(F.linear(hidden[:, 0], self.pooler.weight, self.pooler.bias))

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Masked-LM logits [..., V] of hidden states [..., H]: LayerNorm(act(h W_t^T + b_t)) E^T + bias,
        E the word embeddings (tied)."""
        t = F.linear(hidden, self.mlm_transform.weight, self.mlm_transform.bias, self.mlm_transform.activation)
        t = F.layer_norm(t, self.mlm_norm.normalized_shape, self.mlm_norm.weight, self.mlm_norm.bias,
                         self.mlm_norm.eps)
        return F.linear(t, self.embeddings.word.weight, self.mlm_bias)

    def classify(self, pooled: Tensor) -> Tensor:
        """Classification logits [B, num_labels] of the pooled output [B, H] (dropout, linear)."""
        p = self.config.classifier_dropout
        p = self.config.hidden_dropout_prob if p is None else p
        pooled = torch.nn.functional.dropout(pooled, p, self.training)
        return F.linear(pooled, self.classifier.weight, self.classifier.bias)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, head: str = "mlm") -> BertOutput:
        """Runs the encoder and one head.

        head="mlm": logits [B, S, V]; labels [B, S] with -100 at the positions not to predict
            (the masked-LM loss: mean cross-entropy over the other positions).
        head="classification": logits [B, num_labels]; labels [B]: class ids (cross-entropy) or,
            with num_labels == 1, regression targets (mean squared error); float labels [B,
            num_labels] with num_labels > 1 are multi-label targets (binary cross-entropy).
        head="pooled": the pooler output only; head="none": the hidden states only.
        """
        if head not in ("mlm", "classification", "pooled", "none"):
            raise ValueError(f"head must be 'mlm', 'classification', 'pooled' or 'none', got {head!r}")
        if labels is not None and head not in ("mlm", "classification"):
            raise ValueError(f"labels need head='mlm' or head='classification', got head={head!r}")
        hidden = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        out = BertOutput(hidden)
        if head == "mlm":
            out.logits = self.mlm_logits(hidden)
            if labels is not None:
                out.loss = masked_lm_loss(out.logits, labels)
        elif head in ("classification", "pooled"):
            out.pooler_output = self.pool(hidden)
            if head == "classification":
                out.logits = self.classify(out.pooler_output)
                if labels is not None:
                    out.loss = classification_loss(out.logits, labels)
        return out

    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _check_ids(name: str, ids: Tensor, shape: Optional[tuple] = None) -> Tensor:
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32/int64 tensor, got "
                            f"{ids.dtype if isinstance(ids, Tensor) else type(ids).__name__}")
        if ids.dim() != 2:
            raise ValueError(f"{name} must have shape [batch, seq], got {tuple(ids.shape)}")
        if shape is not None and tuple(ids.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(ids.shape)}")
        return ids

    @staticmethod
    def _padding_mask(attention_mask: Optional[Tensor], b: int, s: int, device) -> Optional[Tensor]:
        """[B, S] 1/0 -> bool [B, 1, 1, S] (a view: attention reads it in place, never expanded to
        [B, heads, S, S]); None when every token of a CPU batch is attended (the kernels then skip
        the mask)."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (b, s):
            raise ValueError(f"attention_mask must be a tensor of shape ({b}, {s}), got "
                             f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else attention_mask}")
        keep = attention_mask.to(device=device, dtype=torch.bool) if attention_mask.dtype != torch.bool \
            else attention_mask.to(device)
        if keep.device.type == "cpu" and bool(keep.all()):  # (on a GPU this check would cost a sync)
            return None
        return keep.view(b, 1, 1, s)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -----------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, model_or_dir, num_labels: Optional[int] = None) -> "BERT":
        """A BERT with the weights of a transformers BertModel / BertForMaskedLM /
        BertForSequenceClassification (or BertForPreTraining) object, or of a local folder saved
        by save_pretrained (config.json + model.safetensors, a sharded safetensors index, or
        pytorch_model.bin). Nothing is downloaded. Heads the checkpoint lacks (the classifier of
        a BertForMaskedLM, the MLM head of a BertModel) keep a fresh initialization, as for
        fine-tuning. The model comes back in eval mode, on the CPU, in float32."""
        from engine.models import hf
        return hf.bert_from_hf(model_or_dir, num_labels=num_labels)


def masked_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy (fp32) of logits [B, S, V] against labels [B, S] over the positions whose
    label is not -100: engine.training's masked-LM loss (training.mask_tokens makes the labels)."""
    return training.masked_lm_loss(logits, labels)


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """transformers' rule: one label -> regression (MSE); integer labels -> cross-entropy; float
    labels with several classes -> multi-label binary cross-entropy. logits [B, num_labels]."""
    num_labels = logits.shape[-1]
    if num_labels == 1:
        return torch.nn.functional.mse_loss(logits.squeeze(-1).float(), labels.reshape(-1).float())
    if labels.dtype in (torch.int32, torch.int64):
        return torch.nn.functional.cross_entropy(logits.float(), labels.reshape(-1).long())
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
