"""Numerical checks shared by the kernel tests (DESIGN.md, "Tests").

Outputs are compared with the reference computed in float64. The allowed error of a result in
dtype d is 2x the error plain PyTorch makes in the same dtype on the same inputs (the baseline),
plus eps(d) at the result's scale; float64 results must agree to 1e-10 relative. The scale is the
result's magnitude, or a caller-given magnitude of the terms that were summed into it when that
is larger (a gradient that cancels to 0 still carries the rounding of its terms).

Also the small GPT that the model tests (GPT, torch.compile, distributed) share.
"""
import torch

from engine.models import GPT, GPTConfig

# The model tests' GPT: 2 layers, width 32, 4 heads, 101 tokens, 32 positions.
TINY_GPT_CONFIG = dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32)


def tiny_gpt(**overrides) -> GPT:
    """engine.models.GPT of TINY_GPT_CONFIG with `overrides`, its weights drawn under seed 0."""
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY_GPT_CONFIG, **overrides}))


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def assert_matches_reference(actual: torch.Tensor, expected64: torch.Tensor, baseline: torch.Tensor = None,
                             name: str = "output", terms_scale: float = 0.0) -> None:
    """actual: the engine's result; expected64: the float64 reference; baseline: plain PyTorch's
    result in actual's dtype (required below float64); terms_scale: the magnitude of the terms
    summed into the result, when it can exceed the result's own."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in the result (an element left unwritten?)"
    scale = max(1.0, terms_scale, expected64.abs().max().item() if expected64.numel() else 0.0)
    error = max_error(actual, expected64)
    if actual.dtype == torch.float64:
        allowed = 1e-10 * scale
    else:
        assert baseline is not None, "a baseline in the same dtype is needed below float64"
        allowed = 2 * max_error(baseline, expected64) + torch.finfo(actual.dtype).eps * scale
    assert error <= allowed, f"{name}: max error {error:.3g} > allowed {allowed:.3g} ({actual.dtype})"
