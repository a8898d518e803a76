"""gelu, linear (fused bias + activation), feed_forward (fused bias, activation, dropout,
residual) on every backend against the float64 reference; dropout; gradcheck; bad inputs; modules."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import engine
import engine.functional as EF
from common import assert_matches_reference
from conftest import backend_device_pairs, skip_unless_runs
from engine import backends, reference
from engine.ops import linear as linear_op
from engine.ops.common import draw_seed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TORCH_ACTIVATION = {None: lambda y: y, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
                    "relu": F.relu, "silu": F.silu}
# The gated activations in torch: the first half of the product's columns is the gate.
TORCH_GATE = {"swiglu": F.silu, "geglu": F.gelu, "geglu_tanh": lambda y: F.gelu(y, approximate="tanh")}
GATED = list(TORCH_GATE)


def torch_gated(product, activation):
    gate, up = product.chunk(2, dim=-1)
    return TORCH_GATE[activation](gate) * up


def rand(*shape, g, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()


def grads_of(out, leaves, g):
    grad_out = torch.randn(out.shape, generator=g).to(out)
    return [out, *torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)]


def check_all(ours, baseline, expected, names, reduction_length=1):
    """reduction_length: the longest sum behind any result (K for out and dx's rows, M for dw, db)."""
    assert len(ours) == len(baseline) == len(expected) == len(names)
    for name, actual, base, exp in zip(names, ours, baseline, expected):
        assert_matches_reference(actual, exp, base, name=name, reduction_length=reduction_length)


# (M, K, N): 1, odd, prime, non-powers of two, GPT-2's FFN width
SHAPES = [(1, 7, 129), (7, 129, 1), (129, 1000, 7), (33, 64, 3072), (1000, 7, 129)]


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_matches_reference(shape, activation, dtype, backend, device):
    skip_unless_runs(backend, device)
    m, k, n = shape
    g = torch.Generator().manual_seed(m * 7 + n)
    x = rand(m, k, g=g, dtype=dtype, device=device)
    w = rand(n, k, g=g, dtype=dtype, device=device, scale=k ** -0.5)
    b = rand(n, g=g, dtype=dtype, device=device) if n != 1 else None  # also cover no bias
    state = g.get_state()
    ours = grads_of(EF.linear(x, w, b, activation, backend=backend), (x, w, b), g)
    g.set_state(state)
    baseline = grads_of(TORCH_ACTIVATION[activation](F.linear(x, w, b)), (x, w, b), g)
    g.set_state(state)
    x64, w64, b64 = (t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b))
    expected = grads_of(reference.linear(x64, w64, b64, reference.ACTIVATIONS[0] if activation is None
                                         else activation)[0], (x64, w64, b64), g)
    check_all(ours, baseline, expected, ["out", "dx", "dw", "db"][:len(ours)], reduction_length=max(m, k, n))


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
def test_feed_forward_matches_reference(with_residual, dtype, backend, device):
    skip_unless_runs(backend, device)
    g = torch.Generator().manual_seed(11)
    m, d_model, d_ff = 37, 96, 3 * 129
    x = rand(2, m, d_model, g=g, dtype=dtype, device=device)
    w1 = rand(d_ff, d_model, g=g, dtype=dtype, device=device, scale=d_model ** -0.5)
    b1 = rand(d_ff, g=g, dtype=dtype, device=device)
    w2 = rand(d_model, d_ff, g=g, dtype=dtype, device=device, scale=d_ff ** -0.5)
    b2 = rand(d_model, g=g, dtype=dtype, device=device)
    r = rand(2, m, d_model, g=g, dtype=dtype, device=device) if with_residual else None
    leaves = (x, w1, b1, w2, b2, r)

    def torch_ffn(x, w1, b1, w2, b2, r):
        y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
        return y + r if r is not None else y

    state = g.get_state()
    ours = grads_of(EF.feed_forward(x, w1, b1, w2, b2, residual=r, backend=backend), leaves, g)
    g.set_state(state)
    baseline = grads_of(torch_ffn(*leaves), leaves, g)
    g.set_state(state)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    expected = grads_of(torch_ffn(*leaves64), leaves64, g)
    names = ["out", "dx", "dw1", "db1", "dw2", "db2", "dresidual"][:len(ours)]
    check_all(ours, baseline, expected, names, reduction_length=max(2 * m, d_model, d_ff))


# (M, K, H) of gated products [M, 2H]: one row, odd and prime sizes, a hidden width past one tile
GATED_SHAPES = [(1, 7, 65), (33, 64, 96), (70, 33, 1)]


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", GATED)
@pytest.mark.parametrize("shape", GATED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_linear_matches_reference(shape, activation, dtype, backend, device):
    skip_unless_runs(backend, device)
    m, k, h = shape
    g = torch.Generator().manual_seed(m + 3 * h)
    x = rand(m, k, g=g, dtype=dtype, device=device)
    w = rand(2 * h, k, g=g, dtype=dtype, device=device, scale=k ** -0.5)
    b = rand(2 * h, g=g, dtype=dtype, device=device) if h != 1 else None  # also cover no bias
    state = g.get_state()
    ours = grads_of(EF.linear(x, w, b, activation, backend=backend), (x, w, b), g)
    assert ours[0].shape == (m, h)
    g.set_state(state)
    baseline = grads_of(torch_gated(F.linear(x, w, b), activation), (x, w, b), g)
    g.set_state(state)
    x64, w64, b64 = (t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b))
    expected = grads_of(torch_gated(F.linear(x64, w64, b64), activation), (x64, w64, b64), g)
    check_all(ours, baseline, expected, ["out", "dx", "dw", "db"][:len(ours)], reduction_length=max(m, k, 2 * h))


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_feed_forward_matches_llama_mlp(dtype, backend, device):
    """feed_forward(..., "swiglu") against transformers' LlamaMLP, its gate_proj and up_proj weights
    loaded as w1 = cat([gate_proj, up_proj]) (engine.functional.feed_forward's layout), with a
    residual in the second product's epilogue; float64 LlamaMLP is the reference."""
    skip_unless_runs(backend, device)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    d_model, d_ff = 48, 80
    config = LlamaConfig(hidden_size=d_model, intermediate_size=d_ff, num_attention_heads=4, hidden_act="silu",
                         mlp_bias=False)
    torch.manual_seed(6)
    mlp = LlamaMLP(config).to(device, dtype)
    g = torch.Generator().manual_seed(7)
    x = rand(2, 19, d_model, g=g, dtype=dtype, device=device)
    r = rand(2, 19, d_model, g=g, dtype=dtype, device=device)
    w1 = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().requires_grad_()
    w2 = mlp.down_proj.weight.detach().clone().requires_grad_()
    state = g.get_state()
    ours = grads_of(EF.feed_forward(x, w1, None, w2, None, "swiglu", residual=r, backend=backend), (x, w1, w2, r), g)

    def llama_grads(mlp, x, r):
        params = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
        g.set_state(state)
        out, dx, dgate, dup, dw2, dr = grads_of(mlp(x) + r, (x, *params, r), g)
        return [out, dx, torch.cat([dgate, dup]), dw2, dr]

    baseline = llama_grads(mlp, x, r)
    mlp64 = LlamaMLP(config).double().to(device)
    mlp64.load_state_dict({name: p.double() for name, p in mlp.state_dict().items()})
    x64, r64 = (t.detach().double().requires_grad_() for t in (x, r))
    expected = llama_grads(mlp64, x64, r64)
    check_all(ours, baseline, expected, ["out", "dx", "dw1", "dw2", "dresidual"],
              reduction_length=max(38, d_model, 2 * d_ff))


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_reference(approximate, dtype, backend, device):
    skip_unless_runs(backend, device)
    g = torch.Generator().manual_seed(2)
    x = rand(3, 5, 129, g=g, dtype=dtype, device=device, scale=3.0)
    state = g.get_state()
    ours = grads_of(EF.gelu(x, approximate, backend=backend), (x,), g)
    g.set_state(state)
    baseline = grads_of(F.gelu(x, approximate=approximate), (x,), g)
    g.set_state(state)
    x64 = x.detach().double().requires_grad_()
    expected = grads_of(F.gelu(x64, approximate=approximate), (x64,), g)
    check_all(ours, baseline, expected, ["out", "dx"])


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_over_the_whole_finite_range(approximate, backend, device):
    """GeLU and its slope at +-3e38, far out and near 0, as torch computes them in float64: -0 and 0
    far left, x and 1 far right; no NaN, no overflow of x^3 (the tanh form's -3e38 once gave -30 on
    cpu and -5414.5 on triton). The fused linear epilogue uses the same code."""
    skip_unless_runs(backend, device)
    x = torch.tensor([-3e38, -1e5, -25.0, -10.0, -3.0, -1e-30, 0.0, 1e-30, 3.0, 10.0, 25.0, 1e5, 3e38],
                     device=device, requires_grad=True)
    y = EF.gelu(x, approximate, backend=backend)
    slope, = torch.autograd.grad(y.sum(), x)
    x64 = x.detach().double().requires_grad_()
    y64 = F.gelu(x64, approximate=approximate)
    slope64, = torch.autograd.grad(y64.sum(), x64)
    torch.testing.assert_close(y.double(), y64, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(slope.double(), slope64, atol=1e-6, rtol=1e-6)
    w = torch.ones(1, 1, device=device)
    fused = EF.linear(x.detach()[:, None], w, None, "gelu" if approximate == "none" else "gelu_tanh",
                      backend=backend)
    torch.testing.assert_close(fused[:, 0].double(), y64.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_non_contiguous_weight_and_input(backend, device):
    skip_unless_runs(backend, device)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 2, 24, generator=g).to(device)[:, 0]          # row stride 48
    w = torch.randn(24, 33, generator=g).to(device).t()                # [33, 24] transposed
    b = torch.randn(33, generator=g).to(device)
    out = EF.linear(x, w, b, "gelu", backend=backend)
    expected = F.gelu(F.linear(x.double(), w.double(), b.double()))
    assert_matches_reference(out, expected, F.gelu(F.linear(x, w, b)), reduction_length=24)


# The cpu backend runs bf16 products on torch's bf16 GEMM where the CPU has bf16 dot products, else
# in fp32 (csrc/cpu/linear_blas.cpp), decided once per process; ENGINE_CPU_BF16_PRODUCTS forces
# either answer, so each runs here in a fresh process.
BF16_PRODUCTS_SCRIPT = """
import torch, torch.nn.functional as F
import engine.functional as EF
from engine.accuracy import allowed_error, max_error

g = torch.Generator().manual_seed(5)
# (bf16 products with fewer than 8 rows stay on the bf16 GEMM: the (3, 40, 70) case)
for (m, k, n), activation, has_bias in [((600, 96, 1100), "gelu", True), ((3, 40, 70), None, True),
                                        ((65, 33, 17), "relu", False)]:
    leaves = [torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * k ** -0.5,
              torch.randn(n, generator=g) if has_bias else None]
    leaves = [t.bfloat16().requires_grad_() if t is not None else None for t in leaves]
    grad_out = torch.randn(m, n, generator=g).bfloat16()
    act = {None: lambda y: y, "gelu": F.gelu, "relu": F.relu}[activation]
    def run(fn, tensors):
        out = fn(*tensors)
        return [out, *torch.autograd.grad(out, [t for t in tensors if t is not None], grad_out.to(out.dtype))]
    ours = run(lambda x, w, b: EF.linear(x, w, b, activation, backend="cpu"), leaves)
    baseline = run(lambda x, w, b: act(F.linear(x, w, b)), leaves)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    expected = run(lambda x, w, b: act(F.linear(x, w, b)), leaves64)
    for name, a, base, e in zip(["out", "dx", "dw", "db"], ours, baseline, expected):
        error, allowed = max_error(a, e), allowed_error(torch.bfloat16, e, base)
        assert a.dtype == torch.bfloat16 and error <= allowed, (m, k, n, activation, name, error, allowed)
print("ok")
"""


@pytest.mark.parametrize("products", ["native", "fp32"])
def test_cpu_bf16_products_on_either_capability(products):
    """bf16 linear forward and backward on the cpu backend with its products on torch's bf16 GEMM
    (CPUs with bf16 dot products) and in fp32 (the others) against float64 under the accuracy rule."""
    skip_unless_runs("cpu", "cpu")
    env = {**os.environ, "ENGINE_CPU_BF16_PRODUCTS": products}
    repo = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", BF16_PRODUCTS_SCRIPT], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_triton_declines_fp32_gated_dropout_on_gpus_only():
    """The one combination the Triton linear leaves to the cuda backend on a GPU (its dW kernel
    spills on sm90), and still serves in the interpreter."""
    pytest.importorskip("triton")
    from engine.kernels import linear as triton_linear
    from engine.ops.linear import LinearArgs
    def reasons(device, dtype, activation, dropout_p):
        x, w = torch.empty(8, 16, device=device, dtype=dtype), torch.empty(32, 16, device=device, dtype=dtype)
        return triton_linear.supports(LinearArgs(x, w, None, activation, dropout_p, None, False))
    assert any("spills" in r for r in reasons("meta", torch.float32, "swiglu", 0.1))
    assert reasons("meta", torch.float32, "swiglu", 0.0) == []
    assert reasons("meta", torch.bfloat16, "swiglu", 0.1) == []
    assert reasons("cpu", torch.float32, "swiglu", 0.1) == []
    names = [case.name for case in triton_linear.gpu_compile_cases()]
    assert not [name for name in names if "float32" in name and "swiglu+dropout" in name]
    assert [name for name in names if "bfloat16" in name and "swiglu+dropout" in name]


def test_cpu_bf16_products_setting_must_be_known():
    skip_unless_runs("cpu", "cpu")
    script = (
        "import torch, engine.functional as EF\n"
        "x = torch.randn(64, 32).bfloat16()\n"
        "try:\n"
        "    EF.linear(x, torch.randn(16, 32).bfloat16(), backend='cpu')\n"
        "except ValueError as error:\n"
        "    print(error)\n")
    env = {**os.environ, "ENGINE_CPU_BF16_PRODUCTS": "fast"}
    repo = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert "ENGINE_CPU_BF16_PRODUCTS must be 'native' or 'fp32', got 'fast'" in run.stdout, run.stdout


# ---------------------------------------------------------------------------------------------
# Dropout inside the epilogue


def _seed_the_op_draws(torch_seed: int) -> int:
    torch.manual_seed(torch_seed)
    return draw_seed()


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_dropout_mask_fraction_determinism_and_gradients(backend, device):
    skip_unless_runs(backend, device)
    p, m, k, n = 0.2, 150, 64, 257
    g = torch.Generator().manual_seed(9)
    x = rand(m, k, g=g, dtype=torch.float32, device=device)
    w = rand(n, k, g=g, dtype=torch.float32, device=device, scale=0.125)
    b = rand(n, g=g, dtype=torch.float32, device=device)
    torch.manual_seed(3)
    out, keep = linear_op.linear(x, w, b, "gelu", p, None, backend, return_dropout_mask=True)
    expected_keep = reference.dropout_keep_mask(_seed_the_op_draws(3), p, m, n).view(m, n)
    assert keep.dtype == torch.bool and torch.equal(keep.cpu(), expected_keep)
    assert abs((1 - keep.float().mean().item()) - p) < 0.01
    torch.manual_seed(3)
    assert torch.equal(out, linear_op.linear(x, w, b, "gelu", p, None, backend)[0])
    torch.manual_seed(4)
    assert not torch.equal(out, linear_op.linear(x, w, b, "gelu", p, None, backend)[0])
    grad_out = torch.randn(out.shape, generator=g).to(out)
    grads = torch.autograd.grad(out, (x, w, b), grad_out)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    out64, _ = reference.linear(x64, w64, b64, "gelu", p, expected_keep.to(device))
    grads64 = torch.autograd.grad(out64, (x64, w64, b64), grad_out.double())
    torch.testing.assert_close(out.double(), out64, atol=1e-4, rtol=1e-4)
    for actual, exp in zip(grads, grads64):
        torch.testing.assert_close(actual.double(), exp, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_gated_dropout_and_residual(backend, device):
    """swiglu with dropout and a residual: the [M, H] mask is the stream's for the output columns
    (counters (j, m) of output [m, j]), and out and gradients match the float64 reference."""
    skip_unless_runs(backend, device)
    p, m, k, h = 0.3, 40, 24, 70
    g = torch.Generator().manual_seed(12)
    x = rand(m, k, g=g, dtype=torch.float32, device=device)
    w = rand(2 * h, k, g=g, dtype=torch.float32, device=device, scale=k ** -0.5)
    b = rand(2 * h, g=g, dtype=torch.float32, device=device)
    r = rand(m, h, g=g, dtype=torch.float32, device=device)
    torch.manual_seed(8)
    out, keep = linear_op.linear(x, w, b, "swiglu", p, r, backend, return_dropout_mask=True)
    expected_keep = reference.dropout_keep_mask(_seed_the_op_draws(8), p, m, h).view(m, h)
    assert keep.shape == (m, h) and torch.equal(keep.cpu(), expected_keep)
    grad_out = torch.randn(out.shape, generator=g).to(out)
    grads = torch.autograd.grad(out, (x, w, b, r), grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b, r)]
    out64, _ = reference.linear(*leaves64[:3], "swiglu", p, expected_keep.to(device), leaves64[3])
    grads64 = torch.autograd.grad(out64, leaves64, grad_out.double())
    torch.testing.assert_close(out.double(), out64, atol=1e-4, rtol=1e-4)
    for actual, exp in zip(grads, grads64):
        torch.testing.assert_close(actual.double(), exp, atol=1e-3, rtol=1e-4)


def test_feed_forward_dropout_is_seeded_by_torch():
    g = torch.Generator().manual_seed(0)
    x, w1, b1 = torch.randn(8, 16, generator=g), torch.randn(64, 16, generator=g), torch.randn(64, generator=g)
    w2, b2 = torch.randn(16, 64, generator=g), torch.randn(16, generator=g)
    torch.manual_seed(5)
    first = EF.feed_forward(x, w1, b1, w2, b2, dropout_p=0.5)
    torch.manual_seed(5)
    assert torch.equal(first, EF.feed_forward(x, w1, b1, w2, b2, dropout_p=0.5))
    assert not torch.equal(first, EF.feed_forward(x, w1, b1, w2, b2))


# ---------------------------------------------------------------------------------------------
# float64 gradcheck where the backend supports float64


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu", None, *GATED])
def test_gradcheck_float64(activation, backend, device):
    skip_unless_runs(backend, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, dtype=torch.float64, generator=g).to(device).requires_grad_()
    w = torch.randn(8, 6, dtype=torch.float64, generator=g).to(device).requires_grad_()  # gated: 4 gate, 4 up rows
    b = torch.randn(8, dtype=torch.float64, generator=g).to(device).requires_grad_()
    reason = backends.why_not("linear", backend, x.device, linear_op.LinearArgs(x, w, b, activation or "none", 0.0,
                                                                                None, False))
    if reason:
        pytest.skip(f"{backend} does not take float64: {reason}")
    assert torch.autograd.gradcheck(lambda x, w, b: EF.linear(x, w, b, activation, backend=backend), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: EF.gelu(x, "tanh", backend=backend), (x,))


# ---------------------------------------------------------------------------------------------
# Bad inputs


def _bad_calls():
    x, w, b = torch.randn(4, 8), torch.randn(16, 8), torch.randn(16)
    w2, b2 = torch.randn(8, 16), torch.randn(8)
    yield "weight", ValueError, lambda: EF.linear(x, torch.randn(16, 7))          # feature mismatch
    yield "weight", ValueError, lambda: EF.linear(x, torch.randn(16))              # rank
    yield "bias", ValueError, lambda: EF.linear(x, w, torch.randn(15))
    yield "activation", ValueError, lambda: EF.linear(x, w, b, "swish")
    yield "weight", TypeError, lambda: EF.linear(x, w.half())
    yield "input", TypeError, lambda: EF.linear(x.int(), w)
    yield "bias", ValueError, lambda: EF.linear(x, w, b.to("meta"))
    yield "approximate", ValueError, lambda: EF.gelu(x, "fast")
    yield "input", TypeError, lambda: EF.gelu([1.0])
    yield "dropout_p", ValueError, lambda: EF.feed_forward(x, w, b, w2, b2, dropout_p=1.0)
    yield "dropout_p", ValueError, lambda: EF.feed_forward(x, w, b, w2, b2, dropout_p=-0.5)
    yield "w2", ValueError, lambda: EF.feed_forward(x, w, b, torch.randn(8, 15), b2)
    yield "w1 makes 16", ValueError, lambda: EF.feed_forward(x, w, b, torch.randn(8, 15), b2)  # not a dummy shape
    yield "b1", ValueError, lambda: EF.feed_forward(x, w, torch.randn(3), w2, b2)
    yield "residual", ValueError, lambda: EF.feed_forward(x, w, b, w2, b2, residual=torch.randn(4, 9))
    yield "activation", ValueError, lambda: EF.feed_forward(x, w, b, w2, b2, activation="tanh")
    yield "activation", ValueError, lambda: engine.nn.Linear(4, 4, activation="swish")
    yield "weight", ValueError, lambda: EF.linear(x, torch.randn(15, 8), None, "geglu")  # odd rows: no gate/up halves
    yield "w1", ValueError, lambda: EF.feed_forward(x, torch.randn(15, 8), None, w2, b2, "swiglu")
    yield "w1 makes 8", ValueError, lambda: EF.feed_forward(x, w, b, w2, b2, "swiglu")  # w2 must take d_ff = 8
    yield "out_features", ValueError, lambda: engine.nn.Linear(4, 5, activation="geglu")


@pytest.mark.parametrize("argument,error,call", list(_bad_calls()),
                         ids=[f"{i}-{a}" for i, (a, _, _) in enumerate(_bad_calls())])
def test_bad_input_names_the_argument(argument, error, call):
    with pytest.raises(error, match=argument):
        call()


def test_empty_inputs():
    w, b = torch.randn(5, 3), torch.randn(5)
    assert EF.linear(torch.randn(0, 3), w, b, "gelu").shape == (0, 5)
    torch.testing.assert_close(EF.linear(torch.randn(2, 0), torch.randn(5, 0), b), b.expand(2, 5))
    assert EF.gelu(torch.randn(0, 4)).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# Modules


def test_linear_module_loads_torch_state_dict():
    torch_linear = torch.nn.Linear(12, 20)
    ours = engine.nn.Linear(12, 20, activation="gelu")
    ours.load_state_dict(torch_linear.state_dict())
    x = torch.randn(3, 4, 12)
    torch.testing.assert_close(ours(x), F.gelu(torch_linear(x)), atol=1e-5, rtol=1e-5)
    plain = engine.nn.Linear(12, 20, bias=False)
    plain.load_state_dict(torch.nn.Linear(12, 20, bias=False).state_dict())
    assert isinstance(ours, torch.nn.Linear) and "activation='gelu'" in repr(ours)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_module(approximate):
    x = torch.randn(4, 9)
    torch.testing.assert_close(engine.nn.GELU(approximate)(x), torch.nn.GELU(approximate)(x), atol=1e-6, rtol=1e-6)


def test_feed_forward_module():
    ffn = engine.nn.FeedForward(16, 48, activation="relu", dropout=0.3)
    x = torch.randn(2, 5, 16)
    expected = ffn.linear2(F.relu(ffn.linear1(x)))
    ffn.eval()
    torch.testing.assert_close(ffn(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ffn(x, residual=x), expected + x, atol=1e-5, rtol=1e-5)
    ffn.train()
    assert not torch.allclose(ffn(x), expected)
    assert set(ffn.state_dict()) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}


def test_gated_modules():
    """Linear(..., activation="geglu") outputs half its out_features; FeedForward(..., "swiglu")
    holds linear1 [2 * d_ff, d_model] (gate rows, then up rows)."""
    linear = engine.nn.Linear(12, 20, activation="geglu")
    x = torch.randn(3, 12)
    gate, up = F.linear(x, linear.weight, linear.bias).chunk(2, dim=-1)
    torch.testing.assert_close(linear(x), F.gelu(gate) * up, atol=1e-5, rtol=1e-5)
    ffn = engine.nn.FeedForward(16, 24, activation="swiglu")
    assert ffn.linear1.weight.shape == (48, 16) and ffn.linear2.weight.shape == (16, 24)
    x = torch.randn(2, 5, 16)
    gate, up = ffn.linear1(x).chunk(2, dim=-1)
    torch.testing.assert_close(ffn(x), ffn.linear2(F.silu(gate) * up), atol=1e-5, rtol=1e-5)
