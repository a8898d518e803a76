"""linear_cross_entropy on every backend against torch's cross_entropy(linear(...)) in float64:
loss and gradients, every reduction, label smoothing, ignored rows, several chunks with a
remainder (and, in Triton, several vocabulary blocks with a remainder), gradcheck, edge inputs
and bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import engine.functional as EF
from common import assert_matches_reference
from conftest import backend_device_pairs, skip_unless_runs
from engine.ops import cross_entropy

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]
ROWS, WIDTH, VOCAB = 13, 16, 37


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 rows (13 rows: 4 + 4 + 4 + 1) and, in Triton, vocabulary blocks of 16 (37 logits:
    16 + 16 + 5), so that every loop runs several times and ends on a partial step."""
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 4 * VOCAB)
    from engine.kernels import cross_entropy as triton_cross_entropy
    monkeypatch.setattr(triton_cross_entropy, "MAX_BLOCK_V", 16)


def make_inputs(dtype, device, has_bias, ignore_index=-100, rows=ROWS, vocab=VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=g).to(dtype=dtype, device=device).requires_grad_()

    hidden, weight = rand(rows, WIDTH), rand(vocab, WIDTH)
    bias = rand(vocab) if has_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[1::5] = ignore_index  # rows 1, 6, 11
    return hidden, weight, bias, targets.to(device)


def loss_and_grads(fn, hidden, weight, bias, targets, reduction, grad_seed=1):
    """The loss and the gradients of hidden, weight (and bias) for a random loss gradient."""
    loss = fn(hidden, weight, bias, targets)
    g = torch.Generator().manual_seed(grad_seed)
    grad_loss = torch.randn(loss.shape, generator=g).to(loss)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves, grad_loss))


def torch_loss(reduction, label_smoothing, ignore_index=-100):
    return lambda h, w, b, t: F.cross_entropy(F.linear(h, w, b), t, ignore_index=ignore_index,
                                              label_smoothing=label_smoothing, reduction=reduction)


def engine_loss(reduction, label_smoothing, backend, ignore_index=-100):
    return lambda h, w, b, t: EF.linear_cross_entropy(h, w, t, b, ignore_index=ignore_index,
                                                      label_smoothing=label_smoothing, reduction=reduction,
                                                      backend=backend)


def as_float64(*tensors):
    return [t.detach().double().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.usefixtures("poisoned_outputs", "small_chunks")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(reduction, label_smoothing, has_bias, dtype, backend, device):
    skip_unless_runs(backend, device)
    hidden, weight, bias, targets = make_inputs(dtype, device, has_bias)
    ours = loss_and_grads(engine_loss(reduction, label_smoothing, backend), hidden, weight, bias, targets, reduction)
    baseline = loss_and_grads(torch_loss(reduction, label_smoothing), hidden, weight, bias, targets, reduction)
    expected = loss_and_grads(torch_loss(reduction, label_smoothing), *as_float64(hidden, weight, bias), targets,
                              reduction)
    names = ["loss", "d_hidden", "d_weight", "d_bias"][:len(expected)]
    for name, actual, exp, base in zip(names, ours, expected, baseline):
        assert actual.dtype == dtype and actual.device.type == device
        # the log-sum-exp sums VOCAB terms, d_weight and d_bias ROWS
        assert_matches_reference(actual, exp, base, name=f"{reduction} {name}", reduction_length=VOCAB)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(reduction, backend, device):
    skip_unless_runs(backend, device)
    hidden, weight, bias, targets = make_inputs(torch.float64, device, True, rows=6, vocab=19)
    loss = engine_loss(reduction, 0.1, backend)
    assert torch.autograd.gradcheck(lambda h, w, b: loss(h, w, b, targets), (hidden, weight, bias),
                                    eps=1e-6, atol=1e-6)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index_that_is_a_class(reduction, backend, device):
    """ignore_index may name a real class (3 here): rows with that target count for nothing."""
    skip_unless_runs(backend, device)
    hidden, weight, bias, targets = make_inputs(torch.float64, device, True, ignore_index=3)
    ours = loss_and_grads(engine_loss(reduction, 0.1, backend, ignore_index=3), hidden, weight, bias, targets,
                          reduction)
    expected = loss_and_grads(torch_loss(reduction, 0.1, ignore_index=3), hidden, weight, bias, targets, reduction)
    for actual, exp in zip(ours, expected):
        assert_matches_reference(actual, exp)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored(reduction, backend, device):
    """As torch: "mean" is NaN (0 / 0), "sum" 0, "none" zeros; every gradient is 0."""
    skip_unless_runs(backend, device)
    hidden, weight, bias, _ = make_inputs(torch.float32, device, True)
    targets = torch.full((ROWS,), -100, device=device)
    loss, *grads = loss_and_grads(engine_loss(reduction, 0.1, backend), hidden, weight, bias, targets, reduction)
    expected = torch_loss(reduction, 0.1)(hidden, weight, bias, targets)
    if reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(expected)
    else:
        assert torch.equal(loss, expected.detach())
    for grad in grads:
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_leading_dims_and_no_grad(backend, device):
    """hidden [B, T, d] with targets [B, T] (a language model's batch): "none" keeps targets' shape;
    without gradients (inference) the loss is the same."""
    skip_unless_runs(backend, device)
    hidden, weight, bias, targets = make_inputs(torch.float64, device, False, rows=12)
    hidden3, targets2 = hidden.detach().view(3, 4, WIDTH), targets.view(3, 4)
    with torch.no_grad():
        ours = EF.linear_cross_entropy(hidden3, weight, targets2, reduction="none", backend=backend)
    assert ours.shape == (3, 4)
    assert_matches_reference(ours, F.cross_entropy(F.linear(hidden3, weight).transpose(1, 2), targets2,
                                                   reduction="none"))


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_no_rows(backend, device):
    skip_unless_runs(backend, device)
    hidden, weight, _, _ = make_inputs(torch.float32, device, False, rows=0)
    targets = torch.zeros(0, dtype=torch.int64, device=device)
    assert torch.isnan(EF.linear_cross_entropy(hidden, weight, targets, backend=backend))
    assert EF.linear_cross_entropy(hidden, weight, targets, reduction="sum", backend=backend).item() == 0.0
    assert EF.linear_cross_entropy(hidden, weight, targets, reduction="none", backend=backend).shape == (0,)


def test_backward_of_a_retained_graph_runs_again():
    """loss.backward(retain_graph=True) three times accumulates three times the gradients: the
    forward's saved gradients are scaled out of place, never adopted as .grad."""
    hidden, weight, bias, targets = make_inputs(torch.float64, "cpu", True)
    loss = EF.linear_cross_entropy(hidden, weight, targets, bias, backend="reference")
    for _ in range(3):
        loss.backward(retain_graph=True)
    expected = torch.autograd.grad(torch_loss("mean", 0.0)(hidden, weight, bias, targets), (hidden, weight, bias))
    for leaf, grad in zip((hidden, weight, bias), expected):
        assert_matches_reference(leaf.grad, 3 * grad)


def test_chunk_rows_bound_the_logits():
    """A chunk's logits hold at most CHUNK_ELEMENTS values, and at least one row."""
    assert cross_entropy.chunk_rows(50257) * 50257 <= cross_entropy.CHUNK_ELEMENTS
    assert cross_entropy.chunk_rows(2 * cross_entropy.CHUNK_ELEMENTS) == 1


def test_compiles_fullgraph():
    """torch.compile traces the custom ops (forward and the "none" backward) in one graph."""
    hidden, weight, bias, targets = make_inputs(torch.float32, "cpu", True)

    def losses(h, w, b, t):
        mean = EF.linear_cross_entropy(h, w, t, b, label_smoothing=0.1, backend="reference")
        return mean + EF.linear_cross_entropy(h, w, t, b, reduction="none", backend="reference").sum()

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    ours = loss_and_grads(compiled, hidden, weight, bias, targets, "mean")
    expected = loss_and_grads(losses, hidden, weight, bias, targets, "mean")
    for actual, exp in zip(ours, expected):
        torch.testing.assert_close(actual, exp)


def _bad_calls():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 3])
    yield "hidden", TypeError, lambda: EF.linear_cross_entropy(h.long(), w, t)
    yield "weight", ValueError, lambda: EF.linear_cross_entropy(h, torch.randn(10, 7), t)
    yield "weight", ValueError, lambda: EF.linear_cross_entropy(h, torch.randn(8), t)
    yield "weight", ValueError, lambda: EF.linear_cross_entropy(h, torch.randn(0, 8), t)
    yield "weight", TypeError, lambda: EF.linear_cross_entropy(h, w.double(), t)
    yield "bias", ValueError, lambda: EF.linear_cross_entropy(h, w, t, torch.randn(9))
    yield "bias", TypeError, lambda: EF.linear_cross_entropy(h, w, t, torch.randn(10).half())
    yield "targets", TypeError, lambda: EF.linear_cross_entropy(h, w, t.int())
    yield "targets", TypeError, lambda: EF.linear_cross_entropy(h, w, [0, 1, 2, 3])
    yield "targets", ValueError, lambda: EF.linear_cross_entropy(h, w, t[:3])
    yield "targets", ValueError, lambda: EF.linear_cross_entropy(h, w, t.to("meta"))
    yield "targets", ValueError, lambda: EF.linear_cross_entropy(h, w, torch.tensor([0, 1, 10, -100]))
    yield "targets", ValueError, lambda: EF.linear_cross_entropy(h, w, torch.tensor([0, -1, 2, 3]))
    yield "ignore_index", TypeError, lambda: EF.linear_cross_entropy(h, w, t, ignore_index=0.5)
    yield "label_smoothing", ValueError, lambda: EF.linear_cross_entropy(h, w, t, label_smoothing=1.5)
    yield "label_smoothing", TypeError, lambda: EF.linear_cross_entropy(h, w, t, label_smoothing="0.1")
    yield "reduction", ValueError, lambda: EF.linear_cross_entropy(h, w, t, reduction="avg")


@pytest.mark.parametrize("argument,error,call", list(_bad_calls()),
                         ids=[f"{i}-{a}" for i, (a, _, _) in enumerate(_bad_calls())])
def test_bad_input_names_the_argument(argument, error, call):
    with pytest.raises(error, match=argument):
        call()
