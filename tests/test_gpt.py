"""engine.models.GPT: its structure (nanoGPT's names, tied embeddings), its loss, and parity with
transformers' GPT-2 (fp32, eval): the same weights give the same logits and hidden states, with
and without a padding mask, imported from model objects and from local folders in both weight
formats. Tiny random configs built here; nothing is downloaded."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine import backends  # noqa: E402
from engine.models import GPT, GPTConfig  # noqa: E402
from engine.training import IGNORE_INDEX, next_token_targets  # noqa: E402
from common import TINY_GPT_CONFIG, tiny_gpt  # noqa: E402

VOCAB, SEQ, BATCH = TINY_GPT_CONFIG["vocab_size"], 11, 3
ATOL = 2e-5  # fp32 activations of O(1) through two blocks: two different summation orders


def hf_config(**overrides):
    args = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
    args.update(overrides)
    return transformers.GPT2Config(**args)


def random_hf(cls=None, config=None, seed=0):
    """A transformers GPT-2 whose every parameter is random (biases and norm weights too, so that a
    mis-mapped bias or norm cannot hide behind transformers' zeros/ones initialization)."""
    torch.manual_seed(seed)
    model = (cls or transformers.GPT2LMHeadModel)(config or hf_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def inputs(seed=1):
    """ids [B, S]; a left-padding mask (prompts of 11, 7 and 4 tokens); the padded ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Structure


def test_module_names_are_nanogpts_and_embeddings_are_tied():
    model = tiny_gpt()
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.ln_f.bias", "lm_head.weight"}
    for i in range(2):
        for sub in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            expected |= {f"transformer.h.{i}.{sub}.weight", f"transformer.h.{i}.{sub}.bias"}
    assert names == expected
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.h[0].attn.c_attn.weight.shape == (96, 32)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (128, 32)


def test_no_bias_config_has_no_biases():
    model = tiny_gpt(bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    logits, loss = model(torch.randint(0, VOCAB, (2, 5)), torch.randint(0, VOCAB, (2, 5)))
    assert logits.shape == (2, 5, VOCAB) and torch.isfinite(loss)


@pytest.mark.parametrize("field, value", [("n_embd", 30), ("n_head", 0), ("dropout", 1.0), ("activation", "swish"),
                                          ("vocab_size", 2.5), ("n_inner", 0)])
def test_bad_config_raises(field, value):
    args = {**TINY_GPT_CONFIG, field: value}
    with pytest.raises(ValueError, match=field):
        GPTConfig(**args)


def test_bad_inputs_raise():
    model = tiny_gpt()
    with pytest.raises(TypeError, match="idx"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("token,bad", [(101, 101), (-3, -3)])
def test_token_ids_outside_the_vocabulary_are_named(token, bad):
    """torch's embedding says only 'index out of range in self' (or asserts on a GPU)."""
    model = tiny_gpt()
    ids = torch.tensor([[1, 2, token]])
    with pytest.raises(ValueError, match=rf"idx holds {bad}, outside \[0, 100\] \(vocab_size = 101\)"):
        model(ids)
    with pytest.raises(ValueError, match=rf"input_ids holds {bad}, outside \[0, 100\]"):
        model.generate(ids, 2)
    with pytest.raises(ValueError, match="position_ids holds 32, outside"):
        model(torch.tensor([[1, 2]]), position_ids=torch.tensor([0, 32]))


def test_forward_hooks_on_attn_and_mlp_fire_in_training_prefill_and_decode():
    """Each block calls its attn and mlp modules (never their internals), so forward hooks on them
    see every pass: training, and generation's prefill and decode steps, whose attention runs
    through a KV cache."""
    model = tiny_gpt(dropout=0.1)
    seen = []
    for i, block in enumerate(model.transformer.h):
        for name in ("attn", "mlp"):
            getattr(block, name).register_forward_hook(
                lambda module, args, out, key=f"{name}{i}": seen.append((key, tuple(out.shape))))
    ids = torch.randint(0, VOCAB, (2, 7))
    model.train()
    model(ids, next_token_targets(ids))[1].backward()
    assert seen == [(key, (2, 7, 32)) for key in ("attn0", "mlp0", "attn1", "mlp1")]
    seen.clear()
    model.generate(ids[:1, :5], 3, top_k=1)             # a prefill of 5 tokens, then 2 decode steps
    assert seen == [(key, (1, s, 32)) for s in (5, 1, 1) for key in ("attn0", "mlp0", "attn1", "mlp1")]


# ---------------------------------------------------------------------------------------------
# Loss and training mode


def test_loss_is_mean_cross_entropy_over_kept_targets():
    model = tiny_gpt()
    ids = torch.randint(0, VOCAB, (2, 9))
    targets = next_token_targets(ids)
    targets[1, :3] = IGNORE_INDEX
    logits, loss = model(ids, targets)
    keep = targets != IGNORE_INDEX
    expected = -torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected[keep].mean(), rtol=1e-6, atol=1e-6)


def test_loss_without_logits_is_the_same_loss_and_gradients():
    """return_logits=False returns no logits and the same loss and gradients: the loss never
    needed them (linear_cross_entropy from ln_f's output and the tied lm_head weight)."""
    model = tiny_gpt()
    ids = torch.randint(0, VOCAB, (2, 9))
    targets = next_token_targets(ids)
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        logits, loss = model(ids, targets, return_logits=return_logits)
        loss.backward()
        results.append((logits, loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (logits, loss, grads), (no_logits, loss_alone, grads_alone) = results
    assert logits.shape == (2, 9, VOCAB) and no_logits is None
    assert torch.equal(loss, loss_alone)
    for grad, grad_alone in zip(grads, grads_alone):
        torch.testing.assert_close(grad_alone, grad, rtol=1e-5, atol=1e-7)


def test_loss_matches_transformers_labels():
    """transformers shifts labels inside; engine takes the shifted targets (nanoGPT's batches)."""
    hf = random_hf()
    ours = GPT.from_hf(hf)
    ids, mask = inputs()
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, labels=labels).loss
        _, loss = ours(ids, next_token_targets(ids, mask), attention_mask=mask)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_backward_reaches_every_parameter():
    model = tiny_gpt()
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    _, loss = model(ids, next_token_targets(ids, mask), attention_mask=mask)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradients_match_an_unfused_torch_gpt():
    """The fused residual/norm/MLP path gives torch autograd's gradients of the plain math."""
    model = tiny_gpt()
    ids = torch.randint(0, VOCAB, (2, 7))
    targets = next_token_targets(ids)
    _, loss = model(ids, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    expected_loss = _plain_gpt_loss(params, model.config, ids, targets)
    expected_loss.backward()
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    for name, p in params.items():
        torch.testing.assert_close(grads[name].double(), p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _plain_gpt_loss(p, config, ids, targets):
    """GPT-2's forward written with torch ops only (float64): the oracle of the fused path."""
    fn = torch.nn.functional
    c, h = config.n_embd, config.n_head
    b, s = ids.shape
    x = p["transformer.wte.weight"][ids] + p["transformer.wpe.weight"][:s]
    for i in range(config.n_layer):
        pre = f"transformer.h.{i}."

        def norm(t, name):
            return fn.layer_norm(t, (c,), p[pre + name + ".weight"], p[pre + name + ".bias"], config.layer_norm_eps)

        qkv = fn.linear(norm(x, "ln_1"), p[pre + "attn.c_attn.weight"], p[pre + "attn.c_attn.bias"])
        q, k, v = (t.view(b, s, h, c // h).transpose(1, 2) for t in qkv.split(c, -1))
        a = fn.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, c)
        x = x + fn.linear(a, p[pre + "attn.c_proj.weight"], p[pre + "attn.c_proj.bias"])
        hidden = fn.gelu(fn.linear(norm(x, "ln_2"), p[pre + "mlp.c_fc.weight"], p[pre + "mlp.c_fc.bias"]),
                         approximate="tanh")
        x = x + fn.linear(hidden, p[pre + "mlp.c_proj.weight"], p[pre + "mlp.c_proj.bias"])
    x = fn.layer_norm(x, (c,), p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], config.layer_norm_eps)
    logits = x @ p["transformer.wte.weight"].t()  # tied: named_parameters lists it once
    return fn.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def test_dropout_applies_in_training_mode_only():
    model = tiny_gpt(dropout=0.2)
    ids = torch.randint(0, VOCAB, (2, 9))
    model.eval()
    with torch.no_grad():
        a, b = model(ids)[0], model(ids)[0]
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        c, d = model(ids)[0], model(ids)[0]
    assert not torch.allclose(c, a) and not torch.allclose(c, d)
    no_dropout = tiny_gpt()
    no_dropout.train()
    with torch.no_grad():
        torch.testing.assert_close(no_dropout(ids)[0], no_dropout.eval()(ids)[0])


# ---------------------------------------------------------------------------------------------
# transformers parity


def _assert_matches(hf, ours, ids, mask):
    """Logits and every hidden state equal transformers' at the positions that are tokens (a
    padded query sees no key: engine gives it zeros, transformers something else; either is
    meaningless)."""
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, output_hidden_states=True)
        logits, _ = ours(ids, attention_mask=mask)
        states = ours.hidden_states(ids, attention_mask=mask)
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    hf_logits = out.logits if hasattr(out, "logits") else None
    if hf_logits is not None:
        torch.testing.assert_close(logits[keep], hf_logits[keep], rtol=0, atol=ATOL)
    assert len(states) == len(out.hidden_states) == ours.config.n_layer + 1
    for i, (a, b) in enumerate(zip(states, out.hidden_states)):
        torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=ATOL, msg=f"hidden state {i}")
    if hf_logits is None:  # GPT2Model: the last hidden state is what lm_head reads
        torch.testing.assert_close(logits[keep], (out.last_hidden_state @ ours.lm_head.weight.t())[keep],
                                   rtol=0, atol=ATOL)


@pytest.mark.parametrize("cls_name", ["GPT2LMHeadModel", "GPT2Model"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padding-mask"])
def test_matches_transformers(cls_name, padded):
    hf = random_hf(getattr(transformers, cls_name))
    ours = GPT.from_hf(hf)
    assert not ours.training
    ids, mask = inputs()
    _assert_matches(hf, ours, ids, mask if padded else None)


def test_matches_transformers_with_positions_from_the_mask():
    """With position_ids as transformers' generate computes them (left padding does not shift
    the real tokens' positions)."""
    hf = random_hf()
    ours = GPT.from_hf(hf)
    ids, mask = inputs()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        logits, _ = ours(ids, attention_mask=mask, position_ids=positions)
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], expected[keep], rtol=0, atol=ATOL)
    # the last prompt (4 tokens after 7 pads) equals the same prompt alone, unpadded
    with torch.no_grad():
        alone, _ = ours(ids[2:, 7:])
    torch.testing.assert_close(logits[2, 7:], alone[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("cls_name", ["GPT2LMHeadModel", "GPT2Model"])
def test_from_local_folder(tmp_path, fmt, cls_name):
    hf = random_hf(getattr(transformers, cls_name))
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").exists()
    else:  # the PyTorch pickle format, as older checkpoints ship
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = GPT.from_hf(tmp_path)
    ids, mask = inputs()
    _assert_matches(hf, ours, ids, mask)
    ours_str = GPT.from_hf(str(tmp_path))
    for (n, a), (_, b) in zip(ours.state_dict().items(), ours_str.state_dict().items()):
        assert torch.equal(a, b), n


def test_from_sharded_folder_and_old_checkpoint_keys(tmp_path):
    """A sharded safetensors index, and the original OpenAI key layout (no "transformer."
    prefix, causal-mask buffers attn.bias / attn.masked_bias stored)."""
    from safetensors.torch import save_file

    hf = random_hf()
    hf.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, tmp_path / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ours = GPT.from_hf(tmp_path)
    _assert_matches(hf, ours, *inputs())


def test_from_hf_keeps_dtype_or_converts():
    hf = random_hf().to(torch.float64)
    assert GPT.from_hf(hf).lm_head.weight.dtype == torch.float64
    assert GPT.from_hf(hf, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_from_hf_maps_config_extras():
    hf = random_hf(config=hf_config(n_inner=48, layer_norm_epsilon=1e-3, activation_function="gelu",
                                    n_positions=40))
    ours = GPT.from_hf(hf)
    assert (ours.config.n_inner, ours.config.layer_norm_eps, ours.config.activation, ours.config.block_size) == \
        (48, 1e-3, "gelu", 40)
    _assert_matches(hf, ours, *inputs())


@pytest.mark.parametrize("overrides, message", [
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(scale_attn_weights=False), "scale_attn_weights"),
    (dict(activation_function="gelu_fast"), "activation_function"),
    (dict(add_cross_attention=True), "cross-attention"),
])
def test_from_hf_refuses_unsupported_variants(overrides, message):
    hf = transformers.GPT2LMHeadModel(hf_config(**overrides))
    with pytest.raises(ValueError, match=message):
        GPT.from_hf(hf)


def test_from_hf_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        GPT.from_hf(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_hf(tmp_path)
    hf_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_hf(tmp_path)
    with pytest.raises(TypeError, match="model_or_dir"):
        GPT.from_hf(42)
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=50))
    with pytest.raises(ValueError, match="model_type"):
        GPT.from_hf(bert)


# ---------------------------------------------------------------------------------------------
# Backends: the model gives the same results on every backend that can run all its ops


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_backend_gives_the_same_model(backend):
    needed = ("layer_norm", "attention", "linear")
    missing = [op for op in needed if backend not in backends.ops().get(op, ())]
    if missing:
        pytest.skip(f"{backend} has no implementation of {missing} yet")
    state = backends.status(backend)
    if not state.available or "cpu" not in state.devices:
        pytest.skip(f"{backend} does not run on CPU tensors here: {state.reason}")
    model = tiny_gpt(n_layer=1, block_size=16, n_embd=32, n_head=2)
    ids = torch.randint(0, VOCAB, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    targets = next_token_targets(ids, mask)
    logits, loss = model(ids, targets, attention_mask=mask)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with backends.use(backend):
        got_logits, got_loss = model(ids, targets, attention_mask=mask)
        got_loss.backward()
    keep = mask.bool()
    torch.testing.assert_close(got_logits[keep], logits[keep], rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-3, atol=1e-5, msg=name)
