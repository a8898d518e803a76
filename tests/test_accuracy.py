"""The accuracy rule (engine/accuracy.py): every correct summation order passes in fp32, a real
error still fails, and the fp16/bf16 rule is unchanged."""
import math

import pytest
import torch

from engine.accuracy import allowed_error, max_error


def _dot_products(n: int, order: str) -> torch.Tensor:
    """64 dot products of length n in fp32, summed in the given order."""
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(64, n, generator=g), torch.randn(64, n, generator=g)
    terms = a * b
    if order == "sequential":  # one running sum, left to right
        return terms.cumsum(-1)[:, -1]
    if order == "reversed":
        return terms.flip(-1).cumsum(-1)[:, -1]
    if order == "blocked":  # 16 lanes, then the lanes (a vectorized loop's order)
        return terms.view(64, -1, 16).sum(1).cumsum(-1)[:, -1]
    return terms.sum(-1)  # torch's own (pairwise, vectorized)


@pytest.mark.parametrize("n", [64, 1024, 4096])
def test_every_summation_order_passes_in_fp32(n):
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(64, n, generator=g), torch.randn(64, n, generator=g)
    expected = (a.double() * b.double()).sum(-1)
    baseline = (a * b).sum(-1)
    for order in ("sequential", "reversed", "blocked", "torch"):
        actual = _dot_products(n, order)
        assert max_error(actual, expected) <= allowed_error(torch.float32, expected, baseline, reduction_length=n), order


def test_a_lost_term_fails():
    """Softmax attention of one query over 64 keys, one key dropped: a real bug, caught."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(64, generator=g), torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
    scores = k @ q / math.sqrt(64)
    expected = torch.softmax(scores.double(), 0) @ v.double()
    baseline = torch.softmax(scores, 0) @ v
    wrong = torch.softmax(scores[1:], 0) @ v[1:]
    assert max_error(wrong, expected) > allowed_error(torch.float32, expected, baseline, reduction_length=64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rule_ignores_the_reduction_length(dtype):
    expected = torch.linspace(-3, 3, 101, dtype=torch.float64)
    baseline = expected.to(dtype)
    assert allowed_error(dtype, expected, baseline, reduction_length=4096) == allowed_error(dtype, expected, baseline)


def test_a_baseline_is_required_below_float64():
    with pytest.raises(ValueError, match="baseline"):
        allowed_error(torch.float32, torch.zeros(3, dtype=torch.float64))
