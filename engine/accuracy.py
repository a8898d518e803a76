"""The project's accuracy rule: how far a result may be from the float64 reference.

The test suite (tests/common.py) and `python -m engine.selftest` both judge results with it.

A result in dtype d may differ from the float64 reference by
    2 x the error plain PyTorch makes in the same dtype on the same inputs (the baseline)
    + eps(d) x scale x rounding_growth
where scale is the result's magnitude, or the magnitude of the terms that were summed into it
when that is larger (a gradient that cancels to 0 still carries the rounding of its terms).
float64 results must agree to 1e-10 x scale.

rounding_growth is 1 for float16/bfloat16: there the baseline's own rounding dominates, and the
rule stays as tight as it has always been. For float32 it is sqrt(reduction_length). A sum of n
products carries n roundings; how they add up depends on the summation order (blocked, pairwise,
vectorized lanes), which differs between correct implementations and between machines' math
libraries. Errors of random sign grow like sqrt(n), so an allowance of one eps at the result's scale
can be beaten by a correct order: the Triton interpreter's decode kernel (64 keys, head dim 64,
numpy's summation order) erred 4.65e-7 against an allowance of 4.11e-7 on one machine and passed on
another. A real error (a wrong mask, a missed block, a lost term) is orders of magnitude larger.
"""
import math
from typing import Optional

import torch


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def allowed_error(dtype: torch.dtype, expected64: torch.Tensor, baseline: Optional[torch.Tensor] = None,
                  terms_scale: float = 0.0, reduction_length: int = 1) -> float:
    """The largest error allowed for a result of `dtype` whose float64 reference is `expected64`.

    baseline: plain PyTorch's result in `dtype` (required below float64); terms_scale: the magnitude
    of the terms summed into the result, when it can exceed the result's own; reduction_length: the
    number of terms summed into each element (the longest reduction on the way to it)."""
    scale = max(1.0, terms_scale, expected64.abs().max().item() if expected64.numel() else 0.0)
    if dtype == torch.float64:
        return 1e-10 * scale
    if baseline is None:
        raise ValueError(f"a baseline result in {dtype} is needed to judge a {dtype} result")
    growth = math.sqrt(max(1, reduction_length)) if dtype == torch.float32 else 1.0
    return 2 * max_error(baseline, expected64) + torch.finfo(dtype).eps * scale * growth
