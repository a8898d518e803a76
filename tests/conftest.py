"""Test set-up shared by every test file.

Without a GPU, Triton kernels run on CPU tensors in the Triton interpreter, which must be switched
on before any kernel module is imported; with a GPU they run for real on CUDA tensors. The C++
extension is built once per session (and cached on disk across sessions by torch).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from engine import backends  # noqa: E402


def backend_device_pairs() -> list:
    """Every (backend, device) pair the suite exercises; pairs that cannot run here are skipped
    with the backend's reason, never silently dropped."""
    pairs = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu")]
    if torch.cuda.is_available():
        pairs += [("reference", "cuda"), ("triton", "cuda"), ("cuda", "cuda")]
    return [pytest.param(b, d, id=f"{b}-{d}") for b, d in pairs]


def skip_unless_runs(backend: str, device: str) -> None:
    state = backends.status(backend)
    if not state.available or device not in state.devices:
        pytest.skip(f"{backend} backend does not run on {device} here: {state.reason}")


@pytest.fixture(scope="session", autouse=True)
def build_extension_once():
    """Build (or load the cached) C++ extension before the first test, once per session."""
    backends.available()


@pytest.fixture
def poisoned_outputs():
    """Every tensor allocated with torch.empty (in Python or C++) starts as NaN, so an output
    element a kernel forgets to write fails the comparison instead of passing by luck."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
