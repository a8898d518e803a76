"""Numerical checks shared by the kernel tests (DESIGN.md, "Tests").

Outputs are compared with the reference computed in float64, under the project's accuracy rule
(engine/accuracy.py): 2x the error plain PyTorch makes in the same dtype on the same inputs, plus
eps at the result's scale (widened for long fp32 reductions); float64 results must agree to 1e-10
relative.

Also the small GPT that the model tests (GPT, torch.compile, distributed) share, and rotary
position embedding as plain PyTorch (tests/test_rotary.py and tests/test_properties.py).
"""
import torch

from engine.accuracy import allowed_error, max_error
from engine.models import GPT, GPTConfig

# The model tests' GPT: 2 layers, width 32, 4 heads, 101 tokens, 32 positions.
TINY_GPT_CONFIG = dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32)


def tiny_gpt(**overrides) -> GPT:
    """engine.models.GPT of TINY_GPT_CONFIG with `overrides`, its weights drawn under seed 0."""
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY_GPT_CONFIG, **overrides}))


def assert_matches_reference(actual: torch.Tensor, expected64: torch.Tensor, baseline: torch.Tensor = None,
                             name: str = "output", terms_scale: float = 0.0, reduction_length: int = 1) -> None:
    """actual: the engine's result; expected64: the float64 reference; baseline: plain PyTorch's
    result in actual's dtype (required below float64); terms_scale: the magnitude of the terms
    summed into the result, when it can exceed the result's own; reduction_length: how many terms
    are summed into each element (engine/accuracy.py says how it widens the fp32 allowance)."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in the result (an element left unwritten?)"
    error = max_error(actual, expected64)
    allowed = allowed_error(actual.dtype, expected64, baseline, terms_scale, reduction_length)
    assert error <= allowed, f"{name}: max error {error:.3g} > allowed {allowed:.3g} ({actual.dtype})"


def torch_rotary(x, cos, sin, offsets, interleaved):
    """What a user writes in plain PyTorch (transformers' rotate_half form, GPT-J's
    rotate_every_two): x [B, H, S, D], cos/sin [P, R/2], offsets [B] or None."""
    half = cos.shape[-1]
    positions = torch.arange(x.shape[2], device=x.device)
    if offsets is not None:
        positions = offsets[:, None, None].to(torch.int64) + positions  # [B, 1, S]
    c, s = cos[positions], sin[positions]
    pairs, rest = x[..., :2 * half], x[..., 2 * half:]
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        turned = torch.stack((-pairs[..., 1::2], pairs[..., 0::2]), -1).flatten(-2)
    else:
        c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        turned = torch.cat((-pairs[..., half:], pairs[..., :half]), -1)
    return torch.cat((pairs * c + turned * s, rest), -1)
