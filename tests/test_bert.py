"""engine.models.BERT against transformers' BERT: the same weights give the same hidden states,
pooler output, masked-LM logits, classification logits and losses (fp32, eval), with and without
padding, imported from a model object or from a local folder in both weight formats. Tiny random
configs built here; nothing is downloaded."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.models import BERT, BertConfig  # noqa: E402
from engine.models.bert import bert_config_from_hf, bert_state_dict_from_hf, masked_lm_loss  # noqa: E402

VOCAB, SEQ, BATCH = 101, 13, 3
ATOL = 2e-5  # fp32 hidden states of O(1); two different fp32 summation orders


def hf_config(**overrides):
    args = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB,
                num_labels=3)
    args.update(overrides)
    return transformers.BertConfig(**args)


def random_hf(cls, config=None, seed=0):
    """A transformers BERT with every parameter random (biases and norm weights too, so that a
    mis-mapped bias or norm cannot hide behind transformers' zeros/ones initialization)."""
    torch.manual_seed(seed)
    model = cls(config or hf_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    types = torch.randint(0, 2, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 9:] = 0   # right padding of different lengths
    mask[2, 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, types, mask


HEADS = {"BertModel": "pooled", "BertForMaskedLM": "mlm", "BertForSequenceClassification": "classification"}


@pytest.mark.parametrize("cls_name", list(HEADS))
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padding-mask"])
def test_matches_transformers(cls_name, padded):
    hf = random_hf(getattr(transformers, cls_name))
    ours = BERT.from_hf(hf)
    assert not ours.training
    ids, types, mask = inputs()
    mask = mask if padded else None
    head = HEADS[cls_name]
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        got = ours(ids, attention_mask=mask, token_type_ids=types, head=head)
    torch.testing.assert_close(got.last_hidden_state, expected.hidden_states[-1], atol=ATOL, rtol=1e-4)
    if head == "pooled":
        torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=ATOL, rtol=1e-4)
    else:
        torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=1e-4)


def test_forward_hooks_on_ffn_fire():
    """Each layer calls its ffn module, so forward hooks on it see every pass (eval and training),
    and what a hook returns replaces the module's output."""
    model = BERT(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=16))
    ids = torch.randint(0, VOCAB, (2, 5))
    seen = []
    for i, layer in enumerate(model.layers):
        layer.ffn.register_forward_hook(lambda module, args, out, i=i: seen.append((i, tuple(out.shape))))
    for training in (False, True):
        model.train(training)
        model(ids, head="none")
        assert seen == [(0, (2, 5, 32)), (1, (2, 5, 32))]
        seen.clear()
    model.eval()
    with torch.no_grad():
        base = model(ids, head="none").last_hidden_state
        handle = model.layers[1].ffn.register_forward_hook(lambda module, args, out: out * 0)
        changed = model(ids, head="none").last_hidden_state
    handle.remove()
    assert not torch.allclose(base, changed)


def test_losses_match_transformers():
    ids, types, mask = inputs()
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    labels[0, 5] = 7
    mlm = random_hf(transformers.BertForMaskedLM)
    ours = BERT.from_hf(mlm)
    with torch.no_grad():
        expected = mlm(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
        got = ours(ids, mask, types, labels=labels).loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked_lm_loss(ours(ids, mask, types).logits, labels), got)

    cls = random_hf(transformers.BertForSequenceClassification)
    ours = BERT.from_hf(cls)
    y = torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = cls(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=y).loss
        got = ours(ids, mask, types, labels=y, head="classification").loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights", ["safetensors", "pytorch_model.bin"])
def test_from_local_folder(tmp_path, weights):
    hf = random_hf(transformers.BertForMaskedLM)
    if weights == "safetensors":
        hf.save_pretrained(tmp_path)                      # transformers 5 writes model.safetensors
        assert (tmp_path / "model.safetensors").exists()
    else:
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = BERT.from_hf(tmp_path)
    ids, types, mask = inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, mask, types).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_from_folder_of_a_classifier_keeps_its_labels(tmp_path):
    hf = random_hf(transformers.BertForSequenceClassification, hf_config(num_labels=5))
    hf.save_pretrained(tmp_path)
    ours = BERT.from_hf(str(tmp_path))
    assert ours.config.num_labels == 5
    ids, types, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask, types, head="classification").logits,
                                   hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits,
                                   atol=ATOL, rtol=1e-4)
    # a new label count gives a fresh classifier (fine-tuning a checkpoint for another task)
    assert BERT.from_hf(tmp_path, num_labels=2).classifier.weight.shape == (2, 64)


def test_padding_does_not_leak():
    """The padded positions' tokens do not change the real tokens' outputs."""
    torch.manual_seed(0)
    model = BERT(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64)).eval()
    ids, types, mask = inputs()
    other = ids.clone()
    other[mask == 0] = 17
    with torch.no_grad():
        a = model(ids, mask, types, head="none").last_hidden_state
        b = model(other, mask, types, head="none").last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-6, rtol=0)
    assert (a[~keep] - b[~keep]).abs().max() > 1e-3  # the padded rows themselves do change


def test_mlm_decoder_is_tied_and_training_step_lowers_the_loss():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BERT(cfg)
    names = {n for n, _ in model.named_parameters()}
    assert not any("decoder" in n for n in names)  # the decoder is the word embedding matrix
    ids, types, mask = inputs()
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.3, ids, -100)
    labels[0, 0] = ids[0, 0]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, mask, types, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model.embeddings.word.weight.grad is not None
    assert model.layers[0].qkv.weight.grad.abs().sum() > 0
    assert losses[-1] < losses[0] - 0.5, losses


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = BERT(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3))
    ids, types, mask = inputs()
    with torch.no_grad():
        train_a = model(ids, mask, types, head="none").last_hidden_state
        train_b = model(ids, mask, types, head="none").last_hidden_state
        model.eval()
        eval_a = model(ids, mask, types, head="none").last_hidden_state
        eval_b = model(ids, mask, types, head="none").last_hidden_state
    assert not torch.allclose(train_a, train_b)
    torch.testing.assert_close(eval_a, eval_b, atol=0, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="swish")
    model = BERT(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=16)).eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="token_type_ids"):
        model(ids, token_type_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="head"):
        model(ids, head="qa")
    with pytest.raises(ValueError, match=rf"input_ids holds {VOCAB}, outside \[0, {VOCAB - 1}\]"):
        model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(ValueError, match=r"token_type_ids holds 2, outside \[0, 1\] \(type_vocab_size = 2\)"):
        model(ids, token_type_ids=torch.full((2, 5), 2))
    with pytest.raises(ValueError, match="position_ids holds 16, outside"):
        model(ids, position_ids=torch.tensor([0, 1, 2, 3, 16]))


def test_from_hf_rejects_what_it_cannot_import(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        BERT.from_hf(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps(hf_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        BERT.from_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors"):
        BERT.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{ truncated")
    with pytest.raises(ValueError, match=r"cannot read .*config\.json"):
        BERT.from_hf(tmp_path)
    with pytest.raises(ValueError, match="decoder"):
        BERT.from_hf(transformers.BertModel(hf_config(is_decoder=True)))
    untied = random_hf(transformers.BertForMaskedLM)
    state = untied.state_dict()
    state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1.0
    with pytest.raises(ValueError, match="tie"):
        bert_state_dict_from_hf(state, bert_config_from_hf(untied.config.to_dict()))
