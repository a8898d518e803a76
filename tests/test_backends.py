"""The backend registry: availability report, explicit and automatic selection, fallback logging."""
import logging

import pytest
import torch

import engine.functional as EF
from engine import backends


def test_available_lists_every_backend_with_a_reason():
    report = backends.available()
    assert set(report) == set(backends.BACKENDS)
    for name, state in report.items():
        assert state.name == name and state.reason
    assert report["reference"].available
    if not torch.cuda.is_available():
        assert not report["cuda"].available and "GPU" in report["cuda"].reason


def test_every_op_has_every_backend():
    for op, names in backends.ops().items():
        assert set(names) == set(backends.BACKENDS), op


def test_explicit_backend_that_cannot_run_says_why():
    x = torch.randn(2, 8)
    with pytest.raises(backends.BackendError, match="'cuda' cannot run layer_norm: .*unavailable"):
        EF.layer_norm(x, (8,), backend="cuda")


def test_unknown_backend_name():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        EF.layer_norm(x, (8,), backend="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        with backends.use("fast"):
            pass


def _chosen(monkeypatch) -> list:
    """Records which backend each layer_norm call runs on."""
    chosen = []
    select = backends.select

    def recording_select(op, device, args, backend=None):
        name = select(op, device, args, backend)
        chosen.append(name)
        return name

    monkeypatch.setattr(backends, "select", recording_select)
    return chosen


def test_explicit_choices_in_order_of_precedence(monkeypatch):
    chosen = _chosen(monkeypatch)
    x = torch.randn(2, 8)
    monkeypatch.setenv("ENGINE_BACKEND", "reference")
    EF.layer_norm(x, (8,))
    with backends.use("cpu"):
        EF.layer_norm(x, (8,))                      # use() beats the environment
        EF.layer_norm(x, (8,), backend="reference")  # the argument beats use()
    monkeypatch.delenv("ENGINE_BACKEND")
    EF.layer_norm(x, (8,))                          # automatic: cpu for CPU tensors
    assert chosen == ["reference", "cpu", "reference", "cpu"]


def test_environment_choice_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("ENGINE_BACKEND", "cuda")
    with pytest.raises(backends.BackendError, match="cuda"):
        EF.layer_norm(torch.randn(2, 8), (8,))


def test_automatic_fallback_is_logged_once(monkeypatch, caplog):
    chosen = _chosen(monkeypatch)
    cpu = backends.implementation("layer_norm", "cpu")
    refusing = backends.Implementation(cpu.forward, cpu.backward, lambda args: ["refused for this test"])
    monkeypatch.setitem(backends._registry["layer_norm"], "cpu", refusing)
    monkeypatch.setattr(backends, "_logged_fallbacks", set())
    x = torch.randn(2, 8)
    with caplog.at_level(logging.WARNING, logger="engine"):
        EF.layer_norm(x, (8,))
        EF.layer_norm(x, (8,))
    assert chosen == ["reference", "reference"]
    messages = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert messages == ["engine: layer_norm falls back from the cpu backend: refused for this test"]
    with pytest.raises(backends.BackendError, match="refused for this test"):
        EF.layer_norm(x, (8,), backend="cpu")


def test_an_explicit_choice_reports_every_reason(monkeypatch):
    cpu = backends.implementation("layer_norm", "cpu")
    refusing = backends.Implementation(cpu.forward, cpu.backward,
                                       lambda args: [f"rows {args.x.shape[0]} refused", "and a second reason"])
    monkeypatch.setitem(backends._registry["layer_norm"], "cpu", refusing)
    with pytest.raises(backends.BackendError, match="rows 2 refused; and a second reason"):
        EF.layer_norm(torch.randn(2, 8), (8,), backend="cpu")


@pytest.mark.parametrize("name", ["", "fast"])
def test_a_bad_backend_name_is_an_error(name, monkeypatch):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="backend= takes one of"):
        EF.layer_norm(x, (8,), backend=name)
    monkeypatch.setenv("ENGINE_BACKEND", "fast")
    with pytest.raises(ValueError, match="ENGINE_BACKEND"):
        EF.layer_norm(x, (8,))


def test_reference_on_meta_tensors_says_where_it_runs():
    with pytest.raises(backends.BackendError, match="runs on CPU and CUDA tensors"):
        EF.layer_norm(torch.randn(2, 8, device="meta"), (8,), backend="reference")
