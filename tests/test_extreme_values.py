"""Extreme but finite inputs, and inf / NaN, through every op on every backend (issue 11).

What is true is computed in float64 on inputs scaled where that matters: layer norm is
scale-invariant (LN(v) = LN(v / a) with eps / a^2), so the float64 oracle normalizes rows of
|v| up to 3.4e38 (whose squares overflow fp32, and where torch's own layer norm gives NaN) and
rows of 1e-30 with eps = 0 (whose squares underflow fp32) exactly. Elsewhere torch's float64
result is the truth. inf and NaN must come out where torch puts them (torch float64); for
attention, between torch's math over each row's visible keys and its dense math (see
assert_nan_and_inf_between).

Shapes are tiny: on CI the Triton kernels run in the interpreter on 2 cores.
"""
import pytest
import torch
import torch.nn.functional as F

import engine.functional as EF
from conftest import backend_device_pairs, skip_unless_runs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Allowed error of O(1) results, relative to the result's scale: a few roundings of the dtype.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

NORMS = {  # name: (has_residual, rms)
    "layer_norm": (False, False),
    "rms_norm": (False, True),
    "add_layer_norm": (True, False),
    "add_rms_norm": (True, True),
}


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def smallest_subnormal(dtype):
    return torch.finfo(dtype).tiny * torch.finfo(dtype).eps


def bf16_subnormals_mangled(backend, device, dtype):
    """The Triton interpreter (3.9) converts bf16 subnormals to and from fp32 wrongly (1e-39 ->
    4.2e-39 both ways; a GPU converts them exactly), so those values are checked on GPUs only."""
    return backend == "triton" and device == "cpu" and dtype == torch.bfloat16


def run_norm(name, v, w, b, eps, backend):
    """The engine's norm of v (x = v and residual = 0 for the add variants, whose stored sum is
    v again); returns (y, x: a leaf, for the gradient of v)."""
    has_residual, rms = NORMS[name]
    n = v.shape[-1]
    v = v.detach().requires_grad_()
    if has_residual:
        if rms:
            y, total = EF.add_rms_norm(v, torch.zeros_like(v), (n,), w, eps, backend=backend)
        else:
            y, total = EF.add_layer_norm(v, torch.zeros_like(v), (n,), w, b, eps, backend=backend)
        torch.testing.assert_close(total, v.detach(), rtol=0, atol=0, equal_nan=True, msg="sum != x + 0")
        return y, v
    if rms:
        return EF.rms_norm(v, (n,), w, eps, backend=backend), v
    return EF.layer_norm(v, (n,), w, b, eps, backend=backend), v


def norm64(name, v, w, b, eps):
    """The true norm of the rows of v in float64, computed on v / max|v| with eps / max|v|^2 (the
    same value: no overflow, no underflow); differentiable in v, w and b."""
    _, rms = NORMS[name]
    top = v.detach().abs().amax(-1, keepdim=True)
    s = v / top
    centered = s if rms else s - s.mean(-1, keepdim=True)
    y = centered / torch.sqrt(centered.square().mean(-1, keepdim=True) + eps / top**2)
    if w is not None:
        y = y * w
    if b is not None and not rms:
        y = y + b
    return y


def assert_close(actual, expected, scale, dtype, name):
    """|actual - expected| <= tolerance * scale + 2 subnormal steps of the dtype (results near
    dtype's underflow, like dx ~ 3e-39 of a row of 3e38, have only the subnormals' digits)."""
    actual = actual.double()
    bound = TOLERANCE[dtype] * scale + 2 * smallest_subnormal(dtype)
    error = (actual - expected).abs()
    assert torch.isfinite(actual).all(), f"{name}: {actual}"
    assert (error <= bound).all(), f"{name}: max error {(error / bound).max():.3g} x allowed\n{actual}\n{expected}"


def check_norm(name, v, eps, dtype, backend, device, backward=True, check_dx=True):
    """The engine's norm of v [M, N] (dtype) with a weight and bias, and its gradients (dx
    unless not check_dx), against norm64's."""
    g = torch.Generator().manual_seed(1)
    n = v.shape[-1]
    w = (torch.randn(n, generator=g) + 1).to(dtype=dtype, device=device).requires_grad_()
    b = torch.randn(n, generator=g).to(dtype=dtype, device=device).requires_grad_()
    dy = torch.randn(v.shape, generator=g).to(dtype=dtype, device=device)
    _, rms = NORMS[name]
    y, leaf = run_norm(name, v, w, None if rms else b, eps, backend)
    v64, w64, b64 = (t.detach().double().requires_grad_() for t in (v, w, b))
    y64 = norm64(name, v64, w64, None if rms else b64, eps)
    assert_close(y, y64.detach(), 4.0, dtype, "y")
    if not backward:
        return
    inputs = (leaf, w) if rms else (leaf, w, b)
    grads = torch.autograd.grad(y, inputs, dy)
    grads64 = torch.autograd.grad(y64, (v64, w64) if rms else (v64, w64, b64), dy.double())
    # dx is of the order of |dy w| / std: compare it at that scale, row by row
    centered = v64 if rms else v64 - v64.mean(-1, keepdim=True)
    top = v64.detach().abs().amax(-1, keepdim=True)
    std = ((centered / top).square().mean(-1, keepdim=True) + eps / top**2).sqrt() * top
    dx_scale = 8.0 / std.detach()
    if check_dx:
        assert_close(grads[0], grads64[0], dx_scale, dtype, "dx")
    rows = v.shape[0]
    assert_close(grads[1], grads64[1], 4.0 * rows, dtype, "dweight")
    if not rms:
        assert_close(grads[2], grads64[2], 4.0 * rows, dtype, "dbias")


def huge_rows(dtype, device):
    """Rows whose squares overflow fp32 (|v| up to 0.95 of the dtype's max; fp16's squares fit):
    random values scaled to the max, a row where x - mean overflows (mean = -max/2, one element
    +max), and random values of 1e25 (the issue's example; 3e4 in fp16)."""
    big = 0.95 * torch.finfo(dtype).max
    g = torch.Generator().manual_seed(0)
    random = torch.randn(8, generator=g)
    lopsided = torch.full((8,), -1.0)
    lopsided[3] = 1.0
    moderate = 1e25 if dtype != torch.float16 else 3e4
    rows = torch.stack([random / random.abs().max() * big, lopsided * big,
                        torch.randn(8, generator=g) * moderate])
    return rows.to(dtype=dtype, device=device)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("name", NORMS)
def test_norm_of_rows_near_the_dtype_max(name, dtype, backend, device):
    """Forward and backward of rows up to 0.95 * max: was zeros (rstd = 1 / sqrt(inf)) on every
    backend for fp32 and bf16, NaN where x - mean overflowed. (dx ~ 1e-39 is subnormal.)"""
    skip_unless_runs(backend, device)
    check_norm(name, huge_rows(dtype, device), 1e-5, dtype, backend, device,
               check_dx=not bf16_subnormals_mangled(backend, device, dtype))


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("name", ["layer_norm", "add_rms_norm"])
def test_norm_of_wide_rows_near_the_dtype_max(name, backend, device):
    """Rows of 8200, wider than Triton's register-held rows (8192 forward, 4096 backward: the
    chunked loops) and than the CPU kernel's 64 vector lanes; fp32 up to 0.95 * max."""
    skip_unless_runs(backend, device)
    g = torch.Generator().manual_seed(5)
    random = torch.randn(8200, generator=g)
    lopsided = torch.full((8200,), -1.0)
    lopsided[::7] = 1.0
    v = torch.stack([random / random.abs().max(), lopsided]) * (0.95 * torch.finfo(torch.float32).max)
    check_norm(name, v.to(device), 1e-5, torch.float32, backend, device)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("name", NORMS)
def test_norm_of_tiny_rows_without_eps(name, dtype, backend, device):
    """eps = 0 and rows of 1e-30 (squares 1e-60: zero in fp32; 1e-3 in fp16, whose small values
    square fine): normalized values, not 0 / 0. Forward and backward (dx ~ 1e30)."""
    skip_unless_runs(backend, device)
    g = torch.Generator().manual_seed(2)
    scale = 1e-3 if dtype == torch.float16 else 1e-30
    v = (torch.randn(2, 8, generator=g) * scale).to(dtype=dtype, device=device)
    check_norm(name, v, 0.0, dtype, backend, device)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize("name", NORMS)
def test_norm_of_subnormal_rows(name, eps, dtype, backend, device):
    """Rows of the dtype's subnormals: with eps = 0 normalized values; with eps = 1e-5 the true
    ~v / sqrt(eps), which is ~0 (forward only: with eps = 0, dx ~ 1 / 1e-40 overflows)."""
    skip_unless_runs(backend, device)
    if bf16_subnormals_mangled(backend, device, dtype):
        pytest.skip("the Triton interpreter converts bf16 subnormals wrongly (checked on GPUs)")
    g = torch.Generator().manual_seed(3)
    v = (torch.randn(2, 8, generator=g) * torch.finfo(dtype).tiny / 4).to(dtype=dtype, device=device)
    assert (v.abs() < torch.finfo(dtype).tiny).all() and (v != 0).any()
    check_norm(name, v, eps, dtype, backend, device, backward=False)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("name", NORMS)
def test_norm_propagates_inf_and_nan_as_torch(name, dtype, backend, device):
    """Rows holding NaN, +inf, -inf and +-inf: NaN / inf exactly where torch's float64 norm puts
    them (layer norm: the whole row NaN; RMS norm: NaN at the inf, 0 elsewhere), other rows
    untouched; and dx NaN in the rows where torch's is."""
    skip_unless_runs(backend, device)
    g = torch.Generator().manual_seed(4)
    v = torch.randn(5, 8, generator=g)
    v[1, 2] = float("nan")
    v[2, 5] = float("inf")
    v[3, 0] = -float("inf")
    v[4, 1], v[4, 6] = float("inf"), -float("inf")
    v = v.to(dtype=dtype, device=device)
    _, rms = NORMS[name]
    y, leaf = run_norm(name, v, None, None, 1e-5, backend)
    v64 = v.double().requires_grad_()
    y64 = F.rms_norm(v64, (8,), eps=1e-5) if rms else F.layer_norm(v64, (8,), eps=1e-5)
    assert torch.equal(torch.isnan(y), torch.isnan(y64)), f"NaN at\n{torch.isnan(y)}\ntorch:\n{torch.isnan(y64)}"
    assert torch.equal(torch.isinf(y), torch.isinf(y64))
    finite = torch.isfinite(y64)
    assert_close(y[finite], y64[finite].detach(), 4.0, dtype, "y")
    dy = torch.ones_like(y)
    dx, = torch.autograd.grad(y, leaf, dy)
    dx64, = torch.autograd.grad(y64, v64, dy.double())
    assert torch.equal(torch.isnan(dx).any(-1), torch.isnan(dx64).any(-1))


# ---------------------------------------------------------------------------------------------
# Activations: plain GeLU, and the fused epilogue of linear and feed_forward

ACTIVATIONS = {  # the linear op's activation: the torch float64 function
    "none": lambda x: x,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def extreme_column(dtype, backend, device):
    """[M, 1]: -+0.95 max, -+1e5 (1e4 in fp16), the GeLUs' transition region, subnormals (but see
    bf16_subnormals_mangled), zeros."""
    big = 0.95 * torch.finfo(dtype).max
    far = 1e4 if dtype == torch.float16 else 1e5
    sub = 0.0 if bf16_subnormals_mangled(backend, device, dtype) else 3 * smallest_subnormal(dtype)
    values = [-big, -far, -25.0, -10.0, -3.0, -0.75, -sub, -0.0, 0.0, sub, 0.75, 3.0, 10.0, 25.0, far, big]
    return torch.tensor(values, dtype=torch.float64).to(dtype=dtype, device=device)[:, None]


def assert_close_relative(actual, expected, dtype, name):
    """assert_close at the scale of each element (|expected| + 1): relative for large results."""
    assert_close(actual, expected, expected.abs() + 1.0, dtype, name)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_at_the_dtype_extremes(approximate, dtype, backend, device):
    """EF.gelu and its slope in each dtype from -max to max: -0 / 0 far left, x / 1 far right (the
    tanh form gave -5414.5 at -3e38 on triton), as torch computes it in float64."""
    skip_unless_runs(backend, device)
    x = extreme_column(dtype, backend, device)[:, 0].requires_grad_()
    y = EF.gelu(x, approximate, backend=backend)
    slope, = torch.autograd.grad(y.sum(), x)
    x64 = x.detach().double().requires_grad_()
    y64 = F.gelu(x64, approximate=approximate)
    slope64, = torch.autograd.grad(y64.sum(), x64)
    assert_close_relative(y, y64.detach(), dtype, "gelu")
    assert_close_relative(slope, slope64, dtype, "gelu'")


def linear64(x, w, b, activation):
    return ACTIVATIONS[activation](F.linear(x.double(), w.double(), b.double()))


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_epilogue_at_the_dtype_extremes(activation, dtype, backend, device):
    """linear(x, w, b, activation) whose pre-activations run from -max to max (w = [1, 1/2]^T,
    b = 0), forward and backward (dx and dw through the activation's slope; dy = sign(x) / 4 so
    that dw's sum of terms up to max / 4 does not cancel)."""
    skip_unless_runs(backend, device)
    x = extreme_column(dtype, backend, device).requires_grad_()
    w = torch.tensor([[1.0], [0.5]], dtype=dtype, device=device, requires_grad=True)
    b = torch.zeros(2, dtype=dtype, device=device, requires_grad=True)
    y = EF.linear(x, w, b, None if activation == "none" else activation, backend=backend)
    dy = (torch.sign(x.detach()) / 4).expand(-1, 2).contiguous()
    grads = torch.autograd.grad(y, (x, w, b), dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = linear64(*leaves64, activation)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    assert_close_relative(y, y64.detach(), dtype, "y")
    for name, grad, grad64 in zip(["dx", "dw", "db"], grads, grads64):
        assert_close_relative(grad, grad64, dtype, name)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_feed_forward_at_the_dtype_extremes(activation, dtype, backend, device):
    """feed_forward with hidden pre-activations from -max to max (w1 = I, w2 = [1/2, 1/2]):
    out = act(x) / 2 (+ 0), forward and dx, as torch float64."""
    skip_unless_runs(backend, device)
    column = extreme_column(dtype, backend, device)
    x = torch.cat([column, torch.zeros_like(column)], 1).requires_grad_()
    w1 = torch.eye(2, dtype=dtype, device=device)
    w2 = torch.full((1, 2), 0.5, dtype=dtype, device=device)
    b1, b2 = torch.zeros(2, dtype=dtype, device=device), torch.zeros(1, dtype=dtype, device=device)
    out = EF.feed_forward(x, w1, b1, w2, b2, activation, backend=backend)
    dout = torch.sign(column) / 4
    dx, = torch.autograd.grad(out, x, dout)
    x64 = x.detach().double().requires_grad_()
    out64 = F.linear(linear64(x64, w1, b1, activation), w2.double(), b2.double())
    dx64, = torch.autograd.grad(out64, x64, dout.double())
    assert_close_relative(out, out64.detach(), dtype, "out")
    assert_close_relative(dx, dx64, dtype, "dx")


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_propagates_inf_and_nan_as_torch(activation, dtype, backend, device):
    """x rows holding NaN, +inf, -inf: y NaN / inf exactly where torch's float64 linear puts them
    (gelu(-inf) = -inf * 0 is NaN in torch too); dx NaN where torch's is, in the rows without inf."""
    skip_unless_runs(backend, device)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, generator=g)
    x[1, 0] = float("nan")
    x[2, 1] = float("inf")
    x[3, 2] = -float("inf")
    x = x.to(dtype=dtype, device=device).requires_grad_()
    w = torch.randn(5, 3, generator=g).to(dtype=dtype, device=device)
    b = torch.randn(5, generator=g).to(dtype=dtype, device=device)
    y = EF.linear(x, w, b, None if activation == "none" else activation, backend=backend)
    y64 = linear64(x.detach(), w, b, activation)
    assert torch.equal(torch.isnan(y), torch.isnan(y64)), f"NaN at\n{torch.isnan(y)}\ntorch:\n{torch.isnan(y64)}"
    assert torch.equal(torch.isinf(y), torch.isinf(y64))
    assert torch.equal(y[torch.isinf(y)], y64[torch.isinf(y64)].to(dtype))
    finite = torch.isfinite(y64)
    assert_close_relative(y[finite], y64[finite], dtype, "y")
    # dx of the normal row and the NaN row (relu's and none's slope at NaN is 0 / 1 in torch)
    dx, = torch.autograd.grad(y[:2], x, torch.ones_like(y[:2]))
    x64 = x.detach().double().requires_grad_()
    dx64, = torch.autograd.grad(linear64(x64, w, b, activation)[:2], x64, torch.ones_like(y64[:2]))
    assert torch.equal(torch.isnan(dx[:2]), torch.isnan(dx64[:2])), f"{dx[:2]}\ntorch:\n{dx64[:2]}"


# ---------------------------------------------------------------------------------------------
# Attention, forward and backward


def attention_inputs(dtype, device, seed, q_scale=1.0, k_scale=1.0, v_scale=1.0):
    """q, k, v [1, 2, 5, 8] (5 queries and keys: partial tiles) of randn times the scales."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 2, 5, 8, generator=g) * s).to(dtype=dtype, device=device).requires_grad_()
            for s in (q_scale, k_scale, v_scale)]


def attention_and_grads(q, k, v, dout, backend, causal=False):
    """(out, dq, dk, dv) of the engine (backend given) or of torch (backend None, float64 math)."""
    if backend is None:
        q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        dout = dout.double()
    else:
        out = EF.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_attention_of_values_near_the_dtype_max(dtype, backend, device):
    """v up to ~0.95 max (out = P v stays below max), dout of 1e-3 (so dout . v, up to 8 of
    max / 1000, stays finite): out, dq, dk, dv as torch's float64 math at their own scales."""
    skip_unless_runs(backend, device)
    big = torch.finfo(dtype).max
    q, k, v = attention_inputs(dtype, device, 7, v_scale=big / 4)
    dout = (torch.randn(q.shape, generator=torch.Generator().manual_seed(8)) * 1e-3).to(dtype=dtype, device=device)
    ours = attention_and_grads(q, k, v, dout, backend)
    expected = attention_and_grads(q, k, v, dout, None)
    for name, actual, true in zip(["out", "dq", "dk", "dv"], ours, expected):
        assert_close(actual, true.detach(), 4 * true.detach().abs().amax(), dtype, name)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_attention_of_subnormal_inputs(dtype, backend, device):
    """q, k, v of the dtype's subnormals: scores ~0, so out is the plain mean of v's subnormals;
    gradients as torch's float64 math."""
    skip_unless_runs(backend, device)
    if bf16_subnormals_mangled(backend, device, dtype):
        pytest.skip("the Triton interpreter converts bf16 subnormals wrongly (checked on GPUs)")
    tiny = torch.finfo(dtype).tiny / 4
    q, k, v = attention_inputs(dtype, device, 9, tiny, tiny, tiny)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(10)).to(dtype=dtype, device=device)
    ours = attention_and_grads(q, k, v, dout, backend, causal=True)
    expected = attention_and_grads(q, k, v, dout, None, causal=True)
    for name, actual, true in zip(["out", "dq", "dk", "dv"], ours, expected):
        assert_close(actual, true.detach(), 4 * true.detach().abs().amax() + 4 * tiny, dtype, name)


def visible_keys_attention_and_grads(q, k, v, dout):
    """torch's float64 (out, dq, dk, dv) of causal attention computed one query row at a time over
    the keys that row sees: no product ever touches a masked position. (A row whose scores are all
    -inf gets 0, as torch's and the engine's rows without a visible key.)"""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    rows = [F.scaled_dot_product_attention(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1])
            for i in range(q.shape[2])]
    out = torch.cat(rows, 2)
    return (out, *torch.autograd.grad(out, (q, k, v), dout.double()))


def poisoned_attention(where, seq, dtype, backend, device):
    """(ours, visible-keys math, torch's dense math) (out, dq, dk, dv) of causal attention over
    `seq` positions, with NaN in one element of q, k or v (`where`) and +inf and -inf in others."""
    g = torch.Generator().manual_seed(11)
    inputs = [torch.randn(1, 2, seq, 8, generator=g).to(dtype=dtype, device=device) for _ in range(3)]
    poisoned = inputs["qkv".index(where)]
    poisoned[0, 0, 1, 3] = float("nan")
    poisoned[0, 1, 3, 0] = float("inf")
    poisoned[0, 1, 2, 5] = -float("inf")
    poisoned[0, 1, seq - 3, 2] = float("nan")  # past the first tile when seq is long
    inputs = [t.requires_grad_() for t in inputs]
    dout = torch.randn(poisoned.shape, generator=torch.Generator().manual_seed(12)).to(dtype=dtype, device=device)
    return (attention_and_grads(*inputs, dout, backend, causal=True),
            visible_keys_attention_and_grads(*inputs, dout),
            attention_and_grads(*inputs, dout, None, causal=True))


def kind(t):
    """0 finite, 1 NaN, 2 +inf, 3 -inf, elementwise."""
    return torch.isnan(t) * 1 + torch.isposinf(t) * 2 + torch.isneginf(t) * 3


def assert_nan_and_inf_between(names, ours, visible, dense, dtype):
    """NaN and inf as torch puts them, with masked positions in between. Where the visible-keys
    math is not finite, ours is NaN or inf too (never a silent number). Ours may also be NaN or
    inf where torch's dense math is: a masked probability is 0, and 0 * inf or 0 * NaN is NaN
    when a kernel's tile holds both a visible and a masked position (torch's math computes every
    position, flash kernels skip whole masked tiles). Each non-finite value is of the kind one of
    the two puts there; finite values equal the visible-keys math."""
    for name, actual, low, high in zip(names, ours, visible, dense):
        low, high = low.detach(), high.detach()
        got = kind(actual)
        assert ((got == kind(low)) | ((got == kind(high)) & (got != 0))).all(), (
            f"{name}: non-finite at\n{got}\nvisible-keys math:\n{kind(low)}\ntorch's dense math:\n{kind(high)}")
        finite = got == 0
        if finite.any():
            assert_close(actual[finite], low[finite], 4 * (low[finite].abs().amax() + 1), dtype, name)


SEQ_LENGTHS = [5, 40]  # 5: one partial tile; 40: causal tiles that the kernels skip


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("seq", SEQ_LENGTHS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_attention_propagates_nan_and_inf_as_torch(where, seq, dtype, backend, device):
    """NaN in two query / key / value elements and +-inf in two others (causal): out, dq, dk, dv
    are NaN / inf where torch's float64 math over the visible keys puts them, and at masked
    positions possibly where torch's dense math does; finite values equal torch's."""
    skip_unless_runs(backend, device)
    ours, visible, dense = poisoned_attention(where, seq, dtype, backend, device)
    assert_nan_and_inf_between(["out", "dq", "dk", "dv"], ours, visible, dense, dtype)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("where", ["k", "v"])
def test_attention_keys_behind_a_padding_mask_may_hold_nan_and_inf(where, dtype, backend, device):
    """Padding keys 6..8, hidden by a bool mask [1, 1, 1, 9] (a view with stride 0 but on keys),
    hold NaN, +inf and -inf in k or v, as garbage in a padded batch may. With the garbage in k,
    out equals attention over the 6 visible keys exactly (a hidden score is never read, so
    NaN + -inf never happens); gradients, and out with garbage in v, as the test above (0 * NaN in
    the products where a kernel's tile holds hidden keys; torch's dense math is NaN there too)."""
    skip_unless_runs(backend, device)
    g = torch.Generator().manual_seed(13)
    q = torch.randn(1, 2, 5, 8, generator=g).to(dtype=dtype, device=device)
    k, v = (torch.randn(1, 2, 9, 8, generator=g).to(dtype=dtype, device=device) for _ in range(2))
    poisoned = k if where == "k" else v
    poisoned[:, :, 6, 1] = float("nan")
    poisoned[:, :, 7, 2] = float("inf")
    poisoned[:, :, 8, 3] = -float("inf")
    mask = (torch.arange(9, device=device) < 6).view(1, 1, 1, 9)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(14)).to(dtype=dtype, device=device)
    out = EF.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    ours = (out, *torch.autograd.grad(out, (q, k, v), dout))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q64, k64[:, :, :6], v64[:, :, :6])
    visible = (out, *torch.autograd.grad(out, (q64, k64, v64), dout.double()))
    out = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask)
    dense = (out, *torch.autograd.grad(out, (q64, k64, v64), dout.double()))
    assert_nan_and_inf_between(["out"], ours[:1], visible[:1], (visible if where == "k" else dense)[:1], dtype)
    assert_nan_and_inf_between(["dq", "dk", "dv"], ours[1:], visible[1:], dense[1:], dtype)
