"""Importing transformers checkpoints into engine models: from a transformers model object or a
local save_pretrained folder (safetensors or PyTorch weights); nothing is downloaded.

Sections: GPT-2 (engine.models.GPT), BERT (engine.models.BERT), and reading a checkpoint (shared).
"""
import json
import os

import torch


# =============================================================================================
# GPT-2 (transformers' GPT2LMHeadModel, GPT2Model) -> engine.models.GPT. Everything in this
# section is prefixed `gpt_` / `_gpt2_`.
#
# transformers' GPT-2 stores its linear layers as Conv1D, whose weight is [in, out] (x @ W + b);
# engine's Linear is torch's [out, in] (x @ W^T + b), so every Conv1D weight is transposed. The
# module names are the same (nanoGPT copied them), under "transformer." in GPT2LMHeadModel and at
# the top level in GPT2Model (and in the original OpenAI checkpoints).

# transformers' activation_function names -> the activation engine's linear epilogue fuses
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt_from_hf(model_or_dir, dtype=None):
    """engine.models.GPT with the weights of a transformers GPT-2 object or a local folder (see
    GPT.from_hf), in eval mode. dtype: None keeps the checkpoint's floating dtype."""
    from engine.models.gpt import GPT

    hf_config, state = _read_checkpoint(model_or_dir, "GPT-2")
    config = gpt_config_from_hf(hf_config)
    ours = gpt_state_dict_from_hf(state, config)
    if dtype is None:
        dtype = ours["transformer.wte.weight"].dtype
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    model = GPT(config)
    model.load_state_dict(ours, strict=True)
    return model.to(dtype).eval()


def gpt_config_from_hf(hf_config):
    """engine GPTConfig from a transformers GPT2Config object or a config.json dict. Raises
    ValueError for the GPT-2 variants engine's GPT does not implement (cross-attention, other
    attention scalings, untied embeddings, other activations)."""
    from engine.models.gpt import GPTConfig

    def get(name, default=None):
        if isinstance(hf_config, dict):
            return hf_config.get(name, default)
        return getattr(hf_config, name, default)

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


def gpt_state_dict_from_hf(state, config):
    """A transformers GPT-2 state_dict (keys with or without "transformer.") as engine GPT's
    state_dict: Conv1D weights [in, out] transposed to [out, in]; the causal-mask buffers of old
    checkpoints (attn.bias, attn.masked_bias) dropped; lm_head.weight = wte.weight (a checkpoint
    whose lm_head differs from wte is refused, since engine's GPT ties them)."""
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


# =============================================================================================
# BERT (transformers' BertModel, BertForMaskedLM, BertForSequenceClassification, BertForPreTraining)
# -> engine.models.BERT. Everything in this section is prefixed `bert_` / `_bert_`.


def bert_from_hf(model_or_dir, num_labels=None):
    """engine.models.BERT with the weights of a transformers BERT object or a local folder
    (see BERT.from_hf). num_labels overrides the checkpoint's (a fresh classifier then)."""
    from engine.models.bert import BERT
    hf_config, state = _read_checkpoint(model_or_dir, "BERT")
    config = bert_config_from_hf(hf_config)
    if num_labels is not None:
        config.num_labels = num_labels
    model = BERT(config)
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


def bert_config_from_hf(hf_config):
    """engine BertConfig from a transformers BertConfig object or a config.json dict. Raises
    ValueError for what engine's BERT does not implement (decoder BERT, relative positions, a
    callable activation)."""
    from engine.models.bert import BertConfig

    def get(name, default=None):
        if isinstance(hf_config, dict):
            return hf_config.get(name, default)
        return getattr(hf_config, name, default)

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
    if isinstance(hf_config, dict):
        labels = hf_config.get("id2label")
        num_labels = hf_config.get("num_labels", len(labels) if labels else 2)
    else:
        num_labels = get("num_labels", 2)
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


def bert_state_dict_from_hf(state, config):
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


# =============================================================================================
# Reading a checkpoint, shared by both sections.

def _read_checkpoint(model_or_dir, family):
    """(config, state_dict) of a transformers `family` ("GPT-2", "BERT") model object (its config
    object and tensors) or of a local save_pretrained folder (the config.json dict and the
    weights read from disk)."""
    if isinstance(model_or_dir, torch.nn.Module):
        if not hasattr(model_or_dir, "config"):
            raise TypeError(f"expected a transformers {family} model, got {type(model_or_dir).__name__} (no .config)")
        return model_or_dir.config, model_or_dir.state_dict()
    if not isinstance(model_or_dir, (str, os.PathLike)):
        raise TypeError(f"model_or_dir must be a transformers model or a local folder, got "
                        f"{type(model_or_dir).__name__}")
    folder = os.fspath(model_or_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a local folder (nothing is downloaded: pass a directory "
                                "written by save_pretrained, or a model object)")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {folder!r}")
    with open(config_path) as f:
        config = json.load(f)
    return config, _read_weights(folder)


def _read_weights(folder):
    """Every tensor of a save_pretrained folder: model.safetensors or its sharded index first,
    then pytorch_model.bin or its index (loaded with weights_only=True: tensors, no code)."""
    def load(path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(folder, single)):
            return load(os.path.join(folder, single))
        if os.path.isfile(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load(os.path.join(folder, shard)))
            return state
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or their .index.json) in {folder!r}")
