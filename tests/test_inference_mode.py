"""torch.inference_mode(): every op and model gives under it what it gives under torch.no_grad(),
on every backend that runs here, and returns inference tensors.

Serving code runs under inference mode, which is thread-local. The shapes keep the cpu backend's
worker threads busy: its linear GEMMs go parallel above 2^20 multiply-adds, in tiles taken from a
queue, and each tile here is long enough (256 x 256 x 256) that every thread takes one. A worker
outside the caller's inference mode cannot write into the caller's inference tensors, which made
linear and feed_forward raise "Inplace update to inference tensor outside InferenceMode". (At
64 x 128 -> 256 the caller's thread sometimes did every tile itself, and the bug hid.)"""
import pytest
import torch

import engine.functional as EF
from conftest import backend_device_pairs, skip_unless_runs
from engine import backends
from engine.models import BERT, GPT, BertConfig, GPTConfig
from engine.models.transformer import Transformer, TransformerConfig


def _inputs(device):
    """Rows 256, width 256, hidden 1024: four 256-column tiles of each product."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    return dict(x=rand(256, 256), residual=rand(256, 256), norm_weight=rand(256), norm_bias=rand(256),
                w1=rand(1024, 256) / 16, b1=rand(1024), w2=rand(256, 1024) / 32, b2=rand(256),
                q=rand(2, 4, 64, 32), k=rand(2, 2, 64, 32), v=rand(2, 2, 64, 32),
                mask=rand(2, 1, 64, 64), q1=rand(2, 4, 1, 32),
                lengths=torch.tensor([64, 40], dtype=torch.int32, device=device),
                rope=EF.rotary_cos_sin(64, 32, device=device),
                targets=torch.randint(0, 1024, (256,), generator=g).to(device))


OPS = {
    "layer_norm": lambda t, be: EF.layer_norm(t["x"], (256,), t["norm_weight"], t["norm_bias"], backend=be),
    "rms_norm": lambda t, be: EF.rms_norm(t["x"], (256,), t["norm_weight"], backend=be),
    "add_layer_norm": lambda t, be: EF.add_layer_norm(t["x"], t["residual"], (256,), t["norm_weight"],
                                                      t["norm_bias"], backend=be),
    "add_rms_norm": lambda t, be: EF.add_rms_norm(t["x"], t["residual"], (256,), t["norm_weight"], backend=be),
    "gelu": lambda t, be: EF.gelu(t["x"], backend=be),
    "linear": lambda t, be: EF.linear(t["x"], t["w1"], t["b1"], backend=be),
    "linear_gelu": lambda t, be: EF.linear(t["x"], t["w1"], t["b1"], activation="gelu", backend=be),
    "feed_forward": lambda t, be: EF.feed_forward(t["x"], t["w1"], t["b1"], t["w2"], t["b2"],
                                                  residual=t["residual"], backend=be),
    "sdpa_causal": lambda t, be: EF.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True,
                                                                 enable_gqa=True, backend=be),
    "sdpa_float_mask": lambda t, be: EF.scaled_dot_product_attention(t["q"], t["k"], t["v"], t["mask"],
                                                                     enable_gqa=True, backend=be),
    "decode": lambda t, be: EF.attention_with_kv_cache(t["q1"], t["k"], t["v"], t["lengths"], backend=be),
    "rotary_qk": lambda t, be: EF.rotary_qk(t["q"], t["k"], *t["rope"], backend=be),
    "linear_cross_entropy": lambda t, be: EF.linear_cross_entropy(t["x"], t["w1"], t["targets"], t["b1"],
                                                                  reduction="none", backend=be),
}


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("op", list(OPS))
def test_op_under_inference_mode(op, backend, device):
    skip_unless_runs(backend, device)
    tensors = _inputs(device)
    with torch.no_grad():
        expected = _outputs(OPS[op](tensors, backend))
    with torch.inference_mode():
        actual = _outputs(OPS[op](tensors, backend))
    for a, e in zip(actual, expected, strict=True):
        assert a.is_inference()
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def _gpt():
    return GPT(GPTConfig(vocab_size=101, block_size=128, n_layer=2, n_head=4, n_embd=256))


def _bert():
    return BERT(BertConfig(vocab_size=101, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=1024))


def _transformer():
    return Transformer(TransformerConfig(src_vocab_size=101, d_model=256, nhead=4, num_encoder_layers=1,
                                         num_decoder_layers=1, dim_feedforward=1024, dropout=0.0, max_len=64))


def _ids(*shape):
    return torch.randint(0, 101, shape, generator=torch.Generator().manual_seed(1))


MODELS = {
    "gpt": (_gpt, lambda m: m(_ids(4, 64))[0]),
    "gpt_generate": (_gpt, lambda m: m.generate(_ids(4, 64), max_new_tokens=4, top_k=1)),
    "bert": (_bert, lambda m: m(_ids(4, 64)).last_hidden_state),
    "transformer": (_transformer, lambda m: m(_ids(4, 64), _ids(4, 32))[0]),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_model_under_inference_mode(model):
    """On the cpu backend, whose worker threads the models' linear layers use at these widths
    (the other backends run the model code on the caller's thread)."""
    skip_unless_runs("cpu", "cpu")
    build, run = MODELS[model]
    torch.manual_seed(0)
    module = build().eval()
    with backends.use("cpu"):
        with torch.no_grad():
            expected = run(module)
        with torch.inference_mode():
            actual = run(module)
    assert actual.is_inference()
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
