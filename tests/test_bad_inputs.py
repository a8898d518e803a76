"""The bad-input catalogue of the modules and models: each bad call raises the expected error class
(ValueError for a wrong value or shape, TypeError for a wrong type or dtype) with a message that
names the argument and what would be valid, before any kernel runs. The functional API's
catalogues sit with their ops (_bad_calls in tests/test_attention.py, test_linear.py,
test_layer_norm.py and test_rotary.py)."""
import pytest
import torch

import engine.nn as enn
from engine.models import BERT, GPT, BertConfig, GPTConfig


def _gpt():
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))


def _bert(**overrides):
    args = dict(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    return BERT(BertConfig(**{**args, **overrides}))


def _mha():
    return enn.MultiheadAttention(16, 4, batch_first=True)


def _tokens(*shape):
    return torch.ones(*shape, dtype=torch.long)


x16 = torch.randn(2, 5, 16)

# (case id, error class, words the message must contain, the call)
CATALOGUE = [
    ("LayerNorm-width", ValueError, ["normalized_shape (16,)", "(2, 8)"], lambda: enn.LayerNorm(16)(torch.randn(2, 8))),
    ("LayerNorm-int-input", TypeError, ["input", "float16, bfloat16, float32, float64", "int64"],
     lambda: enn.LayerNorm(8)(torch.ones(2, 8, dtype=torch.long))),
    ("LayerNorm-dtypes-differ", TypeError, ["weight", "float32", "float16"],
     lambda: enn.LayerNorm(8)(torch.randn(2, 8).half())),
    ("RMSNorm-width", ValueError, ["normalized_shape (16,)"], lambda: enn.RMSNorm(16)(torch.randn(2, 8))),
    ("Linear-in-features", ValueError, ["16 input features", "input has 8"], lambda: enn.Linear(16, 4)(torch.randn(2, 8))),
    ("Linear-scalar", ValueError, ["input", "at least 1 dim"], lambda: enn.Linear(16, 4)(torch.tensor(1.0))),
    ("Linear-dtypes-differ", TypeError, ["weight", "float32", "float64"], lambda: enn.Linear(8, 4)(torch.randn(2, 8).double())),
    ("GELU-approximate", ValueError, ["approximate", "'none', 'tanh'", "'fast'"],
     lambda: enn.GELU(approximate="fast")(torch.randn(3))),
    ("FeedForward-width", ValueError, ["w1", "16 input features", "input has 8"],
     lambda: enn.FeedForward(16, 32)(torch.randn(2, 8))),
    ("MultiheadAttention-embed", ValueError, ["query", "16 features"],
     lambda: _mha()(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8))),
    ("MultiheadAttention-heads", ValueError, ["embed_dim (16)", "num_heads (5)"], lambda: enn.MultiheadAttention(16, 5)),
    ("MultiheadAttention-attn_mask", ValueError, ["attn_mask", "(5, 5)", "(3, 3)"],
     lambda: _mha()(x16, x16, x16, attn_mask=torch.ones(3, 3, dtype=torch.bool))),
    ("MultiheadAttention-key_padding_mask", ValueError, ["key_padding_mask", "(2, 5)", "(2, 4)"],
     lambda: _mha()(x16, x16, x16, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))),
    ("TransformerEncoderLayer-width", ValueError, ["16 features"],
     lambda: enn.TransformerEncoderLayer(16, 4, batch_first=True)(torch.randn(2, 5, 8))),
    ("TransformerEncoderLayer-activation", ValueError, ["activation", "'swish'"],
     lambda: enn.TransformerEncoderLayer(16, 4, activation="swish")),
    ("GPT-float-ids", TypeError, ["idx", "int64/int32", "float32"], lambda: _gpt()(torch.randn(1, 4))),
    ("GPT-1d-ids", TypeError, ["idx", "[B, S]", "(2,)"], lambda: _gpt()(torch.tensor([1, 2]))),
    ("GPT-too-long", ValueError, ["sequence length 9", "block_size 8"], lambda: _gpt()(_tokens(1, 9))),
    ("GPT-ids-outside-vocabulary", ValueError, ["11", "[0, 10]"], lambda: _gpt()(torch.full((1, 3), 11))),
    ("GPT-attention_mask", ValueError, ["attention_mask", "(2, 4)", "(2, 3)"],
     lambda: _gpt()(_tokens(2, 4), attention_mask=torch.ones(2, 3))),
    ("GPT-generate-max_new_tokens", ValueError, ["max_new_tokens", ">= 0", "-1"],
     lambda: _gpt().generate(_tokens(1, 3), -1)),
    ("GPT-generate-top_p", ValueError, ["top_p", "(0, 1]", "2.0"], lambda: _gpt().generate(_tokens(1, 3), 2, top_p=2.0)),
    ("GPT-generate-temperature", ValueError, ["temperature", ">= 0"],
     lambda: _gpt().generate(_tokens(1, 3), 2, temperature=-1.0)),
    ("BERT-attention_mask", ValueError, ["attention_mask", "(2, 4)", "(2, 3)"],
     lambda: _bert()(_tokens(2, 4), attention_mask=torch.ones(2, 3))),
    ("BERT-too-long", ValueError, ["5 positions", "max_position_embeddings is 4"],
     lambda: _bert(max_position_embeddings=4)(_tokens(1, 5))),
]


@pytest.mark.parametrize("error,words,call", [case[1:] for case in CATALOGUE], ids=[case[0] for case in CATALOGUE])
def test_bad_input_is_named(error, words, call):
    with pytest.raises(error) as raised:
        call()
    message = str(raised.value)
    missing = [w for w in words if w not in message]
    assert not missing, f"the message lacks {missing}: {message}"
