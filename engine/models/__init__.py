"""Models built from one config dataclass each, on engine.functional / engine.nn."""
from engine.models.bert import BERT, BertConfig

__all__ = ["BERT", "BertConfig"]
