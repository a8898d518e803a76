"""layer_norm, rms_norm, add_layer_norm, add_rms_norm on every backend against the float64
reference, plus gradcheck, bad inputs and the nn modules."""
import pytest
import torch
import torch.nn.functional as F

import engine
import engine.functional as EF
from common import assert_matches_reference
from conftest import backend_device_pairs, skip_unless_runs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 1, odd, prime, non-power-of-two, GPT-2's width, the widest supported (chunked in Triton)
WIDTHS = [1, 7, 127, 1000, 768, 65536]

# name: (has residual, RMS norm, has weight, has bias)
VARIANTS = {
    "layer_norm": (False, False, True, True),
    "layer_norm_no_affine": (False, False, False, False),
    "rms_norm": (False, True, True, False),
    "add_layer_norm": (True, False, True, True),
    "add_rms_norm": (True, True, True, False),
}


def engine_call(variant, x, r, w, b, eps, backend):
    """The engine op for `variant`; always returns (y, sum or None)."""
    has_residual, rms, _, _ = VARIANTS[variant]
    n = x.shape[-1]
    if has_residual and rms:
        return EF.add_rms_norm(x, r, (n,), w, eps, backend=backend)
    if has_residual:
        return EF.add_layer_norm(x, r, (n,), w, b, eps, backend=backend)
    if rms:
        return EF.rms_norm(x, (n,), w, eps, backend=backend), None
    return EF.layer_norm(x, (n,), w, b, eps, backend=backend), None


def torch_call(variant, x, r, w, b, eps):
    """What a user would write in plain PyTorch (the oracle in float64, the baseline otherwise)."""
    has_residual, rms, _, _ = VARIANTS[variant]
    n = x.shape[-1]
    total = x + r if has_residual else x
    y = F.rms_norm(total, (n,), w, eps) if rms else F.layer_norm(total, (n,), w, b, eps)
    return y, (total if has_residual else None)


def make_inputs(variant, shape, dtype, device, seed=0):
    has_residual, _, has_weight, has_bias = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]

    def rand(*size, shift=0.0):
        return (torch.randn(*size, generator=g) + shift).to(dtype=dtype, device=device).requires_grad_()

    x = rand(*shape, shift=0.5)  # a non-zero mean, so centering matters
    r = rand(*shape) if has_residual else None
    w = rand(n, shift=1.0) if has_weight else None
    b = rand(n) if has_bias else None
    return x, r, w, b


def outputs_and_grads(fn, inputs, grad_seed=1):
    """Forward outputs and the gradients of every input that has one, for random output grads."""
    y, total = fn(*inputs)
    g = torch.Generator().manual_seed(grad_seed)
    loss = (y * torch.randn(y.shape, generator=g).to(y)).sum()
    if total is not None:
        loss = loss + (total * torch.randn(total.shape, generator=g).to(total)).sum()
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    return [y] + ([total] if total is not None else []) + list(grads)


def rows_for(width):
    # keep interpreter grids small: very wide rows get fewer of them
    return (2, 3) if width <= 1000 else (2,)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(variant, width, dtype, backend, device):
    skip_unless_runs(backend, device)
    eps = 1e-5
    shape = (*rows_for(width), width)
    inputs = make_inputs(variant, shape, dtype, device)
    ours = outputs_and_grads(lambda *a: engine_call(variant, *a, eps, backend), inputs)
    baseline = outputs_and_grads(lambda *a: torch_call(variant, *a, eps), inputs)
    inputs64 = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    expected = outputs_and_grads(lambda *a: torch_call(variant, *a, eps), inputs64)
    names = ["y", "sum", "d_input", "d_residual", "d_weight", "d_bias"]
    has = [True, VARIANTS[variant][0], True] + [t is not None for t in inputs[1:]]
    names = [name for name, present in zip(names, has) if present]
    assert len(ours) == len(expected) == len(names)
    for name, actual, exp, base in zip(names, ours, expected, baseline):
        assert actual.dtype == dtype and actual.device.type == device
        # the row statistics sum `width` terms; the weight and bias gradients sum over the rows
        assert_matches_reference(actual, exp, base, name=f"{variant} {name}", reduction_length=width)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_float64(variant, backend, device):
    skip_unless_runs(backend, device)
    inputs = make_inputs(variant, (3, 11), torch.float64, device)
    leaves = [t for t in inputs if t is not None]

    def fn(*leaves_in):
        it = iter(leaves_in)
        args = [next(it) if t is not None else None for t in inputs]
        y, total = engine_call(variant, *args, 1e-5, backend)
        return (y, total) if total is not None else y

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["layer_norm", "add_layer_norm", "add_rms_norm"])
def test_cpu_streamed_outputs(variant, dtype):
    """Outputs over 16 MiB, which the CPU kernels write with streaming stores, kLanes at a time
    from an aligned element: rows of an odd width start at every alignment, and end in a tail."""
    skip_unless_runs("cpu", "cpu")
    width = 1025
    rows = 4100 if dtype == torch.float32 else 8200  # > 16 MiB of y alone
    inputs = make_inputs(variant, (rows, width), dtype, "cpu")
    ours = outputs_and_grads(lambda *a: engine_call(variant, *a, 1e-5, "cpu"), inputs)
    baseline = outputs_and_grads(lambda *a: torch_call(variant, *a, 1e-5), inputs)
    inputs64 = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    expected = outputs_and_grads(lambda *a: torch_call(variant, *a, 1e-5), inputs64)
    for index, (actual, exp, base) in enumerate(zip(ours, expected, baseline)):
        assert_matches_reference(actual, exp, base, name=f"{variant} output {index}", reduction_length=rows)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("layout", ["row_strided", "transposed", "expanded_batch"])
def test_non_contiguous_input(layout, backend, device):
    skip_unless_runs(backend, device)
    g = torch.Generator().manual_seed(0)
    n = 96
    if layout == "row_strided":      # unit column stride, rows further apart than n
        x = torch.randn(5, 2 * n, generator=g)[:, :n]
    elif layout == "transposed":     # column stride != 1: needs a copy
        x = torch.randn(n, 5, generator=g).t()
    else:                            # a zero batch stride
        x = torch.randn(1, 3, n, generator=g).expand(2, 3, n)
    x = x.to(device)
    r = torch.randn(x.shape, generator=g).to(device).t().contiguous().t() if x.dim() == 2 else None
    w, b = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    y = EF.layer_norm(x, (n,), w, b, backend=backend)
    expected = F.layer_norm(x.double(), (n,), w.double(), b.double())
    assert_matches_reference(y, expected, F.layer_norm(x, (n,), w, b))
    if r is not None:
        y, total = EF.add_layer_norm(x, r, (n,), w, b, backend=backend)
        assert_matches_reference(total, (x + r).double(), x + r, name="sum")
        expected = F.layer_norm((x + r).double(), (n,), w.double(), b.double())
        assert_matches_reference(y, expected, F.layer_norm(x + r, (n,), w, b))


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_multi_dim_normalized_shape(backend, device):
    skip_unless_runs(backend, device)
    x = torch.randn(4, 3, 5, device=device)
    w, b = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    y = EF.layer_norm(x, (3, 5), w, b, backend=backend)
    expected = F.layer_norm(x.double(), (3, 5), w.double(), b.double())
    assert_matches_reference(y, expected, F.layer_norm(x, (3, 5), w, b))


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_empty_input_gives_empty_result(backend, device):
    skip_unless_runs(backend, device)
    for shape in [(0, 16), (2, 0, 16)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        w = torch.randn(16, device=device, requires_grad=True)
        y = EF.layer_norm(x, (16,), w, None, backend=backend)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape and not w.grad.any()
    y = EF.layer_norm(torch.randn(3, 0, device=device), (0,), backend=backend)
    assert y.shape == (3, 0)


def test_rms_norm_default_eps_is_dtype_eps():
    x = torch.randn(4, 8) * 1e-4
    expected = F.rms_norm(x.double(), (8,), eps=torch.finfo(torch.float32).eps)
    assert_matches_reference(EF.rms_norm(x, (8,)), expected, F.rms_norm(x, (8,)))


# ---------------------------------------------------------------------------------------------
# Bad inputs: a TypeError or ValueError naming the argument, before any kernel runs


def _bad_calls():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    yield "normalized_shape", ValueError, lambda: EF.layer_norm(x, (7,), w)
    yield "normalized_shape", ValueError, lambda: EF.layer_norm(x, (4, 9))
    yield "normalized_shape", TypeError, lambda: EF.layer_norm(x, "8")
    yield "weight", ValueError, lambda: EF.layer_norm(x, (8,), torch.randn(7))
    yield "bias", ValueError, lambda: EF.layer_norm(x, (8,), w, torch.randn(2, 4))
    yield "weight", TypeError, lambda: EF.layer_norm(x, (8,), w.half())
    yield "bias", TypeError, lambda: EF.layer_norm(x, (8,), w, w.double())
    yield "weight", ValueError, lambda: EF.layer_norm(x, (8,), w.to("meta"))
    yield "input", TypeError, lambda: EF.layer_norm(torch.ones(4, 8, dtype=torch.int64), (8,))
    yield "input", TypeError, lambda: EF.layer_norm(x.numpy(), (8,))
    yield "weight", TypeError, lambda: EF.layer_norm(x, (8,), [1.0] * 8)
    yield "eps", ValueError, lambda: EF.layer_norm(x, (8,), w, eps=-1.0)
    yield "eps", TypeError, lambda: EF.layer_norm(x, (8,), w, eps="small")
    yield "residual", ValueError, lambda: EF.add_layer_norm(x, torch.randn(4, 7), (8,), w)
    yield "residual", TypeError, lambda: EF.add_layer_norm(x, x.bfloat16(), (8,), w)
    yield "residual", ValueError, lambda: EF.add_rms_norm(x, x.to("meta"), (8,), w)
    yield "input", TypeError, lambda: EF.rms_norm(torch.ones(4, 8, dtype=torch.int32), (8,))
    yield "weight", ValueError, lambda: EF.rms_norm(x, (8,), torch.randn(9))


@pytest.mark.parametrize("argument,error,call", list(_bad_calls()),
                         ids=[f"{i}-{a}" for i, (a, _, _) in enumerate(_bad_calls())])
def test_bad_input_names_the_argument(argument, error, call):
    with pytest.raises(error, match=argument):
        call()


def test_input_on_another_device_than_weight():
    x = torch.randn(4, 8, device="meta")
    with pytest.raises(ValueError, match="weight"):
        EF.layer_norm(x, (8,), torch.randn(8))


# ---------------------------------------------------------------------------------------------
# Modules


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}])
def test_layer_norm_module_loads_torch_state_dict(kwargs):
    torch_module = torch.nn.LayerNorm((4, 6), **kwargs)
    with torch.no_grad():
        for p in torch_module.parameters():
            p.normal_()
    ours = engine.nn.LayerNorm((4, 6), **kwargs)
    ours.load_state_dict(torch_module.state_dict())
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(ours(x), torch_module(x), atol=1e-5, rtol=1e-5)
    assert repr(ours).removeprefix("LayerNorm") == repr(torch_module).removeprefix("LayerNorm")
    assert isinstance(ours, torch.nn.LayerNorm)


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"eps": 1e-3}])
def test_rms_norm_module_loads_torch_state_dict(kwargs):
    torch_module = torch.nn.RMSNorm(10, **kwargs)
    with torch.no_grad():
        for p in torch_module.parameters():
            p.normal_()
    ours = engine.nn.RMSNorm(10, **kwargs)
    ours.load_state_dict(torch_module.state_dict())
    x = torch.randn(3, 10)
    torch.testing.assert_close(ours(x), torch_module(x), atol=1e-5, rtol=1e-5)


def test_module_dtype_and_device_arguments():
    module = engine.nn.LayerNorm(8, dtype=torch.bfloat16, device="cpu")
    assert module.weight.dtype == torch.bfloat16
    y = module(torch.randn(2, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
