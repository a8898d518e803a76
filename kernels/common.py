"""What every Triton kernel file shares: interpreter detection, block-size rules and the
description of one GPU compile case."""
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from . import compat

# TRITON_INTERPRET must be set before any @triton.jit kernel is defined; the tests set it in
# conftest.py. Kernels take this as a constexpr to switch to interpreter-safe paths.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    compat.patch_interpreter()

TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def row_num_warps(block_size: int) -> int:
    """num_warps ladder for row-wise kernels: one warp per 256 elements of the block, 1..16."""
    return max(1, min(16, block_size // 256))


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)


@dataclass(frozen=True)
class GpuCompileCase:
    """One configuration of a Triton kernel exactly as a launcher launches it, for the
    ahead-of-time compile check (engine/readiness.py). `args` are what `kernel.warmup` takes:
    a torch dtype for each pointer, a representative int/float for each scalar (its value decides
    Triton's divisibility-by-16 specialization, so use the value a real call would pass)."""

    name: str          # e.g. "layer_norm_fwd fp16 N=768"
    kernel: object     # the @triton.jit function
    args: tuple        # positional arguments for kernel.warmup
    constexprs: dict = field(default_factory=dict)
    grid: tuple = (1,)
    num_warps: int = 4
    num_stages: int = 3
    # True for kernels that do matrix products (tl.dot): the readiness check then requires
    # tensor-core instructions (wgmma on sm90, mma on sm80, MFMA on gfx942).
    expects_tensor_cores: bool = False
