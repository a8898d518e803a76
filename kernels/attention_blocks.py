"""Block sizes of the attention kernels.

GPU: a short list of (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per (head-dim block,
dtype), autotuned per (head dims, causal, dtypes) by triton.autotune (the dtypes of every
tensor argument are part of its key). Every candidate is compiled for sm80/sm90/gfx942 by
gpu_compile_cases() (attention.py) and must not spill there. The interpreter gets exactly one
config (autotuning more than one needs a GPU), small enough to exercise several blocks on short
sequences and BLOCK_M != BLOCK_N around the diagonal. The decode kernels have one config each.
"""
import torch
import triton

from engine.kernels.common import INTERPRET, next_power_of_2

_INTERPRET_FWD = (32, 16, 4, 1)
_INTERPRET_DKDV = (16, 32, 4, 1)      # (BLOCK_M query step, BLOCK_N keys held)
_INTERPRET_DQ = (32, 16, 4, 1)


def _is_16bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


# The lists below were chosen with `python -m engine.readiness --kernels attention`: every entry
# compiles for sm80, sm90 and gfx942 without spills (gfx942: 64 KB of shared memory, 256 VGPRs at
# 8 warps, ~100 SGPRs) and, for 16-bit data, with wgmma on sm90 (>= 64 rows per warpgroup).
# "dropout" lists serve the kernels with dropout on: Philox keeps 4 words per score live.


def fwd_candidates(block_d: int, dtype: torch.dtype, dropout: bool) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the forward may use on a GPU. block_d: the larger
    of the padded head dims of q/k and v."""
    if _is_16bit(dtype):
        if block_d <= 64:
            return [(64, 32, 4, 3)] if dropout else [(128, 64, 4, 3), (64, 64, 4, 3)]
        if block_d <= 128:
            return [(64, 32, 4, 2)] if dropout else [(128, 32, 8, 3), (64, 64, 4, 2)]
        return [(64, 16, 4, 2)] if dropout else [(64, 32, 4, 2)]
    if dtype == torch.float32:     # exact fp32 products (FMA): small tiles
        if block_d <= 64:
            return [(32, 32, 4, 2), (64, 16, 4, 2)]
        if block_d <= 128:
            return [(32, 16, 4, 2)] if dropout else [(32, 16, 4, 2), (32, 32, 8, 2)]
        return [(32, 16, 4, 2)]
    return [(16, 16, 4, 1)]        # fp64


def keep_candidates(block_d: int, dtype: torch.dtype) -> list[tuple[int, int, int, int]]:
    """The forward's debug path (dropout mask returned, extra stores): one config."""
    if _is_16bit(dtype):
        return [(64, 32, 4, 3)] if block_d <= 64 else [(64, 16, 4, 2)]
    return fwd_candidates(block_d, dtype, True)[-1:]


def dkdv_candidates(block_d: int, dtype: torch.dtype, dropout: bool) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M query step, BLOCK_N keys held, num_warps, num_stages) for the dK/dV kernel,
    which holds K, V, dK and dV tiles of BLOCK_N x head dim for its whole loop."""
    if _is_16bit(dtype):
        if block_d <= 64:
            return [(32, 64, 4, 3), (16, 128, 8, 2)] if dropout else [(32, 128, 8, 2), (32, 64, 4, 3)]
        if block_d <= 128:
            return [(16, 64, 8, 2), (16, 128, 8, 2)] if dropout else [(32, 64, 4, 3), (16, 128, 8, 2)]
        # D=256 with dropout: 64 keys spill, and 32 keys are below wgmma's 64 rows (sm90: mma)
        return [(16, 32, 8, 2)] if dropout else [(16, 64, 8, 2)]
    if dtype == torch.float32:
        if block_d <= 64:
            return [(32, 32, 4, 2)]
        return [(16, 32, 4, 2)] if block_d <= 128 else [(16, 16, 4, 2)]
    return [(16, 16, 4, 1)]


def dq_candidates(block_d: int, dtype: torch.dtype, dropout: bool) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M query rows held, BLOCK_N key step, num_warps, num_stages) for the dQ kernel."""
    if _is_16bit(dtype):
        if block_d <= 64:
            return [(64, 32, 4, 3), (128, 16, 8, 2)] if dropout else [(128, 32, 8, 3), (64, 32, 4, 3)]
        if block_d <= 128:
            return [(64, 32, 4, 3), (128, 16, 8, 2)]
        return [(64, 16, 8, 1)] if dropout else [(64, 16, 4, 2)]
    if dtype == torch.float32:
        return [(32, 32, 4, 2)] if block_d <= 64 else [(32, 16, 4, 2)]
    return [(16, 16, 4, 1)]


def decode_block_m(rows: int, block_d: int, dtype: torch.dtype) -> int:
    """Query rows (GQA group x new queries) per decode program: >= 16 for tl.dot; at most 32
    for 16-bit data up to head dim 128, else 16 (larger tiles spill: scalar registers on gfx942,
    the FMA products of fp32 on sm90)."""
    return min(32 if _is_16bit(dtype) and block_d <= 128 else 16, max(16, next_power_of_2(rows)))


def decode_config(block_m: int, block_d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the decode split kernel: memory bound, one config."""
    if INTERPRET:
        return 16, 4, 1
    if _is_16bit(dtype):
        return (64, 4, 2) if block_m == 16 and block_d <= 128 else (32, 4, 2)
    if dtype == torch.float32:   # exact products on FMA units: small tiles (ptxas spills at 4 warps
        return (16, 8, 1) if block_d <= 128 else (16, 4, 2)   # for D <= 128, at 8 for D = 256)
    return 16, 4, 1


def _configs(candidates, interpret_config) -> list:
    def config(c):
        return triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1]}, num_warps=c[2], num_stages=c[3])
    if INTERPRET:
        return [config(interpret_config)]
    seen = []
    for dtype in (torch.float16, torch.float32, torch.float64):
        for block_d in (16, 32, 64, 128, 256):
            for dropout in (False, True):
                seen += [c for c in candidates(block_d, dtype, dropout) if c not in seen]
    return [config(c) for c in seen]


def _pruner(candidates):
    def prune(configs, named_args, **kwargs):
        block_d = max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"])
        dtype = named_args["Q"].dtype
        if kwargs.get("RETURN_KEEP", False):
            wanted = keep_candidates(block_d, dtype)
        else:
            wanted = candidates(block_d, dtype, kwargs["DROPOUT"])
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
    return {"early_config_prune": prune}


# triton.autotune adds the dtypes of every tensor argument to this key
_TUNE_KEY = ["BLOCK_D", "BLOCK_DV", "EVEN_D", "EVEN_DV", "CAUSAL", "DROPOUT"]
_FWD_TUNE_KEY = _TUNE_KEY + ["RETURN_KEEP"]


def _head_block(d: int) -> int:
    """Head dims are padded (masked loads) to a power of two, at least 16 for tl.dot."""
    return max(16, next_power_of_2(d))


def _preprocess_block_m(block_dv: int) -> int:
    return max(1, min(64, 2048 // block_dv))
