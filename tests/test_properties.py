"""Property tests (hypothesis): each op, forward and backward, against torch in float64 over drawn
shapes, strides, optional operands, masks (bool, float, each broadcast form), causal, GQA and
Sq != Sk, rotary dims and position offsets. float64 results must agree with torch's to 1e-10 relative (tests/common.py).

The reference and cpu backends take the full draw; triton, which runs in the interpreter here
(about a millisecond per program), takes a few tiny examples.

Profiles: "ci" (the default: derandomized, so every run draws the same examples; bounded) and
"long", for hunting:
    ENGINE_HYPOTHESIS_PROFILE=long ./test.sh tests/test_properties.py
"""
import os

import pytest
import torch
import torch.nn.functional as F

import engine.functional as EF
from common import assert_matches_reference, torch_rotary
from conftest import backend_device_pairs, skip_unless_runs

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=25, **_COMMON)
settings.register_profile("long", max_examples=1000, **_COMMON)
PROFILE = os.environ.get("ENGINE_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
# the interpreter's share: a fifth of the examples, on shapes capped below
TRITON_EXAMPLES = max(3, settings.get_profile(PROFILE).max_examples // 5)

f64 = torch.float64


def _check_every_drawn_case(cases, check_one, backend: str, device: str) -> None:
    """Runs check_one(case, backend, device) on the cases drawn from cases(tiny=...): tiny ones
    and TRITON_EXAMPLES of them for triton (the interpreter), the profile's draw for the others."""
    skip_unless_runs(backend, device)
    examples = settings(max_examples=TRITON_EXAMPLES) if backend == "triton" else settings()

    @examples
    @given(cases(tiny=backend == "triton"))
    def check(case):
        check_one(case, backend, device)

    check()


def _tensor(generator, *shape, strided: bool = False, scale: float = 1.0):
    """A float64 tensor; strided: a view whose last dim has stride 2 (not laid out as it looks)."""
    if strided:
        return (torch.randn(*shape[:-1], 2 * shape[-1], generator=generator, dtype=f64) * scale)[..., ::2]
    return torch.randn(*shape, generator=generator, dtype=f64) * scale


def _compare(actual, expected, names, terms_scale: float = 0.0):
    for name, a, e in zip(names, actual, expected, strict=True):
        if e is None:
            assert a is None, f"{name}: a gradient where torch has none"
            continue
        assert_matches_reference(a.detach(), e.detach(), name=name, terms_scale=terms_scale)


# ---------------------------------------------------------------------------------------------
# Layer norm, RMS norm, and their residual-add forms


@st.composite
def norm_cases(draw, tiny: bool):
    return dict(rows=draw(st.integers(1, 4 if tiny else 9)), n=draw(st.integers(1, 40 if tiny else 300)),
                rms=draw(st.booleans()), residual=draw(st.booleans()), weight=draw(st.booleans()),
                bias=draw(st.booleans()), strided=draw(st.booleans()),
                scale=draw(st.sampled_from([1e-3, 1.0, 1e3])), seed=draw(st.integers(0, 2**16)))


def _check_norm(case, backend, device):
    g = torch.Generator().manual_seed(case["seed"])
    rows, n = case["rows"], case["n"]
    x = _tensor(g, rows, n, strided=case["strided"], scale=case["scale"]).to(device).requires_grad_()
    residual = _tensor(g, rows, n).to(device).requires_grad_() if case["residual"] else None
    weight = _tensor(g, n).to(device).requires_grad_() if case["weight"] else None
    bias = _tensor(g, n).to(device).requires_grad_() if case["bias"] and not case["rms"] else None
    grad_out = _tensor(g, rows, n).to(device)
    given_inputs = {"x": x, "residual": residual, "weight": weight, "bias": bias}
    names = [f"d_{name}" for name, t in given_inputs.items() if t is not None]
    inputs = [t for t in given_inputs.values() if t is not None]

    total = x + residual if residual is not None else x
    if case["rms"]:
        expected = F.rms_norm(total, (n,), weight, eps=1e-5)
        actual = (EF.add_rms_norm(x, residual, (n,), weight, eps=1e-5, backend=backend)[0] if residual is not None
                  else EF.rms_norm(x, (n,), weight, eps=1e-5, backend=backend))
    else:
        expected = F.layer_norm(total, (n,), weight, bias, eps=1e-5)
        actual = (EF.add_layer_norm(x, residual, (n,), weight, bias, eps=1e-5, backend=backend)[0]
                  if residual is not None else EF.layer_norm(x, (n,), weight, bias, eps=1e-5, backend=backend))
    # x - mean cancels (entirely when n = 1): its rounding, at the scale of x, times rstd and the
    # weights and gradients summed over the rows, is the scale of the terms behind each result.
    # (Found by this test: n = 1, |x| ~ 1e3 left torch's d_weight 1.35e-10 away from the exact 0.)
    detached = total.detach()
    centered = detached if case["rms"] else detached - detached.mean(-1, keepdim=True)
    rstd = (centered.square().mean(-1) + 1e-5).rsqrt()
    terms_scale = ((detached.abs().amax(-1) * rstd).max().item() * rows * grad_out.abs().max().item()
                   * (weight.abs().max().item() if weight is not None else 1.0))
    _compare([actual], [expected], ["y"], terms_scale)
    _compare(torch.autograd.grad(actual, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out), names,
             terms_scale)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_norms_match_torch(backend, device):
    _check_every_drawn_case(norm_cases, _check_norm, backend, device)


# ---------------------------------------------------------------------------------------------
# Linear with a fused activation


def _gated(gate_activation):
    """A gated activation on the product [..., 2H]: gate_activation(first half) * second half."""
    def activation(y):
        gate, up = y.chunk(2, dim=-1)
        return gate_activation(gate) * up
    return activation


ACTIVATIONS = {None: lambda y: y, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
               "relu": F.relu, "silu": F.silu, "swiglu": _gated(F.silu), "geglu": _gated(F.gelu),
               "geglu_tanh": _gated(lambda y: F.gelu(y, approximate="tanh"))}
GATED = ("swiglu", "geglu", "geglu_tanh")


@st.composite
def linear_cases(draw, tiny: bool):
    top = 12 if tiny else 80
    return dict(lead=draw(st.lists(st.integers(1, 4), max_size=2)), k=draw(st.integers(1, top)),
                n=draw(st.integers(1, top)), bias=draw(st.booleans()),
                activation=draw(st.sampled_from(list(ACTIVATIONS))), strided=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def _check_linear(case, backend, device):
    g = torch.Generator().manual_seed(case["seed"])
    x = _tensor(g, *case["lead"], case["k"], strided=case["strided"]).to(device).requires_grad_()
    rows = 2 * case["n"] if case["activation"] in GATED else case["n"]  # gated: gate rows, then up rows
    weight = _tensor(g, rows, case["k"]).to(device).requires_grad_()
    bias = _tensor(g, rows).to(device).requires_grad_() if case["bias"] else None
    inputs = [t for t in (x, weight, bias) if t is not None]
    expected = ACTIVATIONS[case["activation"]](F.linear(x, weight, bias))
    actual = EF.linear(x, weight, bias, activation=case["activation"], backend=backend)
    grad_out = _tensor(g, *expected.shape).to(device)
    _compare([actual], [expected], ["y"])
    _compare(torch.autograd.grad(actual, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out),
             ["d_x", "d_weight", "d_bias"][:len(inputs)])


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_linear_matches_torch(backend, device):
    _check_every_drawn_case(linear_cases, _check_linear, backend, device)


# ---------------------------------------------------------------------------------------------
# Attention

# Broadcast forms of a mask over [B, Hq, Sq, Sk]: which dims it has (0 = broadcast, size 1).
MASK_FORMS = {"BHQK": (1, 1, 1, 1), "B1QK": (1, 0, 1, 1), "11QK": (0, 0, 1, 1), "B11K": (1, 0, 0, 1),
              "QK": None}


@st.composite
def attention_cases(draw, tiny: bool):
    top = 9 if tiny else 24
    return dict(b=draw(st.integers(1, 2)), hk=draw(st.integers(1, 2)), group=draw(st.integers(1, 3)),
                sq=draw(st.integers(1, top)), sk=draw(st.integers(1, top)),
                d=draw(st.integers(1, 16 if tiny else 40)), dv=draw(st.integers(1, 16 if tiny else 40)),
                causal=draw(st.booleans()), mask=draw(st.sampled_from([None, "bool", "float"])),
                form=draw(st.sampled_from(list(MASK_FORMS))), learned=draw(st.booleans()),
                scale=draw(st.sampled_from([None, 0.3])), seed=draw(st.integers(0, 2**16)))


def _check_attention(case, backend, device):
    g = torch.Generator().manual_seed(case["seed"])
    b, hk, sq, sk = case["b"], case["hk"], case["sq"], case["sk"]
    hq = hk * case["group"]
    q = _tensor(g, b, hq, sq, case["d"]).to(device).requires_grad_()
    k = _tensor(g, b, hk, sk, case["d"]).to(device).requires_grad_()
    v = _tensor(g, b, hk, sk, case["dv"]).to(device).requires_grad_()
    inputs = [q, k, v]
    full = (b, hq, sq, sk)
    dims = MASK_FORMS[case["form"]]
    mask_shape = (sq, sk) if dims is None else tuple(size if keep else 1 for size, keep in zip(full, dims))
    mask = None
    if case["mask"] == "bool":
        mask = torch.rand(mask_shape, generator=g) < 0.7
        mask[..., 0] = True  # every row sees key 0 (torch gives NaN for a row that sees nothing)
        mask = mask.to(device)
    elif case["mask"] == "float":
        mask = _tensor(g, *mask_shape).to(device)
        if case["learned"]:
            mask.requires_grad_()
            inputs.append(mask)
    # torch takes no mask together with is_causal: fold causality into the mask for torch's call
    torch_mask = mask
    if case["causal"]:
        visible = torch.ones(sq, sk, dtype=torch.bool, device=device).tril()
        if mask is None:
            torch_mask = visible
        elif mask.dtype == torch.bool:
            torch_mask = mask & visible
        else:
            torch_mask = mask.masked_fill(~visible, float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, torch_mask, scale=case["scale"], enable_gqa=True)
    actual = EF.scaled_dot_product_attention(q, k, v, mask, is_causal=case["causal"], scale=case["scale"],
                                             enable_gqa=True, backend=backend)
    grad_out = _tensor(g, *expected.shape).to(device)
    _compare([actual], [expected], ["out"])
    _compare(torch.autograd.grad(actual, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out),
             ["dq", "dk", "dv", "d_mask"][:len(inputs)])


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_attention_matches_torch(backend, device):
    _check_every_drawn_case(attention_cases, _check_attention, backend, device)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding


@st.composite
def rotary_cases(draw, tiny: bool):
    d = draw(st.integers(2, 16 if tiny else 40))
    seq = draw(st.integers(1, 3 if tiny else 12))
    return dict(b=draw(st.integers(1, 2)), hq=draw(st.integers(1, 3)), hk=draw(st.integers(1, 3)), seq=seq, d=d,
                half=draw(st.integers(1, d // 2)), interleaved=draw(st.booleans()), offsets=draw(st.booleans()),
                extra_rows=draw(st.integers(0, 5)), transposed=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _check_rotary(case, backend, device):
    g = torch.Generator().manual_seed(case["seed"])
    b, seq, d = case["b"], case["seq"], case["d"]
    rows = seq + case["extra_rows"]
    cos, sin = (t.to(device) for t in EF.rotary_cos_sin(rows, 2 * case["half"], theta=50.0, dtype=f64))

    def heads(h):  # [B, H, S, D], or a [B, S, H, D] tensor's transposed view as projections give
        t = _tensor(g, b, seq, h, d).transpose(1, 2) if case["transposed"] else _tensor(g, b, h, seq, d)
        return t.to(device).requires_grad_()

    q, k = heads(case["hq"]), heads(case["hk"])
    offsets = torch.randint(0, case["extra_rows"] + 1, (b,), generator=g).to(device) if case["offsets"] else None
    actual = EF.rotary_qk(q, k, cos, sin, interleaved=case["interleaved"], positions=offsets, backend=backend)
    expected = [torch_rotary(t, cos, sin, offsets, case["interleaved"]) for t in (q, k)]
    grads_out = [_tensor(g, *t.shape).to(device) for t in expected]
    _compare(actual, expected, ["q_out", "k_out"])
    _compare(torch.autograd.grad(actual, (q, k), grads_out), torch.autograd.grad(expected, (q, k), grads_out),
             ["dq", "dk"])


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_rotary_matches_torch(backend, device):
    _check_every_drawn_case(rotary_cases, _check_rotary, backend, device)
