"""Importing transformers checkpoints into engine models: from a transformers model object or a
local save_pretrained folder (safetensors or PyTorch weights); nothing is downloaded.

Sections: GPT-2 (engine.models.GPT) and BERT (engine.models.BERT), each self-contained.
"""
import json
import os

import torch


# =============================================================================================
# BERT (transformers' BertModel, BertForMaskedLM, BertForSequenceClassification, BertForPreTraining)
# -> engine.models.BERT. Everything in this section is prefixed `bert_` / `_bert_`.


def bert_from_hf(model_or_dir, num_labels=None):
    """engine.models.BERT with the weights of a transformers BERT object or a local folder
    (see BERT.from_hf). num_labels overrides the checkpoint's (a fresh classifier then)."""
    from engine.models.bert import BERT
    hf_config, state = _bert_read(model_or_dir)
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


def _bert_read(model_or_dir):
    """(config, state_dict) of a transformers model object (its config object, its tensors) or
    of a local folder (the config.json dict, the weights read from disk)."""
    if isinstance(model_or_dir, torch.nn.Module):
        if not hasattr(model_or_dir, "config"):
            raise TypeError(f"expected a transformers BERT model, got {type(model_or_dir).__name__} (no .config)")
        return model_or_dir.config, model_or_dir.state_dict()
    if not isinstance(model_or_dir, (str, os.PathLike)):
        raise TypeError(f"model_or_dir must be a transformers model or a local folder, got "
                        f"{type(model_or_dir).__name__}")
    folder = os.fspath(model_or_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a local folder (nothing is downloaded: pass a directory "
                                "written by save_pretrained, or a model object)")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    return config, _bert_read_weights(folder)


def _bert_read_weights(folder):
    """Every tensor of a save_pretrained folder: model.safetensors, its sharded index, or
    pytorch_model.bin (and its index), in that order of preference."""
    def load_one(path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(folder, single)):
            return load_one(os.path.join(folder, single))
        if os.path.isfile(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_one(os.path.join(folder, shard)))
            return state
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or their .index.json) in {folder!r}")
