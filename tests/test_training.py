"""engine.training: the next-token and masked-LM losses, the masked-LM corruption (15%; 80/10/10),
the warmup + cosine schedule, the byte tokenizer, the bundled-text data helpers, and a short run
of examples/train_gpt.py whose loss must fall."""
import importlib.util
import math
import os

import pytest
import torch

from engine import training
from engine.training import IGNORE_INDEX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Losses


def test_next_token_targets_shift_and_ignore_padding():
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert training.next_token_targets(ids).tolist() == [[6, 7, 8, -100], [0, 3, 4, -100]]
    assert training.next_token_targets(ids, mask).tolist() == [[6, 7, 8, -100], [-100, 3, 4, -100]]


def test_next_token_loss_is_torch_cross_entropy_over_kept_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, 1] = IGNORE_INDEX
    keep = targets != IGNORE_INDEX
    expected = -torch.log_softmax(logits, -1)[keep].gather(-1, targets[keep].unsqueeze(-1)).mean()
    loss = training.next_token_loss(logits.to(torch.bfloat16), targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=0, atol=0.05)  # bf16 logits
    torch.testing.assert_close(training.next_token_loss(logits.float(), targets).double(), expected,
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        training.next_token_loss(logits, targets[:, :4])


def test_masked_lm_loss_counts_selected_positions_only():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 5]])
    expected = torch.nn.functional.cross_entropy(logits[0, [1, 3]], torch.tensor([3, 5]))
    torch.testing.assert_close(training.masked_lm_loss(logits, labels), expected)


# ---------------------------------------------------------------------------------------------
# Masked-LM corruption


def test_mask_tokens_proportions():
    n = 200_000
    ids = torch.randint(10, 1000, (4, n // 4), generator=torch.Generator().manual_seed(0))
    inputs, labels = training.mask_tokens(ids, mask_token_id=3, vocab_size=1000,
                                          generator=torch.Generator().manual_seed(1))
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])
    fraction = selected.float().mean().item()
    assert abs(fraction - 0.15) < 0.005, fraction
    masked = (inputs == 3) & selected
    kept = (inputs == ids) & selected
    changed = selected & ~masked & ~kept
    count = selected.sum().item()
    # kept includes random draws that hit the original token (1/1000 of the random 10%)
    for name, part, expected in (("mask", masked, 0.8), ("random", changed, 0.1), ("kept", kept, 0.1)):
        share = part.sum().item() / count
        assert abs(share - expected) < 0.01, (name, share)
    assert int(inputs[changed].min()) >= 0 and int(inputs[changed].max()) < 1000


def test_mask_tokens_is_seeded_and_skips_special_and_padding():
    ids = torch.randint(5, 50, (8, 64), generator=torch.Generator().manual_seed(0))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    mask = torch.ones_like(ids)
    mask[:, -10:] = 0
    a = training.mask_tokens(ids, 1, 50, torch.Generator().manual_seed(3), special_tokens_mask=special,
                             attention_mask=mask)
    b = training.mask_tokens(ids, 1, 50, torch.Generator().manual_seed(3), special_tokens_mask=special,
                             attention_mask=mask)
    c = training.mask_tokens(ids, 1, 50, torch.Generator().manual_seed(4), special_tokens_mask=special,
                             attention_mask=mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    inputs, labels = a
    assert (labels[:, 0] == IGNORE_INDEX).all() and (labels[:, -10:] == IGNORE_INDEX).all()
    assert torch.equal(inputs[:, 0], ids[:, 0]) and torch.equal(inputs[:, -10:], ids[:, -10:])
    assert (labels != IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="mask_token_id"):
        training.mask_tokens(ids, 50, 50)
    with pytest.raises(ValueError, match="mlm_probability"):
        training.mask_tokens(ids, 1, 50, mlm_probability=1.5)


# ---------------------------------------------------------------------------------------------
# Schedule


def test_warmup_cosine_values():
    f = training.warmup_cosine
    assert f(0, 10, 110) == pytest.approx(0.1)
    assert f(9, 10, 110) == pytest.approx(1.0)
    assert f(10, 10, 110) == pytest.approx(1.0)
    assert f(60, 10, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110, 10, 110) == pytest.approx(0.1)
    assert f(500, 10, 110) == pytest.approx(0.1)
    decay = [f(s, 10, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_warmup_cosine_schedule_drives_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    schedule = training.warmup_cosine_schedule(opt, warmup_steps=4, total_steps=20, min_ratio=0.0)
    seen = []
    for _ in range(21):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert seen[0] == pytest.approx(0.5) and seen[3] == pytest.approx(2.0)
    assert seen[12] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert seen[20] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        training.warmup_cosine_schedule(opt, 30, 20)


# ---------------------------------------------------------------------------------------------
# Tokenizer and data


def test_byte_tokenizer_round_trip():
    tok = training.ByteTokenizer()
    text = "def f(x):\n    return x  # naïve, 数字, \u2603"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # cut mid-character


def test_byte_tokenizer_special_tokens():
    tok = training.ByteTokenizer(["<pad>", "<mask>"])
    assert tok.vocab_size == 258 and tok.token_id("<mask>") == 257
    assert tok.decode([104, 105, 257, 33]) == "hi<mask>!"
    with pytest.raises(KeyError):
        tok.token_id("<cls>")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([300])
    with pytest.raises(ValueError, match="distinct"):
        training.ByteTokenizer(["<a>", "<a>"])


def test_stdlib_text_is_there_offline():
    text = training.stdlib_text()
    assert len(text) > 100_000
    assert "def" in text and "class" in text


def test_unigram_entropy_and_batches():
    assert training.unigram_entropy(torch.tensor([0, 1, 2, 3] * 5), 256) == pytest.approx(math.log(4))
    assert training.unigram_entropy(torch.tensor([7] * 9), 256) == pytest.approx(0.0)
    data = torch.arange(1000) % 256
    train, val = training.split(data, 0.1)
    assert train.numel() == 900 and val.numel() == 100 and int(val[0]) == 900 % 256
    x, y = training.random_batch(train, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal((x[:, 0] + 1) % 256, y[:, 0])
    with pytest.raises(ValueError, match="block_size"):
        training.random_batch(train[:10], 2, 16)


# ---------------------------------------------------------------------------------------------
# The example, very short


def test_train_example_loss_falls():
    spec = importlib.util.spec_from_file_location("train_gpt", os.path.join(ROOT, "examples", "train_gpt.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "40", "--batch-size", "8", "--block-size", "32", "--n-layer", "2",
                           "--n-head", "2", "--n-embd", "32", "--lr", "1e-2", "--eval-every", "40",
                           "--eval-batches", "2", "--sample-tokens", "20", "--no-progress"])
    losses = result["losses"]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert result["val_loss"] < losses[0]
    assert result["unigram_entropy"] == pytest.approx(3.26, abs=0.1)
    assert len(result["sample"]) > 0
