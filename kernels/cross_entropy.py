"""The cross-entropy row step in Triton: the per-chunk step of engine/ops/cross_entropy.py.

For one row x[0..V) of logits with target t and label smoothing ls (math as in
csrc/common/cross_entropy.h):
    lse  = m + log(sum_j exp(x_j - m)),  m = max_j x_j
    loss = (1 - ls) * (lse - x_t) + ls * (lse - sum_j x_j / V)
    d_j  = exp(x_j - lse) - ls / V - (1 - ls) * [j == t]      (written over x)
A row whose target is ignore_index has loss 0 and d = 0.

One program per row, looping over the row in blocks of BLOCK_V: the first pass keeps, per lane, a
running maximum, the sum of exp(x - maximum) (rescaled when the maximum grows, as online softmax
does) and the sum of x; the second re-reads the row (from L2) and writes d over it.
Memory traffic per row of V s-byte elements: reads 2*V*s, writes V*s.

The label smoothing is a constexpr: a float argument would reach the kernel as fp32, which fp64
data would see (0.1 in fp32 is off by 1.5e-9); a run uses one value, so it compiles once.
"""
import torch
import triton
import triton.language as tl

from engine.kernels.common import GpuCompileCase, next_power_of_2, row_num_warps
from engine.ops.common import dtype_reason

MAX_BLOCK_V = 4096
TL_ACCUMULATOR = {torch.float64: tl.float64}   # everything else accumulates in fp32
# Below every finite logit, the running maximum's start: a -inf logit (a masked-out class) then
# adds exp(-inf - lowest) = 0 instead of exp(-inf + inf) = NaN
_LOWEST_F32, _LOWEST_F64 = tl.constexpr(-3.4028234663852886e38), tl.constexpr(-1.7976931348623157e308)


@triton.jit
def _cross_entropy_rows_kernel(
    Logits,                  # [R, V] contiguous, overwritten with d
    Targets,                 # [R] int64, each in [0, V) or ignore_index
    Loss,                    # [R] output in ACC dtype
    V,                       # vocabulary (row length), < 2^31
    ignore_index,
    LABEL_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,   # power of two
    ACC: tl.constexpr,       # accumulator dtype (tl.float32, or tl.float64 for fp64 data)
):
    row = tl.program_id(0).to(tl.int64)
    logits = Logits + row * V
    target = tl.load(Targets + row)
    cols = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        for start in range(0, V, BLOCK_V):
            tl.store(logits + start + cols, tl.zeros([BLOCK_V], ACC).to(Logits.dtype.element_ty),
                     mask=start + cols < V)
        tl.store(Loss + row, tl.zeros([], ACC))
    else:
        if ACC == tl.float64:
            top = tl.full([BLOCK_V], _LOWEST_F64, ACC)
        else:
            top = tl.full([BLOCK_V], _LOWEST_F32, ACC)
        sum_exp = tl.zeros([BLOCK_V], ACC)
        logit_sum = tl.zeros([BLOCK_V], ACC)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(logits + start + cols, mask=mask, other=float("-inf")).to(ACC)
            new_top = tl.maximum(top, x)
            sum_exp = sum_exp * tl.exp(top - new_top) + tl.exp(x - new_top)
            top = new_top
            logit_sum += tl.where(mask, x, 0.0)
        row_top = tl.max(top, axis=0)
        lse = row_top + tl.log(tl.sum(sum_exp * tl.exp(top - row_top), axis=0))
        target_logit = tl.load(logits + target).to(ACC)
        loss = (1.0 - LABEL_SMOOTHING) * (lse - target_logit) + LABEL_SMOOTHING * (lse - tl.sum(logit_sum, axis=0) / V)
        tl.store(Loss + row, loss)
        offset = LABEL_SMOOTHING / V.to(ACC)  # a float constexpr over an int would be fp32
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            d = tl.exp(tl.load(logits + start + cols, mask=mask, other=0.0).to(ACC) - lse) - offset
            d = tl.where(start + cols == target, d - (1.0 - LABEL_SMOOTHING), d)
            tl.store(logits + start + cols, d.to(Logits.dtype.element_ty), mask=mask)


def _config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of `vocab` logits."""
    block = min(next_power_of_2(vocab), MAX_BLOCK_V)
    return block, row_num_warps(block)


def supports(args) -> list[str]:
    """[] when cross_entropy_rows can run the call (engine.ops.cross_entropy.CrossEntropyArgs),
    else why not. The vocabulary is below 2^31 (checked upstream), so column offsets fit int32."""
    return dtype_reason(args.hidden.dtype)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                       label_smoothing: float) -> torch.Tensor:
    """The row step: logits [R, V] (contiguous) overwritten with d loss_r / d logits, targets
    [R] int64. Returns the loss per row [R] in fp32 (fp64 for fp64 data)."""
    rows, vocab = logits.shape
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, dtype=acc_dtype, device=logits.device)
    if rows == 0:
        return loss
    block, num_warps = _config(vocab)
    _cross_entropy_rows_kernel[(rows,)](
        logits, targets, loss, vocab, ignore_index,
        LABEL_SMOOTHING=label_smoothing, BLOCK_V=block, ACC=TL_ACCUMULATOR.get(logits.dtype, tl.float32),
        num_warps=num_warps,
    )
    return loss


def gpu_compile_cases() -> list[GpuCompileCase]:
    """The configurations the launcher uses, for the ahead-of-time GPU compile check: a small
    vocabulary held in one block, GPT-2's (50257) and Llama 3's (128256), with and without label
    smoothing, in each 16-bit dtype and fp32."""
    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        dname = str(dtype).removeprefix("torch.")
        for vocab in (1000, 50257, 128256):
            block, num_warps = _config(vocab)
            for smoothing in (0.0, 0.1):
                cases.append(GpuCompileCase(
                    name=f"cross_entropy_rows {dname} V={vocab} label_smoothing={smoothing}",
                    kernel=_cross_entropy_rows_kernel,
                    args=(dtype, torch.int64, torch.float32, vocab, -100),
                    constexprs=dict(LABEL_SMOOTHING=smoothing, BLOCK_V=block, ACC=tl.float32),
                    grid=(8,), num_warps=num_warps))
    return cases
