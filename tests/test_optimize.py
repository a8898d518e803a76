"""engine.optimize on a plain torch model, transformers' GPT-2 and transformers' BERT (tiny random
configs): the same outputs in eval mode, the very same Parameter objects, the engine paths really
taken, and a summary that lists the swaps and the modules left alone with their reasons."""
import copy

import pytest
import torch

import engine
import engine.functional as EF
from engine.optimize import OptimizeSummary

transformers = pytest.importorskip("transformers")

ATOL = 2e-5


def parameters_by_name(model):
    return {name: p for name, p in model.named_parameters(remove_duplicate=False)}


def assert_same_parameters(before: dict, model) -> None:
    after = parameters_by_name(model)
    assert after.keys() == before.keys()
    for name, p in after.items():
        assert p is before[name], f"{name} is a new Parameter"
        assert p.data_ptr() == before[name].data_ptr()


def perturbed(model):
    """Every parameter random (norm weights and biases too), so a mis-wired one cannot hide."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts the calls of engine.functional.scaled_dot_product_attention (the engine path)."""
    calls = []
    original = EF.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(EF, "scaled_dot_product_attention", counting)
    return calls


# ---------------------------------------------------------------------------------------------
# torch.nn


class _DoubledLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2


class PlainTorchModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.act = torch.nn.GELU(approximate="tanh")
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.decoder_layer = torch.nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                                              norm_first=True, activation="gelu")
        self.rms = torch.nn.RMSNorm(32)
        self.custom = _DoubledLayerNorm(32)

    def forward(self, x, pad):
        h = self.act(self.norm(self.proj(x)))
        h = h + self.mha(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        memory = self.encoder(h, src_key_padding_mask=pad)
        return self.custom(self.rms(self.decoder_layer(h, memory, memory_key_padding_mask=pad)))


def test_plain_torch_model(attention_calls):
    torch.manual_seed(0)
    model = perturbed(PlainTorchModel())
    reference = copy.deepcopy(model)
    before = parameters_by_name(model)
    summary = engine.optimize(model)

    assert isinstance(summary, OptimizeSummary)
    assert_same_parameters(before, model)
    assert type(model.norm) is engine.nn.LayerNorm and type(model.act) is engine.nn.GELU
    assert type(model.mha) is engine.nn.MultiheadAttention and type(model.rms) is engine.nn.RMSNorm
    assert type(model.encoder) is engine.nn.TransformerEncoder
    assert all(type(layer) is engine.nn.TransformerEncoderLayer for layer in model.encoder.layers)
    assert type(model.decoder_layer) is engine.nn.TransformerDecoderLayer
    assert type(model.custom) is _DoubledLayerNorm
    assert summary.counts() == {
        "LayerNorm -> engine.nn.LayerNorm": 1, "GELU -> engine.nn.GELU": 1,
        "MultiheadAttention -> engine.nn.MultiheadAttention": 1,
        "TransformerEncoder -> engine.nn.TransformerEncoder": 1,
        "TransformerEncoderLayer -> engine.nn.TransformerEncoderLayer": 2,
        "TransformerDecoderLayer -> engine.nn.TransformerDecoderLayer": 1, "RMSNorm -> engine.nn.RMSNorm": 1}
    assert [(s.path, s.original) for s in summary.skipped] == [("custom", "_DoubledLayerNorm")]
    assert "own forward" in summary.skipped[0].reason
    text = str(summary)
    assert "replaced 8 module(s), left 1 alone" in text and "encoder.layers.0" in text and "custom" in text

    x = torch.randn(2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad():
        got, expected = model(x, pad), reference(x, pad)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    assert len(attention_calls) >= 5  # mha, 2 encoder layers, decoder self- and cross-attention

    # training still reaches the same Parameter objects (an optimizer built before keeps working)
    model.train()
    model(x, pad).sum().backward()
    assert before["mha.in_proj_weight"].grad is not None and before["norm.weight"].grad is not None

    again = engine.optimize(model)  # nothing left to swap, nothing swapped twice
    assert again.replaced == [] and [s.path for s in again.skipped] == ["custom"]


def test_root_module_and_errors():
    norm = torch.nn.LayerNorm(8)
    weight = norm.weight
    summary = engine.optimize(norm)
    assert type(norm) is engine.nn.LayerNorm and norm.weight is weight
    assert [r.path for r in summary.replaced] == [""] and "<root>" in str(summary)
    with pytest.raises(TypeError, match="nn.Module"):
        engine.optimize(lambda x: x)


def test_shared_module_stays_shared():
    norm = torch.nn.LayerNorm(8)
    model = torch.nn.Sequential(norm, torch.nn.ReLU(), norm)
    engine.optimize(model)
    assert model[0] is model[2] and type(model[0]) is engine.nn.LayerNorm


# ---------------------------------------------------------------------------------------------
# transformers' GPT-2


def gpt2(attn_implementation):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=32,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                     attn_implementation=attn_implementation)
    return perturbed(transformers.GPT2LMHeadModel(config))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_gpt2(attn_implementation, attention_calls):
    model = gpt2(attn_implementation)
    reference = copy.deepcopy(model)
    before = parameters_by_name(model)
    summary = engine.optimize(model)
    assert_same_parameters(before, model)
    assert summary.counts() == {"LayerNorm -> engine.nn.LayerNorm": 5,
                                "GPT2Attention -> engine.optimize.EngineGPT2Attention": 2,
                                "GPT2MLP -> engine.optimize.EngineGPT2MLP": 2}
    assert summary.skipped == []
    assert isinstance(model.transformer.h[0].attn, transformers.models.gpt2.modeling_gpt2.GPT2Attention)

    ids = torch.randint(3, 101, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as for generation
    with torch.no_grad():
        for m in (None, mask):
            got = model(input_ids=ids, attention_mask=m).logits
            expected = reference(input_ids=ids, attention_mask=m).logits
            keep = (m if m is not None else torch.ones_like(ids)).bool()
            torch.testing.assert_close(got[keep], expected[keep], atol=ATOL, rtol=1e-4)
        assert len(attention_calls) == 4
        # KV-cached greedy generation (transformers' DynamicCache, updated by the engine module)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, reference.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False))
        # attention weights: the original forward serves that call
        weights = model(input_ids=ids, output_attentions=True).attentions
        expected = reference(input_ids=ids, output_attentions=True).attentions
    assert len(weights) == len(expected)
    for w, e in zip(weights, expected):
        torch.testing.assert_close(w, e, atol=ATOL, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# transformers' BERT


def bert(cls, **overrides):
    torch.manual_seed(0)
    args = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=101)
    args.update(overrides)
    return perturbed(cls(transformers.BertConfig(**args)))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_bert(attn_implementation, attention_calls):
    model = bert(transformers.BertForMaskedLM, attn_implementation=attn_implementation)
    reference = copy.deepcopy(model)
    before = parameters_by_name(model)
    summary = engine.optimize(model)
    assert_same_parameters(before, model)
    assert summary.counts() == {
        "LayerNorm -> engine.nn.LayerNorm": 1,
        "BertSelfAttention -> engine.optimize.EngineBertSelfAttention": 2,
        "BertSelfOutput -> engine.optimize.EngineBertSelfOutput": 2,
        "BertIntermediate -> engine.optimize.EngineBertIntermediate": 2,
        "BertOutput -> engine.optimize.EngineBertOutput": 2,
        "BertPredictionHeadTransform -> engine.optimize.EngineBertPredictionHeadTransform": 1}
    ids = torch.randint(1, 101, (3, 11))
    types = torch.randint(0, 2, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        for m in (None, mask):
            got = model(input_ids=ids, attention_mask=m, token_type_ids=types)
            expected = reference(input_ids=ids, attention_mask=m, token_type_ids=types)
            torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=1e-4)
        assert len(attention_calls) == 4
        if attn_implementation == "eager":  # weights requested: transformers' own forward runs
            got = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
            expected = reference(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
            assert len(got) == 2
            torch.testing.assert_close(got[1], expected[1], atol=ATOL, rtol=1e-4)


def test_bert_model_leaves_what_it_cannot_serve():
    """An activation with no fused epilogue and an attention implementation the engine does not
    read are left to transformers, with the reason; the rest is swapped and outputs still match."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    AttentionInterface.register("test_custom_sdpa", sdpa_attention_forward)
    model = bert(transformers.BertModel, hidden_act="silu", attn_implementation="test_custom_sdpa")
    reference = copy.deepcopy(model)
    before = parameters_by_name(model)
    summary = engine.optimize(model)
    assert_same_parameters(before, model)
    skipped = {(s.path, s.original): s.reason for s in summary.skipped}
    assert set(skipped) == {(f"encoder.layer.{i}.{name}", cls) for i in range(2)
                            for name, cls in (("attention.self", "BertSelfAttention"),
                                              ("intermediate", "BertIntermediate"))}
    assert "test_custom_sdpa" in skipped[("encoder.layer.0.attention.self", "BertSelfAttention")]
    assert "SiLUActivation" in skipped[("encoder.layer.1.intermediate", "BertIntermediate")]
    assert summary.counts()["BertOutput -> engine.optimize.EngineBertOutput"] == 2
    assert "left alone" in str(summary) and "SiLUActivation" in str(summary)
    ids = torch.randint(1, 101, (2, 7))
    with torch.no_grad():
        got, expected = model(input_ids=ids), reference(input_ids=ids)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=ATOL, rtol=1e-4)


def _cache_of(output) -> dict:
    """The keyword that hands a model output's cache to the next call: `cache` in transformers'
    newer releases (5.24 here), `past_key_values` in older ones (5.17, the GPU image's)."""
    if hasattr(output, "cache"):
        return {"cache": output.cache}
    return {"past_key_values": output.past_key_values}


def test_gpt2_cross_attention_and_its_cache():
    """GPT-2 with cross-attention (add_cross_attention): the swapped cross-attention attends the
    encoder states under their padding mask, and on the next step reuses the keys/values it
    stored in transformers' EncoderDecoderCache."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=32,
                                     add_cross_attention=True, bos_token_id=1, eos_token_id=2)
    model = perturbed(transformers.GPT2LMHeadModel(config))
    reference = copy.deepcopy(model)
    summary = engine.optimize(model)
    assert summary.counts()["GPT2Attention -> engine.optimize.EngineGPT2Attention"] == 4
    ids = torch.randint(3, 101, (2, 6))
    encoder_states = torch.randn(2, 9, 64)
    encoder_mask = torch.ones(2, 9, dtype=torch.long)
    encoder_mask[1, 5:] = 0
    step = torch.randint(3, 101, (2, 1))
    outputs = []
    with torch.no_grad():
        for m in (model, reference):
            first = m(input_ids=ids, encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask,
                      use_cache=True)
            second = m(input_ids=step, encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask,
                       **_cache_of(first), use_cache=True)
            outputs.append((first.logits, second.logits))
    for got, expected in zip(*outputs):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
