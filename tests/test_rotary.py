"""rotary / rotary_qk (rotary position embedding) on every backend against the float64 reference,
plus gradcheck, parity with transformers, the cos/sin tables, edge and bad inputs."""
import math

import pytest
import torch

import engine.functional as EF
from common import assert_matches_reference, torch_rotary
from conftest import backend_device_pairs, skip_unless_runs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# name: (head dim D, rotary dim R, interleaved)
VARIANTS = {
    "half_split": (16, 16, False),
    "interleaved": (16, 16, True),
    "partial_half_split": (16, 8, False),      # Phi / GPT-NeoX: the last D - R features pass through
    "partial_interleaved": (12, 6, True),      # an odd number of pairs
    "partial_odd_head_dim": (11, 6, False),
}


def make_inputs(d, rotary_dim, dtype, device="cpu", q_heads=4, k_heads=2, batch=2, seq=3, table=8, seed=0):
    """q [batch, q_heads, seq, d] and k [batch, k_heads, seq, d] (leaves that require grad), and
    the tables cos, sin [table, rotary_dim / 2], on device."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq, d, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(batch, k_heads, seq, d, generator=g).to(device, dtype).requires_grad_()
    cos, sin = EF.rotary_cos_sin(table, rotary_dim, theta=100.0, device=device, dtype=dtype)
    return q, k, cos, sin


def outputs_and_grads(fn, q, k, grad_seed=1):
    q_out, k_out = fn(q, k)
    g = torch.Generator().manual_seed(grad_seed)
    loss = (q_out * torch.randn(q_out.shape, generator=g).to(q_out)).sum()
    loss = loss + (k_out * torch.randn(k_out.shape, generator=g).to(k_out)).sum()
    return [q_out, k_out, *torch.autograd.grad(loss, (q, k))]


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("with_offsets", [False, True], ids=["no_offsets", "offsets"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(variant, dtype, with_offsets, backend, device):
    """q and k with different head counts (GQA), rotated in one call, forward and backward."""
    skip_unless_runs(backend, device)
    d, rotary_dim, interleaved = VARIANTS[variant]
    q, k, cos, sin = make_inputs(d, rotary_dim, dtype, device)
    offsets = torch.tensor([5, 2], device=device) if with_offsets else None
    ours = outputs_and_grads(lambda a, b: EF.rotary_qk(a, b, cos, sin, interleaved=interleaved, positions=offsets,
                                                       backend=backend), q, k)
    baseline = outputs_and_grads(lambda a, b: (torch_rotary(a, cos, sin, offsets, interleaved),
                                               torch_rotary(b, cos, sin, offsets, interleaved)), q, k)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    expected = outputs_and_grads(lambda a, b: (torch_rotary(a, cos.double(), sin.double(), offsets, interleaved),
                                               torch_rotary(b, cos.double(), sin.double(), offsets, interleaved)),
                                 q64, k64)
    for name, actual, exp, base in zip(["q_out", "k_out", "dq", "dk"], ours, expected, baseline):
        assert actual.dtype == dtype and actual.device.type == device
        assert_matches_reference(actual, exp, base, name=f"{variant} {name}")


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64(interleaved, backend, device):
    skip_unless_runs(backend, device)
    # small: the numerical Jacobian runs the forward twice per input element (in the interpreter
    # for Triton); a partial rotary dim with a pass-through feature
    q, k, cos, sin = make_inputs(5, 4, torch.float64, device, q_heads=2, k_heads=1, seq=2)
    offsets = torch.tensor([1, 4], device=device)

    def fn(q_in, k_in):
        return EF.rotary_qk(q_in, k_in, cos, sin, interleaved=interleaved, positions=offsets, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k), eps=1e-6, atol=1e-6)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_rotary_alone_matches_rotary_qk(backend, device):
    skip_unless_runs(backend, device)
    q, k, cos, sin = make_inputs(16, 8, torch.float32, device)
    q_out, k_out = EF.rotary_qk(q, k, cos, sin, backend=backend)
    assert torch.equal(EF.rotary(q, cos, sin, backend=backend), q_out)
    assert torch.equal(EF.rotary(k, cos, sin, backend=backend), k_out)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("interleaved", [False, True])
def test_decode_step_matches_the_full_sequence(interleaved, backend, device):
    """A decode step's token (S = 1) at offset L gets what position L of the whole sequence gets."""
    skip_unless_runs(backend, device)
    q, k, cos, sin = make_inputs(16, 16, torch.float32, device, seq=6)
    full_q, full_k = EF.rotary_qk(q, k, cos, sin, interleaved=interleaved, backend=backend)
    lengths = [5, 2]
    step_q = torch.stack([q[b, :, length:length + 1] for b, length in enumerate(lengths)])
    step_k = torch.stack([k[b, :, length:length + 1] for b, length in enumerate(lengths)])
    offsets = torch.tensor(lengths, device=device)
    out_q, out_k = EF.rotary_qk(step_q, step_k, cos, sin, interleaved=interleaved, positions=offsets, backend=backend)
    for b, length in enumerate(lengths):
        torch.testing.assert_close(out_q[b], full_q[b, :, length:length + 1], rtol=0, atol=1e-6)
        torch.testing.assert_close(out_k[b], full_k[b, :, length:length + 1], rtol=0, atol=1e-6)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_strided_inputs(backend, device):
    """q and k as projections lay them out, [B, S, H, D] transposed to [B, H, S, D] views; and a
    gradient that arrives expanded (stride 0), as sum() sends it."""
    skip_unless_runs(backend, device)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 16, generator=g).to(device).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 3, 2, 16, generator=g).to(device).transpose(1, 2).requires_grad_()
    cos, sin = EF.rotary_cos_sin(3, 12, device=device)
    q_out, k_out = EF.rotary_qk(q, k, cos, sin, backend=backend)
    torch.testing.assert_close(q_out, torch_rotary(q, cos, sin, None, False))
    torch.testing.assert_close(k_out, torch_rotary(k, cos, sin, None, False))
    (q_out.sum() + k_out.sum()).backward()
    ones = torch.ones(2, 4, 3, 16, device=device)
    torch.testing.assert_close(q.grad, torch.func.vjp(lambda t: torch_rotary(t, cos, sin, None, False), q)[1](ones)[0])


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_more_heads_than_one_tile(backend, device):
    """64 query heads of 128 features: more than the Triton kernel's tile of heads (2048 elements,
    so 32 heads of 64 pairs) takes at once."""
    skip_unless_runs(backend, device)
    q, k, cos, sin = make_inputs(128, 128, torch.float32, device, q_heads=64, k_heads=8, batch=1, seq=2)
    q_out, k_out = EF.rotary_qk(q, k, cos, sin, backend=backend)
    torch.testing.assert_close(q_out, torch_rotary(q, cos, sin, None, False))
    torch.testing.assert_close(k_out, torch_rotary(k, cos, sin, None, False))


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_empty_batch(backend, device):
    skip_unless_runs(backend, device)
    q, k, cos, sin = make_inputs(16, 16, torch.float32, device, batch=0)
    q_out, k_out = EF.rotary_qk(q, k, cos, sin, backend=backend)
    assert q_out.shape == q.shape and k_out.shape == k.shape


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_matches_transformers_apply_rotary_pos_emb(backend, device):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    skip_unless_runs(backend, device)
    q, k, cos, sin = make_inputs(16, 16, torch.float32, device, seq=5)
    positions = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]], device=device)
    full_cos, full_sin = torch.cat((cos, cos), -1)[positions], torch.cat((sin, sin), -1)[positions]  # [B, S, D]
    hf_q, hf_k = llama.apply_rotary_pos_emb(q, k, full_cos, full_sin)
    ours_q, ours_k = EF.rotary_qk(q, k, cos, sin, positions=torch.tensor([0, 3], device=device), backend=backend)
    torch.testing.assert_close(ours_q, hf_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_k, hf_k, rtol=0, atol=1e-6)


def test_fullgraph_compile_traces_the_custom_op():
    """torch.compile(fullgraph=True) traces rotary_qk through its fake kernels into one graph that
    holds engine::rotary (and engine::rotary_backward), with eager's outputs and gradients."""
    from torch._dynamo.backends.registry import lookup_backend
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    def step(q, k, cos, sin, offsets):
        q_out, k_out = EF.rotary_qk(q, k, cos, sin, interleaved=True, positions=offsets, backend="cpu")
        return (q_out * 2).sum() + k_out.square().sum()

    q, k, cos, sin = make_inputs(16, 12, torch.float32)
    offsets = torch.tensor([1, 3])
    expected_loss = step(q, k, cos, sin, offsets)
    expected = torch.autograd.grad(expected_loss, (q, k))
    torch._dynamo.reset()
    try:
        loss = torch.compile(step, fullgraph=True, backend=recording_backend)(q, k, cos, sin, offsets)
        grads = torch.autograd.grad(loss, (q, k))
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    assert any("engine.rotary" in str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function")
    torch.testing.assert_close(loss, expected_loss)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# The cos/sin tables

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3],
                         ids=["default", "linear", "llama3"])
def test_cos_sin_match_transformers(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_theta=500000.0,
                                      rope_scaling=scaling, max_position_embeddings=512)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(300)[None])
    cos, sin = EF.rotary_cos_sin(300, 128, theta=500000.0, scaling=scaling)
    # transformers works in fp32 (its angles p * inv_freq carry ~p * eps of error), ours in fp64
    torch.testing.assert_close(cos, hf_cos[0, :, :64], rtol=0, atol=300 * 2e-7)
    torch.testing.assert_close(sin, hf_sin[0, :, :64], rtol=0, atol=300 * 2e-7)
    torch.testing.assert_close(cos, hf_cos[0, :, 64:], rtol=0, atol=300 * 2e-7)


def test_cos_sin_float64_math():
    """Against the formulas written out: theta^(-2i/R), and llama3's three bands."""
    cos, sin = EF.rotary_cos_sin(50, 8, theta=10000.0, dtype=torch.float64)
    for i in range(4):
        angle = 49 * 10000.0 ** (-2 * i / 8)
        assert abs(cos[49, i].item() - math.cos(angle)) < 1e-12 and abs(sin[49, i].item() - math.sin(angle)) < 1e-12
    linear, _ = EF.rotary_cos_sin(50, 8, scaling={"rope_type": "linear", "factor": 2.0}, dtype=torch.float64)
    torch.testing.assert_close(linear[2 * torch.arange(25)], cos[:25], rtol=0, atol=1e-12)
    rotary_dim, context = 64, 64
    cos, _ = EF.rotary_cos_sin(2, rotary_dim, theta=500000.0, scaling=LLAMA3, dtype=torch.float64)
    for i in range(rotary_dim // 2):
        frequency = 500000.0 ** (-2 * i / rotary_dim)
        wavelength = 2 * math.pi / frequency
        if wavelength < context / 4.0:      # high frequencies: unchanged
            expected = frequency
        elif wavelength > context / 1.0:    # low frequencies: divided by factor
            expected = frequency / 8.0
        else:                               # between: blended by context / wavelength in [1, 4]
            blend = (context / wavelength - 1.0) / (4.0 - 1.0)
            expected = (1 - blend) * frequency / 8.0 + blend * frequency
        assert abs(cos[1, i].item() - math.cos(expected)) < 1e-12


def test_cos_sin_dtype_and_device():
    cos, sin = EF.rotary_cos_sin(4, 6, dtype=torch.bfloat16, device="meta")
    assert cos.shape == sin.shape == (4, 3) and cos.dtype == torch.bfloat16 and cos.device.type == "meta"


# ---------------------------------------------------------------------------------------------
# Bad inputs


def _bad_calls():
    q = torch.randn(2, 4, 3, 16)
    k = torch.randn(2, 2, 3, 16)
    cos, sin = EF.rotary_cos_sin(8, 16)
    yield "input", ValueError, lambda: EF.rotary(q[0], cos, sin)
    yield "input", TypeError, lambda: EF.rotary(q.to(torch.int64), cos, sin)
    yield "cos", TypeError, lambda: EF.rotary(q, cos.double(), sin)
    yield "sin", TypeError, lambda: EF.rotary(q, cos, sin.half())
    yield "cos", ValueError, lambda: EF.rotary(q, cos.to("meta"), sin)
    yield "cos", ValueError, lambda: EF.rotary(q, cos[None], sin)
    yield "sin", ValueError, lambda: EF.rotary(q, cos, sin[:, :4])
    yield "cos", ValueError, lambda: EF.rotary(q[..., :14], cos, sin)  # rotary dim 16 > head dim 14
    yield "cos", ValueError, lambda: EF.rotary(q, cos[:2], sin[:2])    # 3 positions, 2 table rows
    yield "cos", ValueError, lambda: EF.rotary(q, cos.clone().requires_grad_(), sin)
    yield "interleaved", TypeError, lambda: EF.rotary(q, cos, sin, interleaved=1)
    yield "positions", TypeError, lambda: EF.rotary(q, cos, sin, positions=torch.tensor([0.0, 1.0]))
    yield "positions", ValueError, lambda: EF.rotary(q, cos, sin, positions=torch.tensor([[0], [1]]))
    yield "positions", ValueError, lambda: EF.rotary(q, cos, sin, positions=torch.tensor([0, 6]))  # 6 + 3 > 8
    yield "positions", ValueError, lambda: EF.rotary(q, cos, sin, positions=torch.tensor([-1, 0]))
    yield "key", ValueError, lambda: EF.rotary_qk(q, k[:, :, :2], cos, sin)
    yield "key", ValueError, lambda: EF.rotary_qk(q, k[..., :8], cos, sin)
    yield "key", TypeError, lambda: EF.rotary_qk(q, k.half(), cos, sin)
    yield "query", ValueError, lambda: EF.rotary_qk(q[0], k, cos, sin)
    yield "rotary_dim", ValueError, lambda: EF.rotary_cos_sin(8, 7)
    yield "rotary_dim", ValueError, lambda: EF.rotary_cos_sin(8, 0)
    yield "rotary_dim", TypeError, lambda: EF.rotary_cos_sin(8, 8.0)
    yield "seq_len", ValueError, lambda: EF.rotary_cos_sin(-1, 8)
    yield "seq_len", TypeError, lambda: EF.rotary_cos_sin("8", 8)
    yield "theta", ValueError, lambda: EF.rotary_cos_sin(8, 8, theta=1.0)
    yield "theta", TypeError, lambda: EF.rotary_cos_sin(8, 8, theta="big")
    yield "dtype", TypeError, lambda: EF.rotary_cos_sin(8, 8, dtype=torch.int32)
    yield "scaling", TypeError, lambda: EF.rotary_cos_sin(8, 8, scaling=4.0)
    yield "rope_type", ValueError, lambda: EF.rotary_cos_sin(8, 8, scaling={"rope_type": "yarn", "factor": 4.0})
    yield "factor", ValueError, lambda: EF.rotary_cos_sin(8, 8, scaling={"rope_type": "linear"})
    yield "factor", ValueError, lambda: EF.rotary_cos_sin(8, 8, scaling={"rope_type": "linear", "factor": 0.0})
    yield "original_max_position_embeddings", ValueError, lambda: EF.rotary_cos_sin(
        8, 8, scaling={k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"})
    yield "low_freq_factor", ValueError, lambda: EF.rotary_cos_sin(8, 8, scaling={**LLAMA3, "low_freq_factor": 4.0})


@pytest.mark.parametrize("argument,error,call", list(_bad_calls()),
                         ids=[f"{i}-{a}" for i, (a, _, _) in enumerate(_bad_calls())])
def test_bad_input_names_the_argument(argument, error, call):
    with pytest.raises(error, match=argument):
        call()
