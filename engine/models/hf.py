"""Reading transformers checkpoints: the config and the weights of a transformers model object or
of a local save_pretrained folder (safetensors or PyTorch weights, sharded or not); nothing is
downloaded. What the weights mean is the business of the model that imports them: GPT.from_hf
(engine/models/gpt.py) and BERT.from_hf (engine/models/bert.py) map them onto their own config
and state_dict.
"""
import json
import os

import torch


def read_checkpoint(model_or_dir, family: str) -> tuple[dict, dict]:
    """(config, state_dict) of a transformers `family` ("GPT-2", "BERT") model object or of a
    local save_pretrained folder. The config comes as a dict of config.json's fields either way
    (a model object's config through its to_dict)."""
    if isinstance(model_or_dir, torch.nn.Module):
        if not hasattr(model_or_dir, "config"):
            raise TypeError(f"expected a transformers {family} model, got {type(model_or_dir).__name__} (no .config)")
        return model_or_dir.config.to_dict(), model_or_dir.state_dict()
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
    config = _read_file(config_path, _read_json)
    return config, _read_weights(folder)


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read; the message names the file."""


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _read_file(path: str, read):
    """read(path), with any failure to parse the file reported as a CheckpointError naming it."""
    try:
        return read(path)
    except Exception as error:  # json, safetensors and torch.load each raise their own kinds
        raise CheckpointError(f"cannot read {path}: {type(error).__name__}: {error}") from error


def _read_weights(folder: str) -> dict:
    """Every tensor of a save_pretrained folder: model.safetensors or its sharded index first,
    then pytorch_model.bin or its index (loaded with weights_only=True: tensors, no code)."""
    def load(path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return _read_file(path, lambda p: load_file(p, device="cpu"))
        return _read_file(path, lambda p: torch.load(p, map_location="cpu", weights_only=True))

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(folder, single)):
            return load(os.path.join(folder, single))
        if os.path.isfile(os.path.join(folder, index)):
            weight_map = _read_file(os.path.join(folder, index), lambda p: _read_json(p)["weight_map"])
            shards = sorted(set(weight_map.values()))
            state = {}
            for shard in shards:
                state.update(load(os.path.join(folder, shard)))
            return state
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or their .index.json) in {folder!r}")
