"""GPT.generate (engine/models/generate.py): greedy output equals transformers' greedy generate on
an imported GPT-2 (single prompt, left-padded batch, stopping at eos); the KV-cached decode gives
the logits of a full forward pass; sampling follows temperature / top-k / top-p and a seeded
generator; bad arguments raise. Tiny random configs; nothing is downloaded."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.models import GPT, GPTConfig  # noqa: E402
from engine.models.generate import select_next  # noqa: E402

VOCAB = 101


@pytest.fixture(scope="module")
def pair():
    """(transformers GPT-2, the engine GPT imported from it), random weights, eval mode."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
    hf = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # larger weights than the init: sharper, less tie-prone next-token choices
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.eval()
    return hf, GPT.from_hf(hf)


def hf_greedy(hf, ids, mask, new, eos=None, pad=0):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad,
                           eos_token_id=eos)


def left_padded_batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :5] = 0
    mask[2, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_greedy_single_prompt_equals_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    expected = hf_greedy(hf, ids, torch.ones_like(ids), 20)
    assert torch.equal(ours.generate(ids, 20, top_k=1), expected)
    assert torch.equal(ours.generate(ids, 20, temperature=0), expected)


def test_greedy_left_padded_batch_equals_transformers(pair):
    hf, ours = pair
    ids, mask = left_padded_batch()
    expected = hf_greedy(hf, ids, mask, 16)
    got = ours.generate(ids, 16, top_k=1, attention_mask=mask, pad_token_id=0)
    assert torch.equal(got, expected)
    # each prompt alone, unpadded, continues the same way
    for b in range(3):
        alone = ours.generate(ids[b:b + 1, mask[b].argmax():], 16, top_k=1)
        assert torch.equal(alone[0, -16:], got[b, -16:]), b


def test_eos_stops_each_sequence_and_pads_after(pair):
    hf, ours = pair
    ids, mask = left_padded_batch()
    free = hf_greedy(hf, ids, mask, 16)[:, 9:]
    eos = int(free[1, 3])  # a token the second sequence produces at its 4th step
    expected = hf_greedy(hf, ids, mask, 16, eos=eos, pad=0)
    got = ours.generate(ids, 16, top_k=1, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    new = got[1, 9:]
    first = int((new == eos).nonzero()[0])
    assert (new[first + 1:] == 0).all()


def test_generation_stops_when_every_sequence_is_finished(pair):
    _, ours = pair
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    free = ours.generate(ids, 10, top_k=1)
    eos = int(free[0, 7])  # the third new token
    out = ours.generate(ids, 10, top_k=1, eos_token_id=eos)
    first = int((free[0, 5:] == eos).nonzero()[0])
    assert out.shape == (1, 5 + first + 1) and int(out[0, -1]) == eos


def test_cached_decode_gives_the_full_forward_logits(pair):
    """Each decode step's logits equal those of the whole sequence recomputed without a cache
    (a causal forward pass over the final sequence gives every prefix's logits at once)."""
    _, ours = pair
    ids, mask = left_padded_batch()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    seq, pos, cached = ids, positions, []
    with torch.no_grad():
        with ours.kv_caches(3, 9 + 4, prompt_mask=mask):
            h = ours.body(ids, positions)
            for step in range(4):
                cached.append(ours.logits(h[:, -1]))
                token = cached[-1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, token], 1)
                pos = torch.cat([pos, pos[:, -1:] + 1], 1)
                h = ours.body(token, pos[:, -1:])
            assert [block.attn.kv_cache.length for block in ours.transformer.h] == [9 + 4, 9 + 4]
        assert all(block.attn.kv_cache is None for block in ours.transformer.h)
        full_mask = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], 1)
        cached.append(ours.logits(h[:, -1]))
        expected, _ = ours(seq, attention_mask=full_mask, position_ids=pos)
    for step, logits in enumerate(cached):
        torch.testing.assert_close(logits, expected[:, 9 - 1 + step], rtol=0, atol=2e-5, msg=f"step {step}")


def test_sampling_is_reproducible_with_a_generator(pair):
    _, ours = pair
    ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(5))
    a = ours.generate(ids, 12, temperature=1.3, generator=torch.Generator().manual_seed(7))
    b = ours.generate(ids, 12, temperature=1.3, generator=torch.Generator().manual_seed(7))
    c = ours.generate(ids, 12, temperature=1.3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 16) and torch.equal(a[:, :4], ids)


def test_select_next_top_k_and_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    top2 = select_next(logits, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    assert abs((top2 == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    # top_p=0.75: {0.5, 0.3} reach it, 0.15 and 0.05 are dropped
    nucleus = select_next(logits, top_p=0.75, generator=g)
    assert set(nucleus.tolist()) == {0, 1}
    # top_p below the most likely token's mass keeps only that token
    assert set(select_next(logits, top_p=0.2, generator=g).tolist()) == {0}
    # temperature flattens: the rarest token shows up more often at temperature 3 than at 1
    hot = select_next(logits, temperature=3.0, generator=g)
    cold = select_next(logits, temperature=1.0, generator=g)
    assert (hot == 3).sum() > (cold == 3).sum()
    assert torch.equal(select_next(logits[:3], temperature=0), torch.zeros(3, dtype=torch.long))


def test_generate_restores_training_mode_and_handles_zero_tokens(pair):
    _, ours = pair
    ids = torch.randint(0, VOCAB, (1, 3))
    ours.train()
    try:
        out = ours.generate(ids, 0)
        assert torch.equal(out, ids) and ours.training
        ours.generate(ids, 2, top_k=1)
        assert ours.training
    finally:
        ours.eval()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=70), ValueError, "block_size"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), ValueError, "left padding"),
    (dict(attention_mask=torch.tensor([[1, 1]])), ValueError, "attention_mask"),
])
def test_bad_arguments_raise(pair, kwargs, error, message):
    _, ours = pair
    args = dict(max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        ours.generate(torch.tensor([[1, 2, 3]]), **args)
    with pytest.raises(TypeError, match="input_ids"):
        ours.generate(torch.tensor([1.0, 2.0]), 2)


def test_fully_padded_prompt_raises(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="at least one token"):
        ours.generate(torch.tensor([[1, 2], [3, 4]]), 2, attention_mask=torch.tensor([[1, 1], [0, 0]]))


def test_model_without_bias_generates():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, bias=False)).eval()
    out = model.generate(torch.tensor([[1, 2, 3]]), 5, top_k=1)
    assert out.shape == (1, 8) and int(out.max()) < 50
