"""torch.compile(GPT, fullgraph=True): forward and backward trace into one graph (no graph break)
whose hot ops are the engine's custom ops (traced through their fake kernels), and the compiled
model gives eager's loss, logits and gradients. The backend choice is made while tracing and
guarded: entering engine.backends.use(...) recompiles instead of running a stale choice."""
import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.testing import CompileCounterWithBackend

from engine import backends
from engine.training import next_token_targets

from common import TINY_GPT_CONFIG, tiny_gpt

VOCAB = TINY_GPT_CONFIG["vocab_size"]


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    return ids, next_token_targets(ids, mask), mask


def step(model, ids, targets, mask):
    """One forward + backward; returns (logits, loss, {name: grad})."""
    for p in model.parameters():
        p.grad = None
    logits, loss = model(ids, targets, attention_mask=mask)
    loss.backward()
    return logits.detach(), loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone()
                                            for n, p in model.named_parameters()}


def assert_same(got, expected, mask):
    keep = mask.bool()
    torch.testing.assert_close(got[0][keep], expected[0][keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_fullgraph_traces_engine_ops_and_matches_eager():
    """aot_eager: dynamo's graph plus AOTAutograd's forward/backward graphs, run without codegen;
    the graph must be one, and must hold the engine's custom ops."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    model = tiny_gpt()
    ids, targets, mask = batch()
    expected = step(model, ids, targets, mask)
    compiled = torch.compile(model, fullgraph=True, backend=recording_backend)
    assert_same(step(compiled, ids, targets, mask), expected, mask)
    assert len(graphs) == 1
    targets_called = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    for op in ("engine.layer_norm", "engine.attention", "engine.linear"):
        assert any(op in t for t in targets_called), (op, sorted(targets_called))


def test_fullgraph_inductor_matches_eager():
    model = tiny_gpt()
    ids, targets, mask = batch()
    expected = step(model, ids, targets, mask)
    compiled = torch.compile(model, fullgraph=True)
    assert_same(step(compiled, ids, targets, mask), expected, mask)
    assert_same(step(compiled, ids, targets, mask), expected, mask)  # the cached graph, second call


def test_backend_choice_is_guarded():
    """The automatic choice and an explicit use("reference") trace separately (a recompile),
    both giving eager's results."""
    counter = CompileCounterWithBackend("aot_eager")
    model = tiny_gpt(n_layer=1)
    ids, targets, mask = batch()
    expected = step(model, ids, targets, mask)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    assert_same(step(compiled, ids, targets, mask), expected, mask)
    assert counter.frame_count == 1
    with backends.use("reference"):
        assert_same(step(compiled, ids, targets, mask), expected, mask)
    assert counter.frame_count == 2
    # back outside: the first graph's guards saw no use() stack at all, an empty one now is new
    # state, so this may trace once more; after that the graphs are reused
    assert_same(step(compiled, ids, targets, mask), expected, mask)
    traced = counter.frame_count
    assert_same(step(compiled, ids, targets, mask), expected, mask)
    with backends.use("reference"):
        assert_same(step(compiled, ids, targets, mask), expected, mask)
    assert counter.frame_count == traced <= 3


def test_fullgraph_with_dropout_in_training_mode():
    """Dropout draws its seed inside the custom ops; the graph still has no break."""
    model = tiny_gpt(dropout=0.1)
    model.train()
    ids, targets, mask = batch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits, loss, grads = step(compiled, ids, targets, mask)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_fullgraph_learned_mask_gradient_with_dropout():
    """A float mask that requires grad gets the same gradient compiled as eager (its own custom op
    in the backward graph), with dropout's seed drawn inside the forward op."""
    import engine.functional as EF

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 6, 8, generator=g).requires_grad_() for h in (4, 2, 2))
    bias = torch.randn(1, 4, 6, 6, generator=g).requires_grad_()

    def loss(q, k, v, bias):
        return EF.scaled_dot_product_attention(q, k, v, bias, dropout_p=0.2, enable_gqa=True).square().sum()

    torch.manual_seed(3)
    expected = torch.autograd.grad(loss(q, k, v, bias), (q, k, v, bias))
    torch.manual_seed(3)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, bias), (q, k, v, bias))
    for name, a, e in zip(("dq", "dk", "dv", "d_mask"), got, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=name)
    assert expected[3].abs().sum() > 0


def test_fullgraph_on_the_triton_backend():
    """Under TRITON_INTERPRET=1 (the test suite sets it without a GPU) the Triton kernels run on
    CPU tensors; the compiled model calls them through the same custom ops."""
    needed = ("layer_norm", "attention", "linear")
    missing = [op for op in needed if "triton" not in backends.ops().get(op, ())]
    if missing:
        pytest.skip(f"the triton backend has no implementation of {missing} yet")
    state = backends.status("triton")
    if not state.available or "cpu" not in state.devices:
        pytest.skip(f"triton does not run on CPU tensors here: {state.reason}")
    model = tiny_gpt(n_layer=1, n_embd=32, n_head=2)
    ids, targets, mask = batch()
    expected = step(model, ids, targets, mask)
    with backends.use("triton"):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert_same(step(compiled, ids, targets, mask), expected, mask)
