"""Linear layers with a fused epilogue, their backward, and GeLU, in Triton.

    forward   out = dropout(act(x @ W^T + b)) + residual          x [M, K], W [N, K] (nn.Linear)
    backward  g = grad_out * keep / (1 - p) * act'(pre)             (a prologue on each g tile)
              dx = g @ W [M, K],  dW = g^T @ x [N, K],  db = g summed over rows [N]
    gelu      y = x Phi(x) (erf form) or torch's tanh form, and its derivative, elementwise

Dropout is the counter-based stream of engine/reference.py: word 0 of Philox4x32-10 (tl.philox)
with key = seed (low, high 32 bits) and counters (n, m, 0, 0) for element [m, n], mapped to [0, 1)
by tl.uint_to_uniform_float; kept iff u >= p, kept values scaled by 1 / (1 - p). The backward
regenerates the mask from the seed instead of reading one.

Memory traffic (s = bytes per element; compulsory traffic, what bench/ counts; x and W tiles are
re-read from L2 by neighbouring programs, which the grouped program order keeps cheap):
    forward:  reads M*K*s (x) + N*K*s (W) [+ N*s bias] [+ M*N*s residual];
              writes M*N*s (out) [+ M*N*s pre-activation when act != none] [+ M*N bytes mask]
    backward: dx kernel reads M*N*s (grad_out) [+ M*N*s pre] + N*K*s (W), writes M*K*s (dx)
              [+ ceil(M/BLOCK_M)*N*4 partial bias sums];
              dW kernel reads M*N*s (grad_out) [+ M*N*s pre] + M*K*s (x), writes N*K*s (dW)
              [or S*N*K*4 fp32 partials when the reduction over M is split S ways]
    gelu:     forward reads n*s, writes n*s; backward reads 2*n*s, writes n*s
FLOPs: forward 2*M*N*K, backward 4*M*N*K (2*M*N*K without the weight gradient).

Products run on tensor cores for fp16/bf16 (tl.dot on the 16-bit operands, fp32 accumulator:
mma on sm80, wgmma on sm90, MFMA on gfx942; g is rounded to the data's dtype for the backward
products, as a 16-bit autograd would). fp32 products use input_precision="ieee" (true fp32 FMA,
no TF32), which matches torch's default (torch.backends.cuda.matmul.allow_tf32 = False) and the
fp32 accuracy the tests require. fp64 (for float64 gradcheck) runs only in the interpreter;
supports() sends fp64 on a GPU to another backend. In the interpreter tl.dot gets fp32 operands
for 16-bit data (its 16-bit arithmetic is wrong) and fp64 operands for fp32 data (_dot_acc).

Program order: output tiles are visited in groups of GROUP rows of tiles (the "grouped" or
swizzled order), so the programs running at the same time share the same few row panels of the
left operand and column panels of the right one in L2.
"""
from typing import NamedTuple, Optional

import numpy as np
import torch
import triton
import triton.language as tl

from engine.kernels.common import INTERPRET, TORCH_TO_TL, GpuCompileCase
from engine.ops.common import dtype_reason
from engine.reference import GATED_ACTIVATIONS

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu", "silu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TL = {**TORCH_TO_TL, torch.float64: tl.float64}

GELU_BLOCK = 4096   # elements per program of the elementwise GeLU kernels
GELU_WARPS = 8


# ---------------------------------------------------------------------------------------------
# Shared device functions


@triton.jit
def _tile_coords(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """(row tile, column tile) of program `pid` in the grouped order: GROUP row tiles are walked
    column by column, so consecutive programs share row panels and column panels."""
    in_group = GROUP * num_cols
    group = pid // in_group
    first_row = group * GROUP
    rows_here = tl.minimum(num_rows - first_row, GROUP)
    row = first_row + (pid % in_group) % rows_here
    col = (pid % in_group) // rows_here
    return row, col


@triton.jit
def _dot_acc(a, b, acc, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """acc + a @ b. On a GPU, one tl.dot on operands of the data's dtype accumulating into acc
    (fp32 for 16-bit and fp32 data: every product enters the running sum through one FMA).
    In the interpreter, fp32 data arrives with DOT_DTYPE = fp64: the interpreter's fp32 matmul
    rounds each product and each partial sum separately (no FMA; measured 2-2.5x the error of
    torch's CPU matmul at K = 129, past the tests' 2x rule), so each K step's products are summed
    in fp64 and rounded once into the fp32 accumulator instead."""
    if DOT_DTYPE == tl.float64 and ACC == tl.float32:
        return acc + tl.dot(a.to(tl.float64), b.to(tl.float64), out_dtype=tl.float64).to(tl.float32)
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC)


@triton.jit
def _gelu_tanh_parts(x):
    """(s, e) with s = (1 + tanh(u)) / 2 = 1 / (1 + e), e = exp(-2u), u = sqrt(2/pi) (x + 0.044715 x^3):
    torch's tanh-form GeLU is x * s. One exp, and no cancellation as s -> 1. e is left to overflow
    (x^3 too): past x ~ -10 in fp32 e = inf and s = 0, the rounding of the true s (GeLU(-3e38) is
    -0; capping e at exp(80) once gave -5414.5 there)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    e = tl.exp(-2.0 * u)
    return 1.0 / (1.0 + e), e


@triton.jit
def _sigmoid_pair(x):
    """(s, 1 - s) with s = sigmoid(x) = 1 / (1 + e^-x): exact at +-inf (an overflowing e^-x gives
    0, not NaN). 1 - s cancels for large x, where it only scales x (1 - s) << 1 in silu's
    derivative s (1 + x (1 - s)): an absolute error of ~x e^-x eps there. (The branch-free pair
    from e^-|x| spilled 4-8 B in two backward tiles on gfx942.)"""
    s = 1.0 / (1.0 + tl.exp(-x))
    return s, 1.0 - s


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    """act(x) elementwise in x's (fp32 or fp64) dtype; formulas as engine/reference.py activate."""
    if ACTIVATION == "gelu":
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        s, _ = _gelu_tanh_parts(x)
        return x * s
    elif ACTIVATION == "relu":
        return tl.where(x < 0.0, 0.0, x)  # NaN is not < 0: it propagates, as torch's relu (tl.maximum drops it)
    elif ACTIVATION == "silu":
        s, _ = _sigmoid_pair(x)
        return x * s
    else:
        return x


@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    """d act(x) / dx elementwise; formulas as engine/reference.py activation_grad."""
    if ACTIVATION == "gelu":
        # Phi(x) + x phi(x)
        return (0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
                + x * tl.exp(-0.5 * x * x) * 0.3989422804014327)
    elif ACTIVATION == "gelu_tanh":
        # y = x s, s = sigmoid(2u), u = c (x + a x^3): y' = s + x * 2 s (1 - s) c (1 + 3 a x^2)
        # (= (1 + t) / 2 + x (1 - t^2) c (1 + 3 a x^2) / 2 of the reference, t = tanh(u) = 2s - 1),
        # with s (1 - s) = e / (1 + e)^2 = 1 / (e + 2 + 1 / e): no cancellation, and 0 (not
        # inf * 0) where e is 0 or inf. x^2 is capped at 1e4 in the last factor, where |x| > 100
        # already makes s (1 - s) = 0, so that x^2 = inf (|x| > 1.8e19 in fp32) gives 0, not NaN.
        s, e = _gelu_tanh_parts(x)
        gate_slope = 1.0 / (e + 2.0 + 1.0 / e)
        return s + x * gate_slope * (2.0 * 0.7978845608028654) * (1.0 + 0.134145 * tl.minimum(x * x, 1e4))
    elif ACTIVATION == "relu":
        return tl.where(x > 0, 1.0, 0.0)
    elif ACTIVATION == "silu":  # s (1 + x (1 - s))
        s, one_minus_s = _sigmoid_pair(x)
        return s * (1.0 + x * one_minus_s)
    else:
        return tl.full(x.shape, 1.0, x.dtype)


@triton.jit
def _dropout_keep(seed, m, n, dropout_p):
    """Keep mask of the dropout stream for elements [m, n] (m, n: int64 index tensors that
    broadcast to one 2-D shape): Philox counters (n, m, 0, 0), key = seed, word 0 as tl.rand
    maps it; kept iff u >= p (p as the fp32 Triton makes of the Python float, the same value
    torch compares with in engine/reference.py)."""
    c0 = (n + m * 0).to(tl.uint32)
    c1 = (m + n * 0).to(tl.uint32)
    zero = c0 * 0
    word, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    return tl.uint_to_uniform_float(word) >= dropout_p


@triton.jit
def _rounded(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """x cast to the stored dtype DTYPE, rounding to nearest even as the GPU does. The
    interpreter's fp32 -> bf16 cast truncates instead (up to 1 ulp off), so under INTERPRET bf16
    is rounded on the bits: add 0x7FFF plus the lowest kept bit, keep the high 16 bits."""
    if INTERPRET:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DTYPE)
    else:
        return x.to(DTYPE)


@triton.jit
def _dropout_scale(scale_hi, scale_lo, ACC: tl.constexpr):
    """1 / (1 - p) in ACC. Triton passes Python floats as fp32, so the launcher splits the double
    into hi + lo fp32 values; fp64 data adds both (~48 bits), fp32 data needs only hi."""
    if ACC == tl.float64:
        return tl.cast(scale_hi, tl.float64) + tl.cast(scale_lo, tl.float64)
    else:
        return scale_hi


@triton.jit
def _output_grad(DO, stride_dom, stride_don, PRE, stride_pm, stride_pn, m, n, M, N,
                 seed, dropout_p, scale,
                 ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr):
    """g = grad_out * keep * scale * act'(pre) for the elements [m, n] (m, n: int64 index tensors
    broadcasting to the tile's shape, [BM, 1] x [1, BN] or, transposed, [1, BM] x [BN, 1]); 0
    outside [0, M) x [0, N], so padding adds nothing to the products or the bias sums."""
    valid = (m < M) & (n < N)
    g = tl.load(DO + m * stride_dom + n * stride_don, mask=valid, other=0.0).to(ACC)
    if HAS_DROPOUT:
        g = tl.where(_dropout_keep(seed, m, n, dropout_p), g * scale, 0.0)
    if ACTIVATION != "none":
        pre = tl.load(PRE + m * stride_pm + n * stride_pn, mask=valid, other=0.0).to(ACC)
        g = g * _activation_grad(pre, ACTIVATION)
    return g


@triton.jit
def _gated_output_grad(DO, stride_dom, stride_don, PRE, stride_pm, stride_pn, m, j, M, H,
                       seed, dropout_p, scale,
                       ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr):
    """The gated form of _output_grad for output elements [m, j] (the product is [M, 2H] =
    [gate | up], grad_out [M, H]): with g_out = grad_out * keep * scale, returns the gate's
    g_out * up * act'(gate) (columns j of the product's gradient) and the up projection's
    g_out * act(gate) (columns H + j); 0 outside [0, M) x [0, H]."""
    valid = (m < M) & (j < H)
    g = tl.load(DO + m * stride_dom + j * stride_don, mask=valid, other=0.0).to(ACC)
    if HAS_DROPOUT:
        g = tl.where(_dropout_keep(seed, m, j, dropout_p), g * scale, 0.0)
    gate = tl.load(PRE + m * stride_pm + j * stride_pn, mask=valid, other=0.0).to(ACC)
    up = tl.load(PRE + m * stride_pm + (H + j) * stride_pn, mask=valid, other=0.0).to(ACC)
    return g * up * _activation_grad(gate, ACTIVATION), g * _activate(gate, ACTIVATION)


@triton.jit
def _split_columns(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS] -> its left and right [ROWS, COLS / 2] halves."""
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def _stack_columns(left, right, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS] left and right -> [ROWS, 2 * COLS], left's columns first (_split_columns' inverse)."""
    return tl.reshape(tl.permute(tl.join(left, right), (0, 2, 1)), (ROWS, 2 * COLS))


@triton.jit
def _stack_rows(top, bottom, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS] top and bottom -> [2 * ROWS, COLS], top's rows first."""
    return tl.reshape(tl.permute(tl.join(top, bottom), (2, 0, 1)), (2 * ROWS, COLS))


@triton.jit
def _epilogue(acc, up, offs_m, first_col, B, stride_b, R, stride_rm, stride_rn, OUT, PRE, KEEP, stride_om, M, N,
              seed, dropout_p, scale_hi, scale_lo,
              ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, STORE_PRE: tl.constexpr, STORE_MASK: tl.constexpr, ACC: tl.constexpr,
              WIDTH: tl.constexpr, INTERPRET: tl.constexpr):
    """The forward's epilogue on an accumulator slice acc [BM, WIDTH] of rows offs_m [BM] (int64)
    and output columns first_col + [0, WIDTH): + bias, store pre-activation, activation, dropout
    (store mask), + residual, store out. GATED: acc is the gate's slice and up [BM, WIDTH] the up
    projection's at columns N + first_col + [0, WIDTH) of the product (pre [M, 2N], row stride
    2 * stride_om), and the activation is act(gate) * up; else `up` is not read."""
    offs_n = first_col + tl.arange(0, WIDTH)
    m2 = offs_m[:, None]
    n2 = offs_n[None, :]
    inside = (m2 < M) & (n2 < N)
    if HAS_BIAS:
        acc += tl.load(B + offs_n * stride_b, mask=offs_n < N, other=0.0).to(ACC)[None, :]
        if GATED:
            up += tl.load(B + (N + offs_n) * stride_b, mask=offs_n < N, other=0.0).to(ACC)[None, :]
    if STORE_PRE:
        if GATED:
            tl.store(PRE + m2 * (2 * stride_om) + n2, _rounded(acc, PRE.dtype.element_ty, INTERPRET), mask=inside)
            tl.store(PRE + m2 * (2 * stride_om) + N + n2, _rounded(up, PRE.dtype.element_ty, INTERPRET),
                     mask=inside)
        else:
            tl.store(PRE + m2 * stride_om + n2, _rounded(acc, PRE.dtype.element_ty, INTERPRET), mask=inside)
    y = _activate(acc, ACTIVATION)
    if GATED:
        y = y * up
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, m2, n2, dropout_p)
        y = tl.where(keep, y * _dropout_scale(scale_hi, scale_lo, ACC), 0.0)
        if STORE_MASK:
            tl.store(KEEP + m2 * stride_om + n2, keep.to(tl.uint8), mask=inside)
    if HAS_RESIDUAL:
        y += tl.load(R + m2 * stride_rm + n2 * stride_rn, mask=inside, other=0.0).to(ACC)
    tl.store(OUT + m2 * stride_om + n2, _rounded(y, OUT.dtype.element_ty, INTERPRET), mask=inside)


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit(do_not_specialize=["seed"])
def _linear_fwd_kernel(
    X, stride_xm, stride_xk,        # [M, K] input
    W, stride_wn, stride_wk,        # [N, K] weight (nn.Linear layout, any strides)
    B, stride_b,                    # [N] bias, read when HAS_BIAS
    R, stride_rm, stride_rn,        # [M, N] residual, read when HAS_RESIDUAL
    OUT, PRE, KEEP, stride_om,      # [M, N] out, pre-activation (STORE_PRE), uint8 keep mask
                                    # (STORE_MASK): allocated alike by the launcher, row stride
                                    # stride_om, unit column stride; GATED: pre [M, 2N], row
                                    # stride 2 * stride_om
    M, N, K,                        # problem size; GATED: W is [2N, K], gate rows then up rows
    seed: tl.int64,                 # dropout key (64 bits: low word = k0, high word = k1)
    dropout_p,                      # dropout probability (fp32), used when HAS_DROPOUT
    scale_hi, scale_lo,             # 1 / (1 - p) = scale_hi + scale_lo (two fp32 values)
    ACTIVATION: tl.constexpr,       # one of ACTIVATIONS (GATED: the gate's)
    GATED: tl.constexpr,            # out = act(x W_gate^T + b_gate) * (x W_up^T + b_up)
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_PRE: tl.constexpr, STORE_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr,        # tl.dot operand dtype: x's on GPU; interpreter: see _dot_dtype
    DOT_PRECISION: tl.constexpr,    # "ieee" (only matters for fp32 operands)
    ACC: tl.constexpr,              # accumulator dtype: fp32, fp64 for fp64 data
    INTERPRET: tl.constexpr,        # running in the Triton interpreter (see _rounded, _dot_dtype)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # output tile, K step
    GROUP: tl.constexpr,            # row tiles per group of the program order
    EPILOGUE_SPLIT: tl.constexpr,   # 1 or 4 column slices for an epilogue with an activation
                                    # or dropout (a plain epilogue runs on the whole tile)
):
    pid = tl.program_id(0)
    # GATED: a tile's BLOCK_N product columns are OUT_COLS gate columns and the OUT_COLS up
    # columns of the same outputs, so that its epilogue holds both halves of each output.
    OUT_COLS: tl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N
    pid_m, pid_n = _tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, OUT_COLS), GROUP)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # [BM] rows of out
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge read (wrapped) valid rows instead of being masked, which
    # keeps the loads unmasked along M/N; their results are never stored.
    rows = offs_m % M
    if GATED:
        j = tl.arange(0, BLOCK_N)
        outputs = (pid_n.to(tl.int64) * OUT_COLS + j % OUT_COLS) % N               # [BN] output columns
        cols = outputs + tl.where(j >= OUT_COLS, N, 0)                              # [BN] weight rows
    else:
        cols = (pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)) % N          # [BN] columns of out
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk   # [BM, BK]
    w_ptrs = W + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn   # [BK, BN] = W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = _dot_acc(a, b, acc, DOT_DTYPE, DOT_PRECISION, ACC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue on the accumulator tile, in the order of engine/reference.py linear, on column
    # slices of the tile one after another (EPILOGUE_SPLIT of them), so that the activation and
    # Philox temporaries of only one slice are live at a time (without this the heavy epilogue
    # spills on sm80 at 64 accumulator elements per thread).
    first_col = pid_n.to(tl.int64) * OUT_COLS
    SLICES: tl.constexpr = EPILOGUE_SPLIT if (ACTIVATION != "none" or HAS_DROPOUT) else 1
    half: tl.constexpr = BLOCK_N // 2
    quarter: tl.constexpr = BLOCK_N // 4
    if GATED:
        # the gate's and the up projection's columns of the same outputs, [BM, BN / 2] each, in
        # SLICES / 2 pairs of slices
        gate, up = _split_columns(acc, BLOCK_M, BLOCK_N)
        if SLICES == 1:
            _epilogue(gate, up, offs_m, first_col, B, stride_b, R, stride_rm, stride_rn, OUT, PRE, KEEP, stride_om,
                      M, N, seed, dropout_p, scale_hi, scale_lo, ACTIVATION, GATED, HAS_BIAS, HAS_RESIDUAL,
                      HAS_DROPOUT, STORE_PRE, STORE_MASK, ACC, half, INTERPRET)
        else:
            tl.static_assert(SLICES == 4, "EPILOGUE_SPLIT is 1 or 4")
            gate0, gate1 = _split_columns(gate, BLOCK_M, half)
            up0, up1 = _split_columns(up, BLOCK_M, half)
            _epilogue(gate0, up0, offs_m, first_col, B, stride_b, R, stride_rm, stride_rn, OUT, PRE, KEEP,
                      stride_om, M, N, seed, dropout_p, scale_hi, scale_lo, ACTIVATION, GATED, HAS_BIAS,
                      HAS_RESIDUAL, HAS_DROPOUT, STORE_PRE, STORE_MASK, ACC, quarter, INTERPRET)
            _epilogue(gate1, up1, offs_m, first_col + quarter, B, stride_b, R, stride_rm, stride_rn, OUT, PRE, KEEP,
                      stride_om, M, N, seed, dropout_p, scale_hi, scale_lo, ACTIVATION, GATED, HAS_BIAS,
                      HAS_RESIDUAL, HAS_DROPOUT, STORE_PRE, STORE_MASK, ACC, quarter, INTERPRET)
    elif SLICES == 1:
        _epilogue(acc, acc, offs_m, first_col, B, stride_b, R, stride_rm, stride_rn, OUT, PRE, KEEP, stride_om,
                  M, N, seed, dropout_p, scale_hi, scale_lo, ACTIVATION, GATED, HAS_BIAS, HAS_RESIDUAL, HAS_DROPOUT,
                  STORE_PRE, STORE_MASK, ACC, BLOCK_N, INTERPRET)
    else:
        tl.static_assert(SLICES == 4, "EPILOGUE_SPLIT is 1 or 4")
        left, right = _split_columns(acc, BLOCK_M, BLOCK_N)
        q0, q1 = _split_columns(left, BLOCK_M, half)
        _epilogue(q0, q0, offs_m, first_col, B, stride_b, R, stride_rm, stride_rn, OUT, PRE, KEEP, stride_om,
                  M, N, seed, dropout_p, scale_hi, scale_lo, ACTIVATION, GATED, HAS_BIAS, HAS_RESIDUAL, HAS_DROPOUT,
                  STORE_PRE, STORE_MASK, ACC, quarter, INTERPRET)
        _epilogue(q1, q1, offs_m, first_col + quarter, B, stride_b, R, stride_rm, stride_rn, OUT, PRE, KEEP,
                  stride_om, M, N, seed, dropout_p, scale_hi, scale_lo, ACTIVATION, GATED, HAS_BIAS, HAS_RESIDUAL,
                  HAS_DROPOUT, STORE_PRE, STORE_MASK, ACC, quarter, INTERPRET)
        q2, q3 = _split_columns(right, BLOCK_M, half)
        _epilogue(q2, q2, offs_m, first_col + half, B, stride_b, R, stride_rm, stride_rn, OUT, PRE, KEEP,
                  stride_om, M, N, seed, dropout_p, scale_hi, scale_lo, ACTIVATION, GATED, HAS_BIAS, HAS_RESIDUAL,
                  HAS_DROPOUT, STORE_PRE, STORE_MASK, ACC, quarter, INTERPRET)
        _epilogue(q3, q3, offs_m, first_col + half + quarter, B, stride_b, R, stride_rm, stride_rn, OUT, PRE, KEEP,
                  stride_om, M, N, seed, dropout_p, scale_hi, scale_lo, ACTIVATION, GATED, HAS_BIAS, HAS_RESIDUAL,
                  HAS_DROPOUT, STORE_PRE, STORE_MASK, ACC, quarter, INTERPRET)


@triton.jit(do_not_specialize=["seed"])
def _linear_bwd_dx_kernel(
    DO, stride_dom, stride_don,     # [M, N] gradient of out ([M, N / 2] when GATED)
    PRE, stride_pm, stride_pn,      # [M, N] saved pre-activation, read when ACTIVATION != "none"
    W, stride_wn, stride_wk,        # [N, K] weight
    DX, stride_dxm,                 # [M, K] output: gradient of x, unit column stride
    DB, stride_dbm,                 # [ceil(M / BLOCK_M), N] ACC partial bias gradients (NEED_DB):
                                    # row i = sum of g over rows [i*BLOCK_M, (i+1)*BLOCK_M)
    M, N, K,
    seed: tl.int64, dropout_p, scale_hi, scale_lo,   # the forward's dropout (see the forward)
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_DROPOUT: tl.constexpr,   # N: the product's width
    NEED_DB: tl.constexpr,          # programs of the first K tile also write partial bias sums
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,    # dx tile [BLOCK_M, BLOCK_K]
    BLOCK_N: tl.constexpr,          # step of the reduction over N (GATED: see STEP below)
    GROUP: tl.constexpr,
):
    pid = tl.program_id(0)
    # at least one K tile: with K == 0 the programs still write the bias partial sums
    pid_m, pid_k = _tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.maximum(tl.cdiv(K, BLOCK_K), 1), GROUP)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # [BM] rows of dx
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)   # [BK] columns of dx
    scale = _dropout_scale(scale_hi, scale_lo, ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    db_row = DB + pid_m.to(tl.int64) * stride_dbm
    if GATED:
        # each step: STEP hidden columns j, the gate's gradient at product columns j and the up
        # projection's at H + j, formed once each ([BM, STEP]) and stacked side by side, against
        # weight rows j and H + j; STEP is BLOCK_N / 2 (as much g per step as a plain
        # activation) but at least 16, tl.dot's least
        STEP: tl.constexpr = BLOCK_N // 2 if BLOCK_N >= 32 else BLOCK_N
        hidden = N // 2
        offs_j = tl.arange(0, STEP)
        offs_pair = tl.arange(0, 2 * STEP)
        for start in range(0, hidden, STEP):
            j = start + offs_j
            g_gate, g_up = _gated_output_grad(DO, stride_dom, stride_don, PRE, stride_pm, stride_pn, offs_m[:, None],
                                              j[None, :], M, hidden, seed, dropout_p, scale, ACTIVATION, HAS_DROPOUT,
                                              ACC)
            if NEED_DB:
                if pid_k == 0:
                    tl.store(db_row + j, tl.sum(g_gate, axis=0), mask=j < hidden)
                    tl.store(db_row + hidden + j, tl.sum(g_up, axis=0), mask=j < hidden)
            g = _stack_columns(g_gate, g_up, BLOCK_M, STEP)                                      # [BM, 2 STEP]
            pair_cols = start + offs_pair % STEP                        # hidden column of each stacked row
            rows = pair_cols + tl.where(offs_pair >= STEP, hidden, 0)   # its weight row (gate, then up)
            w = tl.load(W + rows[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=(pair_cols[:, None] < hidden) & (offs_k[None, :] < K), other=0.0)    # [2 STEP, BK]
            acc = _dot_acc(g, w, acc, DOT_DTYPE, DOT_PRECISION, ACC)
    else:
        offs_n = tl.arange(0, BLOCK_N)
        for start in range(0, N, BLOCK_N):
            n = start + offs_n
            g = _output_grad(DO, stride_dom, stride_don, PRE, stride_pm, stride_pn, offs_m[:, None],
                             n[None, :], M, N, seed, dropout_p, scale, ACTIVATION, HAS_DROPOUT, ACC)  # [BM, BN]
            if NEED_DB:
                if pid_k == 0:
                    tl.store(db_row + n, tl.sum(g, axis=0), mask=n < N)
            # masked along K too: with K == 0 the launcher still runs one K tile for the bias sums
            w = tl.load(W + n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=(n[:, None] < N) & (offs_k[None, :] < K), other=0.0)                 # [BN, BK]
            acc = _dot_acc(g, w, acc, DOT_DTYPE, DOT_PRECISION, ACC)
    inside = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(DX + offs_m[:, None] * stride_dxm + offs_k[None, :], _rounded(acc, DX.dtype.element_ty, INTERPRET),
             mask=inside)


@triton.jit(do_not_specialize=["seed"])
def _linear_bwd_dw_kernel(
    DO, stride_dom, stride_don,     # [M, N] gradient of out ([M, N / 2] when GATED)
    PRE, stride_pm, stride_pn,      # [M, N] saved pre-activation, read when ACTIVATION != "none"
    X, stride_xm, stride_xk,        # [M, K] input
    DW, stride_dws, stride_dwn,     # [S, N, K] output, unit column stride: dW itself (S = 1, in
                                    # the weight's dtype) or S fp32 partials over row ranges
    M, N, K,
    rows_per_split,                 # split s reduces rows [s * rows_per_split, (s+1) * rows_per_split)
    seed: tl.int64, dropout_p, scale_hi, scale_lo,   # the forward's dropout (see the forward)
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_DROPOUT: tl.constexpr,   # N: the product's width
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,    # dW tile [BLOCK_N, BLOCK_K]
    BLOCK_M: tl.constexpr,          # step of the reduction over M
    GROUP: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    # GATED: a tile's BLOCK_N rows of dW are BLOCK_N / 2 gate rows j and the up rows H + j
    # (tiles across N number cdiv(N, BLOCK_N) = cdiv(H, BLOCK_N / 2) either way)
    pid_n, pid_k = _tile_coords(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)   # [BK] columns of dW
    offs_m = tl.arange(0, BLOCK_M)
    cols_k = offs_k % K
    scale = _dropout_scale(scale_hi, scale_lo, ACC)
    first = split * rows_per_split
    end = tl.minimum(first + rows_per_split, M)
    dw_split = DW + split * stride_dws
    if GATED:
        hidden = N // 2
        HALF: tl.constexpr = BLOCK_N // 2
        offs_j = pid_n.to(tl.int64) * HALF + tl.arange(0, HALF)        # [BN / 2] hidden columns
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
        for start in range(first, end, BLOCK_M):
            m = start + offs_m
            # g^T tiles [BN / 2, BM] of the gate's and the up rows (zero for m >= end), stacked
            g_gate_t, g_up_t = _gated_output_grad(DO, stride_dom, stride_don, PRE, stride_pm, stride_pn, m[None, :],
                                                  offs_j[:, None], end, hidden, seed, dropout_p, scale, ACTIVATION,
                                                  HAS_DROPOUT, ACC)
            x = tl.load(X + m[:, None] * stride_xm + cols_k[None, :] * stride_xk, mask=m[:, None] < end,
                        other=0.0)                                                                # [BM, BK]
            acc = _dot_acc(_stack_rows(g_gate_t, g_up_t, HALF, BLOCK_M), x, acc, DOT_DTYPE, DOT_PRECISION, ACC)
        r = tl.arange(0, BLOCK_N)
        pair_cols = pid_n.to(tl.int64) * HALF + r % HALF                # hidden column of each dW row of the tile
        rows = pair_cols + tl.where(r >= HALF, hidden, 0)               # the row of dW: gate, then up
        inside = (pair_cols[:, None] < hidden) & (offs_k[None, :] < K)
        tl.store(dw_split + rows[:, None] * stride_dwn + offs_k[None, :],
                 _rounded(acc, DW.dtype.element_ty, INTERPRET), mask=inside)
    else:
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)   # [BN] rows of dW
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
        for start in range(first, end, BLOCK_M):
            m = start + offs_m
            # g^T tile [BN, BM]: rows n, columns m (zero for m >= end, so splits do not overlap)
            g_t = _output_grad(DO, stride_dom, stride_don, PRE, stride_pm, stride_pn, m[None, :],
                               offs_n[:, None], end, N, seed, dropout_p, scale, ACTIVATION, HAS_DROPOUT, ACC)
            x = tl.load(X + m[:, None] * stride_xm + cols_k[None, :] * stride_xk, mask=m[:, None] < end,
                        other=0.0)                                                                # [BM, BK]
            acc = _dot_acc(g_t, x, acc, DOT_DTYPE, DOT_PRECISION, ACC)
        inside = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        tl.store(dw_split + offs_n[:, None] * stride_dwn + offs_k[None, :],
                 _rounded(acc, DW.dtype.element_ty, INTERPRET), mask=inside)


@triton.jit
def _gelu_fwd_kernel(
    X,                              # [n] contiguous input
    Y,                              # [n] contiguous output
    n,                              # number of elements
    TANH: tl.constexpr,             # torch's approximate="tanh" form, else the erf form
    ACC: tl.constexpr,              # fp32, fp64 for fp64 data
    INTERPRET: tl.constexpr,        # running in the Triton interpreter (see _rounded)
    BLOCK: tl.constexpr,            # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    if TANH:
        y = _activate(x, "gelu_tanh")
    else:
        y = _activate(x, "gelu")
    tl.store(Y + offs, _rounded(y, Y.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _gelu_bwd_kernel(
    DY,                             # [n] contiguous gradient of y
    X,                              # [n] contiguous forward input
    DX,                             # [n] contiguous output: gradient of x
    n,                              # number of elements
    TANH: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr,  # as in the forward
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    if TANH:
        dx = dy * _activation_grad(x, "gelu_tanh")
    else:
        dx = dy * _activation_grad(x, "gelu")
    tl.store(DX + offs, _rounded(dx, DX.dtype.element_ty, INTERPRET), mask=mask)


# ---------------------------------------------------------------------------------------------
# Configurations


class Tile(NamedTuple):
    """One autotune configuration, in the forward's names: output tile [rows, cols] =
    [BLOCK_M, BLOCK_N], reduction step BLOCK_K. The backward kernels reuse the shape with their own
    output tile ([M, K] for dx, [N, K] for dW) and reduction step."""
    rows: int
    cols: int
    step: int
    warps: int
    stages: int
    split: int = 1   # forward EPILOGUE_SPLIT: column slices of an epilogue with activation/dropout


# One set of lists for every GPU target: a config is compiled for sm80, sm90 and gfx942 alike, and
# gfx942 gives a block 64 KB of shared memory, so every config's pipelined operand buffers,
# (rows*step + step*cols) * bytes * stages, stay at or below 48 KB. Tensor-core configs keep the
# row tile a multiple of 64 per 4 warps (a warpgroup), which sm90's wgmma needs. The lists were
# chosen with `python -m engine.readiness --kernels linear` (no spills on any target):
# - forward tiles with 64 accumulator elements per thread run an activation/dropout epilogue in 4
#   column slices (whole, it spills on sm80/sm90);
# - backward programs also hold the g tile [rows, step] they compute each step, so their 128x64
#   tile takes 8 warps (with 4 it spills on sm80/sm90) and their 64x64 tile a K step of 32
#   (with 64, gelu_tanh + dropout spills on gfx942);
# - fp32 (ieee) products are FMA loops holding operand slices in registers: small K steps and
#   tiles, which do not spill anywhere.
_TENSOR_CORE_TILES = {
    "fwd": (Tile(128, 128, 32, 8, 3, split=4), Tile(128, 64, 32, 4, 4, split=4),
            Tile(64, 128, 32, 4, 4, split=4), Tile(64, 64, 64, 4, 3, split=1)),
    "bwd": (Tile(128, 128, 32, 8, 3), Tile(128, 64, 32, 8, 3), Tile(64, 128, 32, 4, 4), Tile(64, 64, 32, 4, 3)),
}
_FP32_TILES = (Tile(64, 64, 16, 8, 3), Tile(32, 64, 16, 4, 3))
_GROUP = 8
# The single configuration of the interpreter (autotuning needs a GPU): tiles large enough to keep
# the number of program instances (~1 ms each) small; the epilogue split exercises the slicing.
_INTERPRETER_TILE = Tile(64, 64, 128, 4, 1, split=4)
_INTERPRETER_GROUP = 4


def _tiles_for(dtype: torch.dtype, kind: str):
    """GPU configs of a dtype for kind "fwd", "dx" or "dw" (fp64 products run in the interpreter
    only: see supports)."""
    if dtype in (torch.float16, torch.bfloat16):
        return _TENSOR_CORE_TILES["fwd" if kind == "fwd" else "bwd"]
    return _FP32_TILES


# Names of each kernel's output-tile and reduction constexprs, in the order of the tile tuples.
_TILE_NAMES = {
    "fwd": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    "dx": ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
    "dw": ("BLOCK_N", "BLOCK_K", "BLOCK_M"),
}


def _config(kind: str, tile: Tile, group: int) -> triton.Config:
    names = _TILE_NAMES[kind]
    kwargs = {names[0]: tile.rows, names[1]: tile.cols, names[2]: tile.step, "GROUP": group}
    if kind == "fwd":
        kwargs["EPILOGUE_SPLIT"] = tile.split
    return triton.Config(kwargs, num_warps=tile.warps, num_stages=tile.stages)


def _configs(kind: str) -> list:
    if INTERPRET:
        return [_config(kind, _INTERPRETER_TILE, _INTERPRETER_GROUP)]
    tiles = _TENSOR_CORE_TILES["fwd" if kind == "fwd" else "bwd"] + _FP32_TILES
    return [_config(kind, t, _GROUP) for t in dict.fromkeys(tiles)]


def _prune(kind: str, pointer_name: str, size_names: tuple):
    """early_config_prune: keep the tiles of the operands' dtype, and drop tiles much larger than
    the output (a [16, N] product does not need 128-row tiles); at least one config remains."""
    names = _TILE_NAMES[kind]

    def prune(configs, named_args, **kwargs):
        dtype = named_args[pointer_name].dtype
        allowed = {t[:5] for t in _tiles_for(dtype, kind)}
        mine = [c for c in configs
                if (c.kwargs[names[0]], c.kwargs[names[1]], c.kwargs[names[2]], c.num_warps, c.num_stages)
                in allowed]
        if not mine:
            raise ValueError(f"no {kind} config for {dtype} on a GPU (supports() rejects this call)")
        rows, cols = (named_args[s] for s in size_names)
        smallest_rows = min(c.kwargs[names[0]] for c in mine)
        smallest_cols = min(c.kwargs[names[1]] for c in mine)
        fitting = [c for c in mine
                   if c.kwargs[names[0]] <= max(triton.next_power_of_2(rows), smallest_rows)
                   and c.kwargs[names[1]] <= max(triton.next_power_of_2(cols), smallest_cols)]
        return fitting or mine

    return prune


_EPILOGUE_KEY = ["ACTIVATION", "GATED", "HAS_BIAS", "HAS_RESIDUAL", "HAS_DROPOUT", "STORE_PRE"]
_linear_fwd = triton.autotune(
    configs=_configs("fwd"), key=["M", "N", "K"] + _EPILOGUE_KEY,
    prune_configs_by={"early_config_prune": _prune("fwd", "X", ("M", "N"))})(_linear_fwd_kernel)
_linear_bwd_dx = triton.autotune(
    configs=_configs("dx"), key=["M", "N", "K", "ACTIVATION", "GATED", "HAS_DROPOUT", "NEED_DB"],
    prune_configs_by={"early_config_prune": _prune("dx", "W", ("M", "K"))})(_linear_bwd_dx_kernel)
_linear_bwd_dw = triton.autotune(
    configs=_configs("dw"), key=["M", "N", "K", "ACTIVATION", "GATED", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _prune("dw", "X", ("N", "K"))})(_linear_bwd_dw_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_dtype(dtype: torch.dtype):
    """tl.dot operand dtype: the data's own on GPU; in the interpreter fp32 for 16-bit data (its
    16-bit arithmetic is wrong) and fp64 for fp32 and fp64 data (see _dot_acc)."""
    if INTERPRET:
        return tl.float32 if dtype in (torch.float16, torch.bfloat16) else tl.float64
    return _TL[dtype]


def _dropout_args(dropout_p: float) -> tuple[float, float, float]:
    """(p, scale_hi, scale_lo) with scale_hi + scale_lo = 1 / (1 - p) to ~48 bits."""
    scale = 1.0 / (1.0 - dropout_p)
    hi = float(np.float32(scale))
    return float(dropout_p), hi, float(np.float32(scale - hi))


def _stride(t: torch.Tensor, dim: int) -> int:
    """t.stride(dim), 0 for a dim of size 1 (any stride is valid there, and 0 keeps Triton's
    divisibility specialization meaningful)."""
    return t.stride(dim) if t.shape[dim] > 1 else 0


def supports(args) -> list[str]:
    """[] when linear_fwd/linear_bwd can run the call (engine.ops.linear.LinearArgs), else every
    reason they cannot."""
    x, weight = args.x, args.weight
    reasons = dtype_reason(x.dtype, DTYPES)
    if x.dtype == torch.float64 and x.device.type != "cpu":
        # fp64 runs in the interpreter (float64 gradcheck). On a GPU its erf/Philox epilogue and
        # prologue spill at every tile tried (gfx942, sm80), and fp64 products are cuBLAS's job.
        reasons.append("float64 products are not compiled for GPUs (the reference backend serves them)")
    if weight.dtype != x.dtype:
        reasons.append(f"weight dtype {weight.dtype} differs from input dtype {x.dtype} (tl.dot needs one operand type)")
    if args.activation not in ACTIVATIONS and args.activation not in GATED_ACTIVATIONS:
        reasons.append(f"activation {args.activation!r} is not one of {ACTIVATIONS + tuple(GATED_ACTIVATIONS)}")
    if max(x.shape[0], weight.shape[0]) >= 2**31 or weight.shape[1] >= 2**31:
        reasons.append("a dimension >= 2^31 (program ids and dropout counters are 32-bit)")
    if x.device.type != "cpu" and _spills_on_gpus(x.dtype, args.activation, args.dropout_p > 0):
        reasons.append("fp32 gated activations with dropout are not compiled for GPUs: their dW kernel spills on "
                       "sm90 (python -m engine.readiness); the cuda backend serves them")
    return reasons


def _spills_on_gpus(dtype: torch.dtype, activation: str, dropout: bool) -> bool:
    """The one combination supports declines on a GPU and gpu_compile_cases leaves out: an fp32
    gated activation with dropout (the dW kernel at the fp32 64x64x16 w8 tile spilled 8 B on sm90
    under triton 3.9 with the gate/up rows stacked, and with two accumulators instead the 16-bit
    tiles lost their tensor cores)."""
    return dtype == torch.float32 and activation in GATED_ACTIVATIONS and dropout


def supports_gelu(args) -> list[str]:
    """[] when gelu_fwd/gelu_bwd can run the call (engine.ops.linear.GeluArgs), else why not."""
    reasons = dtype_reason(args.x.dtype, DTYPES)
    if args.approximate not in ("none", "tanh"):
        reasons.append(f"approximate {args.approximate!r} is not 'none' or 'tanh'")
    return reasons


def linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
               dropout_p: float, seed: int, residual: Optional[torch.Tensor], return_dropout_mask: bool):
    """out = dropout(act(x @ weight^T + bias)) + residual in one tiled product with a fused epilogue.

    x [M, K] (unit column stride, any row stride); weight [N, K] (any strides); bias [N] or None;
    activation one of ACTIVATIONS or GATED_ACTIVATIONS; dropout_p in [0, 1) with its 64-bit
    seed. The output width H is N, or N / 2 when gated (weight: gate rows, then up rows);
    residual [M, H] or None. Returns (out [M, H] contiguous in x's dtype, pre-activation
    x @ W^T + b [M, N] in x's dtype when activation != "none" else None, bool keep mask [M, H]
    when return_dropout_mask and dropout_p > 0 else None)."""
    m, k = x.shape
    n = weight.shape[0]
    gated = activation in GATED_ACTIVATIONS
    width = n // 2 if gated else n
    has_dropout = dropout_p > 0
    store_pre = activation != "none"
    store_mask = has_dropout and return_dropout_mask
    out = torch.empty((m, width), dtype=x.dtype, device=x.device)
    pre = torch.empty((m, n), dtype=x.dtype, device=x.device) if store_pre else None
    keep = torch.empty((m, width), dtype=torch.uint8, device=x.device) if store_mask else None
    if m == 0 or n == 0:
        return out, pre, (keep.bool() if keep is not None else None)
    p, scale_hi, scale_lo = _dropout_args(dropout_p if has_dropout else 0.0)
    def grid(meta):
        out_cols = meta["BLOCK_N"] // 2 if gated else meta["BLOCK_N"]
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(width, out_cols),)
    _linear_fwd[grid](
        x, _stride(x, 0), _stride(x, 1),
        weight, _stride(weight, 0), _stride(weight, 1),
        bias if bias is not None else x, _stride(bias, 0) if bias is not None else 0,
        residual if residual is not None else x,
        _stride(residual, 0) if residual is not None else 0, _stride(residual, 1) if residual is not None else 0,
        out, pre if pre is not None else out, keep if keep is not None else out, width,
        m, width, k,
        int(seed), p, scale_hi, scale_lo,
        ACTIVATION=GATED_ACTIVATIONS.get(activation, activation), GATED=gated, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        HAS_DROPOUT=has_dropout, STORE_PRE=store_pre, STORE_MASK=store_mask,
        DOT_DTYPE=_dot_dtype(x.dtype), DOT_PRECISION="ieee", ACC=_acc(x.dtype), INTERPRET=INTERPRET,
    )
    return out, pre, (keep.view(torch.bool) if keep is not None else None)


def _weight_grad_splits(m: int, n: int, k: int, device: torch.device) -> int:
    """How many ways the dW reduction over M is split: enough programs to fill the GPU when the
    [N, K] output has few tiles and M is long; 1 in the interpreter."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(n, 128) * triton.cdiv(k, 128)
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), m // 1024, 16))


def linear_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
               pre_activation: Optional[torch.Tensor], activation: str, dropout_p: float, seed: int,
               need_weight_grad: bool, need_bias_grad: bool, *, weight_grad_splits: Optional[int] = None):
    """Gradients of linear_fwd; g = grad_out * keep / (1 - p) * act'(pre) is formed on each loaded
    tile inside the product kernels (never stored).

    grad_out [M, H] (any strides; H = N, or N / 2 for a gated activation); x [M, K] (unit column
    stride); weight [N, K] (any strides); pre_activation [M, N] (needed when activation != "none"). weight_grad_splits: how many row
    ranges the dW reduction is split into (default: chosen from the GPU's size; for tests).
    Returns (dx [M, K] contiguous in x's dtype, dweight [N, K] or None, dbias [N] or None, both in
    the weight's dtype); the residual's gradient is grad_out itself."""
    m, k = x.shape
    n = weight.shape[0]
    dx = torch.empty((m, k), dtype=x.dtype, device=x.device)
    has_dropout = dropout_p > 0
    p, scale_hi, scale_lo = _dropout_args(dropout_p if has_dropout else 0.0)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    act = GATED_ACTIVATIONS.get(activation, activation)
    pre = pre_activation if act != "none" else grad_out
    common = dict(ACTIVATION=act, GATED=activation in GATED_ACTIVATIONS, HAS_DROPOUT=has_dropout,
                  DOT_DTYPE=_dot_dtype(x.dtype), DOT_PRECISION="ieee", ACC=_acc(x.dtype), INTERPRET=INTERPRET)
    if m == 0 or n == 0:
        dx.zero_()
        dweight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_weight_grad else None
        dbias = torch.zeros(n, dtype=weight.dtype, device=x.device) if need_bias_grad else None
        return dx, dweight, dbias

    # dx = g @ W over [BLOCK_M, BLOCK_K] tiles; the first K tile's programs also sum g over their
    # rows into one row each of a partial bias buffer. It is sized for the smallest BLOCK_M of any
    # config; only the rows of the config that ran (the autotuner's best) are summed, since
    # benchmarking other configs may have written the rest.
    min_block_m = min(c.kwargs["BLOCK_M"] for c in _linear_bwd_dx.configs)
    db_partial = (torch.empty((triton.cdiv(m, min_block_m), n), dtype=acc_dtype, device=x.device)
                  if need_bias_grad else None)
    def dx_grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * max(1, triton.cdiv(k, meta["BLOCK_K"])),)
    _linear_bwd_dx[dx_grid](
        grad_out, _stride(grad_out, 0), _stride(grad_out, 1),
        pre, _stride(pre, 0), _stride(pre, 1),
        weight, _stride(weight, 0), _stride(weight, 1),
        dx, k,
        db_partial if db_partial is not None else dx, n,
        m, n, k,
        int(seed), p, scale_hi, scale_lo,
        NEED_DB=need_bias_grad, **common,
    )
    dbias = None
    if need_bias_grad:
        rows = triton.cdiv(m, _linear_bwd_dx.best_config.kwargs["BLOCK_M"])
        dbias = db_partial[:rows].sum(0).to(weight.dtype)

    dweight = None
    if need_weight_grad:
        splits = weight_grad_splits or _weight_grad_splits(m, n, k, x.device)
        splits = max(1, min(splits, m))
        rows_per_split = triton.cdiv(m, splits)
        splits = triton.cdiv(m, rows_per_split)
        target = (torch.empty((n, k), dtype=weight.dtype, device=x.device) if splits == 1
                  else torch.empty((splits, n, k), dtype=torch.float32 if acc_dtype == torch.float32 else acc_dtype,
                                   device=x.device))
        def dw_grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]), splits)
        if k > 0:
            _linear_bwd_dw[dw_grid](
                grad_out, _stride(grad_out, 0), _stride(grad_out, 1),
                pre, _stride(pre, 0), _stride(pre, 1),
                x, _stride(x, 0), _stride(x, 1),
                target, n * k if splits > 1 else 0, k,
                m, n, k, rows_per_split,
                int(seed), p, scale_hi, scale_lo,
                **common,
            )
        dweight = target if splits == 1 else target.sum(0).to(weight.dtype)
    return dx, dweight, dbias


def gelu_fwd(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """GeLU of a contiguous x (any shape): erf form (approximate="none") or tanh form, computed in
    fp32 (fp64 for fp64 data). Returns y like x (contiguous)."""
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n:
        _gelu_fwd_kernel[(triton.cdiv(n, GELU_BLOCK),)](
            x, y, n, TANH=approximate == "tanh", ACC=_acc(x.dtype), INTERPRET=INTERPRET, BLOCK=GELU_BLOCK,
            num_warps=GELU_WARPS)
    return y


def gelu_bwd(grad_y: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """Gradient of gelu_fwd: grad_y * gelu'(x), grad_y and x of one shape. Returns dx like x."""
    x = x.contiguous()
    grad_y = grad_y.contiguous()
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n:
        _gelu_bwd_kernel[(triton.cdiv(n, GELU_BLOCK),)](
            grad_y, x, dx, n, TANH=approximate == "tanh", ACC=_acc(x.dtype), INTERPRET=INTERPRET, BLOCK=GELU_BLOCK,
            num_warps=GELU_WARPS)
    return dx


# ---------------------------------------------------------------------------------------------
# Ahead-of-time GPU compile cases (engine/readiness.py)


def gpu_compile_cases() -> list[GpuCompileCase]:
    """Every configuration the launchers compile on a GPU, at a GPT-2 FFN shape (M=4096, K=768,
    N=3072; real calls with sizes that are multiples of 16 specialize the same way), for fp16,
    bf16 (tensor cores required) and fp32:
    - forward, each autotune config: the plain epilogue, and the heaviest (bias + gelu, gelu_tanh
      or swiglu + dropout + residual, storing the pre-activation and the mask); at the first
      config also bias + relu, bias + silu and bias + geglu_tanh (gated: N / 2 outputs);
    - backward dx and dW, each config: gelu, gelu_tanh and swiglu + dropout (dx also writing the
      bias partials); at the first config also the plain variant, relu, silu and geglu;
    - gelu forward/backward, erf and tanh forms (also fp64, which they support on a GPU).
    fp32 gated activations with dropout are left out: supports declines them on GPUs (_spills_on_gpus)."""
    m, k, n = 4096, 768, 3072
    seed, p, scale_hi, scale_lo = 2**40 + 12345, 0.1, 1.1111111, 1e-9
    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        dname = str(dtype).removeprefix("torch.")
        common = dict(DOT_DTYPE=_TL[dtype], DOT_PRECISION="ieee", ACC=tl.float32, INTERPRET=False)
        tc = dtype != torch.float32
        for i, tile in enumerate(_tiles_for(dtype, "fwd")):
            cfg = _config("fwd", tile, _GROUP)
            variants = {  # name: (activation, bias, dropout, residual)
                "plain": ("none", False, False, False),
                "bias+gelu+dropout+residual": ("gelu", True, True, True),
                "bias+gelu_tanh+dropout+residual": ("gelu_tanh", True, True, True),
                "bias+swiglu+dropout+residual": ("swiglu", True, True, True)}
            if i == 0:
                variants.update({"bias+relu": ("relu", True, False, False), "bias+silu": ("silu", True, False, False),
                                 "bias+geglu_tanh": ("geglu_tanh", True, False, False)})
            for vname, (act, bias, dropout, residual) in variants.items():
                if _spills_on_gpus(dtype, act, dropout):
                    continue
                width = n // 2 if act in GATED_ACTIVATIONS else n
                cases.append(GpuCompileCase(
                    name=f"linear_fwd {dname} {_tile_name(tile)} {vname}",
                    kernel=_linear_fwd_kernel,
                    args=(dtype, k, 1, dtype, k, 1, dtype, 1, dtype, width, 1, dtype, dtype, torch.uint8, width,
                          m, width, k, seed, p, scale_hi, scale_lo),
                    constexprs=dict(ACTIVATION=GATED_ACTIVATIONS.get(act, act), GATED=act in GATED_ACTIVATIONS,
                                    HAS_BIAS=bias, HAS_RESIDUAL=residual, HAS_DROPOUT=dropout,
                                    STORE_PRE=act != "none", STORE_MASK=dropout, **common, **cfg.kwargs),
                    grid=(triton.cdiv(m, tile.rows) * triton.cdiv(n, tile.cols),),
                    num_warps=tile.warps, num_stages=tile.stages, expects_tensor_cores=tc))
        for i, tile in enumerate(_tiles_for(dtype, "dx")):
            variants = {"gelu+dropout": ("gelu", True), "gelu_tanh+dropout": ("gelu_tanh", True),
                        "swiglu+dropout": ("swiglu", True)}
            if i == 0:
                variants.update({"plain": ("none", False), "relu": ("relu", False), "silu": ("silu", False),
                                 "geglu": ("geglu", False)})
            for vname, (act, dropout) in variants.items():
                if _spills_on_gpus(dtype, act, dropout):
                    continue
                grad_width = n // 2 if act in GATED_ACTIVATIONS else n   # grad_out's row stride
                epilogue = dict(ACTIVATION=GATED_ACTIVATIONS.get(act, act), GATED=act in GATED_ACTIVATIONS,
                                HAS_DROPOUT=dropout)
                dx = _config("dx", tile, _GROUP)
                cases.append(GpuCompileCase(
                    name=f"linear_bwd_dx {dname} {_tile_name(tile)} {vname}{'+bias' if act != 'none' else ''}",
                    kernel=_linear_bwd_dx_kernel,
                    args=(dtype, grad_width, 1, dtype, n, 1, dtype, k, 1, dtype, k, torch.float32, n,
                          m, n, k, seed, p, scale_hi, scale_lo),
                    constexprs=dict(**epilogue, NEED_DB=act != "none", **common, **dx.kwargs),
                    grid=(triton.cdiv(m, tile.rows) * triton.cdiv(k, tile.cols),),
                    num_warps=tile.warps, num_stages=tile.stages, expects_tensor_cores=tc))
                dw = _config("dw", tile, _GROUP)
                cases.append(GpuCompileCase(
                    name=f"linear_bwd_dw {dname} {_tile_name(tile)} {vname}",
                    kernel=_linear_bwd_dw_kernel,
                    args=(dtype, grad_width, 1, dtype, n, 1, dtype, k, 1, dtype, 0, k,
                          m, n, k, m, seed, p, scale_hi, scale_lo),
                    constexprs=dict(**epilogue, **common, **dw.kwargs),
                    grid=(triton.cdiv(n, tile.rows) * triton.cdiv(k, tile.cols), 1),
                    num_warps=tile.warps, num_stages=tile.stages, expects_tensor_cores=tc))
    for dtype in DTYPES:
        dname = str(dtype).removeprefix("torch.")
        for tanh in (False, True):
            form = "tanh" if tanh else "erf"
            constexprs = dict(TANH=tanh, ACC=_acc(dtype), INTERPRET=False, BLOCK=GELU_BLOCK)
            grid = (triton.cdiv(m * n, GELU_BLOCK),)
            cases.append(GpuCompileCase(name=f"gelu_fwd {dname} {form}", kernel=_gelu_fwd_kernel,
                                        args=(dtype, dtype, m * n), constexprs=constexprs, grid=grid,
                                        num_warps=GELU_WARPS))
            cases.append(GpuCompileCase(name=f"gelu_bwd {dname} {form}", kernel=_gelu_bwd_kernel,
                                        args=(dtype, dtype, dtype, m * n), constexprs=constexprs, grid=grid,
                                        num_warps=GELU_WARPS))
    return cases


def _tile_name(tile: Tile) -> str:
    return f"{tile.rows}x{tile.cols}x{tile.step} w{tile.warps} s{tile.stages}"
