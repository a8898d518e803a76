"""BERT: the encoder-only, post-LN transformer, with a masked-LM head and a sequence-classification
head, built on engine.nn modules and engine.functional ops (so it runs the fused kernels where they
serve and the reference backend elsewhere).

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
import torch.nn.functional as F
from torch import Tensor

import engine.functional as EF
from engine import _validate
from engine import nn as enn
from engine import training
from engine.models import hf

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
        x, _ = EF.add_layer_norm(words, rest, self.norm.normalized_shape, self.norm.weight, self.norm.bias,
                                 self.norm.eps)
        return F.dropout(x, self.dropout, self.training)


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
        qkv = self.qkv(x)                                                        # [B, S, 3H]
        # [B, S, 3, heads, d] -> three [B, heads, S, d] strided views (no copy: attention reads strides)
        q, k, v = qkv.view(b, s, 3, heads, h // heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = EF.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                            dropout_p=self.attention_dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(b, s, h)                                   # [B, S, H]
        a = self._dropout(self.attn_out(a))
        x, _ = EF.add_layer_norm(a, x, (h,), self.attn_norm.weight, self.attn_norm.bias, self.attn_norm.eps)
        f = self._dropout(self.ffn(x))
        x, _ = EF.add_layer_norm(f, x, (h,), self.ffn_norm.weight, self.ffn_norm.bias, self.ffn_norm.eps)
        return x

    def _dropout(self, t: Tensor) -> Tensor:
        # BERT drops out the sublayer's output (after the second product), which is not where
        # feed_forward's fused dropout sits (the hidden activation), so it is a separate step
        return F.dropout(t, self.hidden_dropout, self.training) if self.hidden_dropout else t


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
        _validate.ids_in_range("input_ids", ids, self.config.vocab_size, "vocab_size")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(ids)
        else:
            token_type_ids = self._check_ids("token_type_ids", token_type_ids, (b, s))
            _validate.ids_in_range("token_type_ids", token_type_ids, self.config.type_vocab_size, "type_vocab_size")
        if position_ids is None:
            position_ids = torch.arange(s, device=ids.device).unsqueeze(0)       # [1, S]
        else:
            position_ids = position_ids.view(-1, s)
            _validate.ids_in_range("position_ids", position_ids, self.config.max_position_embeddings,
                                   "max_position_embeddings")
        mask = self._padding_mask(attention_mask, b, s, ids.device)
        x = self.embeddings(ids, token_type_ids, position_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def pool(self, hidden: Tensor) -> Tensor:
        """tanh(W_p h_0 + b_p): the first ([CLS]) token's hidden state [B, H] through the pooler."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Masked-LM logits [..., V] of hidden states [..., H]: LayerNorm(act(h W_t^T + b_t)) E^T + bias,
        E the word embeddings (tied)."""
        t = self.mlm_norm(self.mlm_transform(hidden))
        return EF.linear(t, self.embeddings.word.weight, self.mlm_bias)

    def classify(self, pooled: Tensor) -> Tensor:
        """Classification logits [B, num_labels] of the pooled output [B, H] (dropout, linear)."""
        p = self.config.classifier_dropout
        p = self.config.hidden_dropout_prob if p is None else p
        return self.classifier(F.dropout(pooled, p, self.training))

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
        fine-tuning. The model comes back in eval mode, on the CPU, in float32. num_labels
        overrides the checkpoint's (the classifier then starts fresh)."""
        hf_config, state = hf.read_checkpoint(model_or_dir, "BERT")
        config = bert_config_from_hf(hf_config)
        if num_labels is not None:
            config.num_labels = num_labels
        model = cls(config)
        ours = bert_state_dict_from_hf(state, config)
        if num_labels is not None and ours.get("classifier.weight") is not None \
                and ours["classifier.weight"].shape[0] != num_labels:
            ours.pop("classifier.weight")
            ours.pop("classifier.bias", None)
        missing, unexpected = model.load_state_dict(ours, strict=False)
        assert not unexpected, f"internal error: unmapped keys {unexpected}"
        # what may be missing: a head the checkpoint does not have (it keeps its initialization)
        heads = ("pooler.", "classifier.", "mlm_transform.", "mlm_norm.", "mlm_bias")
        body = [k for k in missing if not k.startswith(heads)]
        if body:
            raise ValueError(f"the checkpoint lacks BERT encoder weights: {body[:6]}{' ...' if len(body) > 6 else ''}")
        return model.float().eval()


def masked_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy (fp32) of logits [B, S, V] against labels [B, S] over the positions whose
    label is not -100: engine.training's masked-LM loss (training.mask_tokens makes the labels)."""
    return training.masked_lm_loss(logits, labels)


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """transformers' rule: one label -> regression (MSE); integer labels -> cross-entropy; float
    labels with several classes -> multi-label binary cross-entropy. logits [B, num_labels]."""
    num_labels = logits.shape[-1]
    if num_labels == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.reshape(-1).float())
    if labels.dtype in (torch.int32, torch.int64):
        return F.cross_entropy(logits.float(), labels.reshape(-1).long())
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


# ---------------------------------------------------------------------------------------------
# transformers' BERT checkpoints (BertModel, BertForMaskedLM, BertForSequenceClassification,
# BertForPreTraining) as BERT's config and state_dict; engine/models/hf.py reads them.


def bert_config_from_hf(hf_config: dict) -> BertConfig:
    """BertConfig from a transformers BertConfig as a dict (config.json's fields). Raises
    ValueError for what engine's BERT does not implement (decoder BERT, relative positions, a
    callable activation)."""
    get = hf_config.get
    model_type = get("model_type", "bert")
    if model_type not in ("bert", None):
        raise ValueError(f"expected a BERT checkpoint (model_type 'bert'), got model_type {model_type!r}")
    if get("is_decoder", False) or get("add_cross_attention", False):
        raise ValueError("decoder BERT (is_decoder / add_cross_attention) is not supported: engine's BERT is "
                         "an encoder")
    if get("position_embedding_type", "absolute") not in ("absolute", None):
        raise ValueError(f"position_embedding_type {get('position_embedding_type')!r} is not supported "
                         "(absolute positions only)")
    act = get("hidden_act", "gelu")
    if not isinstance(act, str):
        raise ValueError(f"hidden_act must be a name, got {act!r}")
    labels = get("id2label")
    num_labels = get("num_labels", len(labels) if labels else 2)
    return BertConfig(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=get("num_attention_heads"), intermediate_size=get("intermediate_size"),
        hidden_act=act, hidden_dropout_prob=get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=get("attention_probs_dropout_prob", 0.1),
        max_position_embeddings=get("max_position_embeddings", 512), type_vocab_size=get("type_vocab_size", 2),
        layer_norm_eps=get("layer_norm_eps", 1e-12),
        pad_token_id=get("pad_token_id", 0) if get("pad_token_id", 0) is not None else 0,
        num_labels=num_labels, initializer_range=get("initializer_range", 0.02),
        classifier_dropout=get("classifier_dropout", None))


def bert_state_dict_from_hf(state: dict, config: BertConfig) -> dict:
    """Renames (and, for q/k/v, concatenates) a transformers BERT state_dict into engine BERT's
    keys. Accepts the keys with or without the "bert." prefix and the old "gamma"/"beta" names of
    the layer norms. Returns a dict that may lack the heads the checkpoint does not have."""
    src = {}
    for key, value in state.items():
        key = key[len("bert."):] if key.startswith("bert.") else key
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        src[key] = value
    out = {}

    def take(dst, key, required=True):
        if key in src:
            out[dst] = src[key]
        elif required:
            raise ValueError(f"the checkpoint has no {key!r}")

    take("embeddings.word.weight", "embeddings.word_embeddings.weight")
    take("embeddings.position.weight", "embeddings.position_embeddings.weight")
    take("embeddings.token_type.weight", "embeddings.token_type_embeddings.weight")
    take("embeddings.norm.weight", "embeddings.LayerNorm.weight")
    take("embeddings.norm.bias", "embeddings.LayerNorm.bias")
    for i in range(config.num_hidden_layers):
        p, q = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            # q, k and v stacked into one [3H, H] product (rows [q; k; v]), as BertLayer splits it
            parts = [p + f"attention.self.{name}.{kind}" for name in ("query", "key", "value")]
            missing = [k for k in parts if k not in src]
            if missing:
                raise ValueError(f"the checkpoint has no {missing[0]!r}")
            out[q + f"qkv.{kind}"] = torch.cat([src[k] for k in parts], 0)
            take(q + f"attn_out.{kind}", p + f"attention.output.dense.{kind}")
            take(q + f"attn_norm.{kind}", p + f"attention.output.LayerNorm.{kind}")
            take(q + f"ffn.linear1.{kind}", p + f"intermediate.dense.{kind}")
            take(q + f"ffn.linear2.{kind}", p + f"output.dense.{kind}")
            take(q + f"ffn_norm.{kind}", p + f"output.LayerNorm.{kind}")
    for kind in ("weight", "bias"):
        take(f"pooler.{kind}", f"pooler.dense.{kind}", required=False)
        take(f"classifier.{kind}", f"classifier.{kind}", required=False)
        take(f"mlm_transform.{kind}", f"cls.predictions.transform.dense.{kind}", required=False)
        take(f"mlm_norm.{kind}", f"cls.predictions.transform.LayerNorm.{kind}", required=False)
    take("mlm_bias", "cls.predictions.bias", required=False)
    if "mlm_bias" not in out:  # tied to the decoder's bias; a checkpoint may keep only that name
        take("mlm_bias", "cls.predictions.decoder.bias", required=False)
    decoder = src.get("cls.predictions.decoder.weight")
    if decoder is not None and not torch.equal(decoder, out["embeddings.word.weight"]):
        raise ValueError("the checkpoint's MLM decoder weight differs from the word embeddings; engine's BERT "
                         "ties them (tie_word_embeddings=False is not supported)")
    return out
