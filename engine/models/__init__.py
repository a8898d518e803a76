"""Models built from one config dataclass each, on engine.functional / engine.nn."""
from engine.models.bert import BERT, BertConfig
from engine.models.generate import generate
from engine.models.gpt import GPT, GPTConfig, KVCache
from engine.models.transformer import Transformer, TransformerConfig

__all__ = ["BERT", "BertConfig", "GPT", "GPTConfig", "KVCache", "generate", "Transformer", "TransformerConfig"]
