"""The one registry of op implementations, and the rules that choose one for a call.

    registry: op name -> backend name -> Implementation(forward, backward, supports)

Backends:
    reference  plain torch (engine/reference.py): the test oracle and the fallback; always there
    triton     kernels/*.py (imported as engine.kernels.<op>): CUDA/ROCm tensors, or CPU tensors
               under TRITON_INTERPRET=1. Registered by module and function names (register_module)
               and imported when the backend is first asked for, so `import engine` works without
               triton.
    cpu        csrc/cpu/*.cpp through the C++ extension (engine/_ext.py), CPU tensors
    cuda       csrc/cuda/*.cu through the C++ extension, CUDA tensors

Choosing (engine.functional calls `select` once per op call):
    explicit   the `backend=` argument, else the innermost `with use(name):`, else the
               ENGINE_BACKEND environment variable. If that backend cannot serve the call,
               BackendError says why; there is no silent fallback from an explicit choice.
    automatic  by device: CUDA tensors try triton, then cuda; CPU tensors try cpu; then
               reference. The first whose `supports(...)` accepts the call wins. Each
               fallback is logged once per (op, backend) through the `engine` logger.
"""
import contextlib
import functools
import importlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch

BACKENDS = ("reference", "triton", "cpu", "cuda")
AUTOMATIC_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}

logger = logging.getLogger("engine")


class BackendError(RuntimeError):
    """An explicitly chosen backend cannot serve a call; the message says why."""


@dataclass(frozen=True)
class Implementation:
    forward: Callable
    backward: Optional[Callable]
    # supports(args) -> [] when this implementation can serve the call, else every reason it
    # cannot (short sentences: "head dim 512 > 256"). args is the op's NamedTuple of the
    # forward's arguments (LayerNormArgs, AttentionArgs, ... in engine/ops).
    supports: Callable[[tuple], list]


def supports_everything(args) -> list:
    return []


_registry: dict[str, dict[str, Implementation]] = {}


def register(op: str, backend: str, forward: Callable, backward: Optional[Callable] = None,
             supports: Callable[[tuple], list] = supports_everything) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends are {BACKENDS}")
    _registry.setdefault(op, {})[backend] = Implementation(forward, backward, supports)


class Deferred:
    """The function `attribute` of `module`, imported on first use. torch.compile traces `select`,
    which calls `supports`: status() has imported it by then (why_not asks status first), so no
    trace meets the import; and the registry holds this same object before and after the import,
    so no trace sees a registry entry change under it."""

    def __init__(self, module: str, attribute: str):
        self.module, self.attribute, self.target = module, attribute, None

    def resolve(self) -> Callable:
        if self.target is None:
            self.target = getattr(importlib.import_module(self.module), self.attribute)
        return self.target

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)


# backend -> the Deferred functions registered for it; status(backend) imports them all, so a
# module that fails to import makes the backend unavailable with the error as the reason.
_deferred: dict[str, list[Deferred]] = {}


def register_module(op: str, backend: str, module: str, forward: str, backward: Optional[str] = None,
                    supports: Optional[str] = None) -> None:
    """register(), with the functions named by attribute of `module`, which is imported when the
    backend is first asked for (status) or called, not now."""
    functions = [Deferred(module, name) if name else None for name in (forward, backward, supports)]
    _deferred.setdefault(backend, []).extend(f for f in functions if f is not None)
    register(op, backend, functions[0], functions[1], functions[2] or supports_everything)


def implementation(op: str, backend: str) -> Implementation:
    return _registry[op][backend]


def ops() -> dict[str, tuple[str, ...]]:
    """Every registered op with the backends that implement it."""
    return {op: tuple(impls) for op, impls in _registry.items()}


# ---------------------------------------------------------------------------------------------
# Availability: can this backend run at all on this machine, and on which devices?


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str           # why not, or what it runs on
    devices: tuple = ()   # device types it serves here


def _triton_status() -> BackendStatus:
    try:
        import triton  # noqa: F401
    except Exception as error:  # a broken install raises more than ImportError
        return BackendStatus("triton", False, f"triton does not import: {error}")
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        devices.append("cpu")
    if not devices:
        return BackendStatus("triton", False,
                             "no GPU (torch.cuda.is_available() is False) and TRITON_INTERPRET is not "
                             "set, so Triton kernels have nowhere to run")
    how = {"cuda": "CUDA/ROCm tensors", "cpu": "CPU tensors in the Triton interpreter"}
    return BackendStatus("triton", True, ", ".join(how[d] for d in devices), tuple(devices))


def _extension_status(name: str) -> BackendStatus:
    from engine import _ext

    if name == "cuda" and not torch.cuda.is_available():
        return BackendStatus("cuda", False, "no GPU (torch.cuda.is_available() is False)")
    try:
        _ext.load(name)
    except _ext.BuildError as error:
        return BackendStatus(name, False, str(error))
    return BackendStatus(name, True, f"{name.upper()} tensors, C++ extension built", (name,))


def _import_deferred(name: str) -> Optional[str]:
    """None once every Deferred function of backend `name` is imported, else why one is not."""
    for function in _deferred.get(name, ()):
        try:
            function.resolve()
        except Exception as error:  # as in _triton_status: a broken module raises more than ImportError
            return f"{function.module} does not import: {type(error).__name__}: {error}"
    return None


@functools.lru_cache(maxsize=None)
def status(name: str) -> BackendStatus:
    """Whether backend `name` works here; building the C++ extension or importing the Triton
    kernels the first time it is asked."""
    if name == "reference":
        return BackendStatus("reference", True, "plain PyTorch, any device", ("cpu", "cuda"))
    if name == "triton":
        state = _triton_status()
    elif name in ("cpu", "cuda"):
        state = _extension_status(name)
    else:
        raise ValueError(f"unknown backend {name!r}; backends are {BACKENDS}")
    reason = _import_deferred(name) if state.available else None
    return state if reason is None else BackendStatus(name, False, reason)


def available() -> dict[str, BackendStatus]:
    """Every backend with whether it works on this machine and, if not, why."""
    return {name: status(name) for name in BACKENDS}


# ---------------------------------------------------------------------------------------------
# Choosing a backend for one call

class _Context(threading.local):
    """The thread's stack of use(...) choices, made on a thread's first access: every op call
    reads it, and getattr's missed lookup on a plain threading.local cost ~1 us of that."""

    def __init__(self):
        self.stack = []


_context = _Context()


@contextlib.contextmanager
def use(name: str):
    """Run the ops in this block on backend `name` (an explicit choice: errors if it cannot)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; backends are {BACKENDS}")
    stack = _context.stack
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def explicit_choice(backend: Optional[str] = None) -> Optional[str]:
    """The backend the caller asked for: argument, then `use(...)`, then ENGINE_BACKEND."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: backend= takes one of {BACKENDS}, or None for the "
                             "automatic choice")
        return backend
    stack = _context.stack
    if stack:
        return stack[-1]
    choice = os.environ.get("ENGINE_BACKEND")
    if not choice:  # unset, or set to nothing as `ENGINE_BACKEND= cmd` does
        return None
    if choice not in BACKENDS:
        raise ValueError(f"unknown backend {choice!r} in the environment variable ENGINE_BACKEND; set it to one "
                         f"of {BACKENDS}, or unset it for the automatic choice")
    return choice


# torch.compile traces `select` (so that the choice is part of the graph and guarded like any
# Python state it reads: use(...), ENGINE_BACKEND), but two things in it must not be traced: the
# backend status (building the C++ extension) and the once-only fallback log. Both are marked
# assume_constant_result: while tracing they run as plain Python and their results are baked into
# the graph; in eager mode the marking changes nothing.


@torch.compiler.assume_constant_result
def _status_constant(name: str) -> BackendStatus:
    return status(name)


def _cannot_serve(op: str, backend: str, device_type: str) -> list:
    """[] when `backend` implements `op`, works here and runs on `device_type` tensors, else why
    not. What does not depend on the call's arguments, so it never changes within a process."""
    if backend not in _registry.get(op, {}):
        return [f"{op} has no {backend} implementation"]
    state = _status_constant(backend)
    if not state.available:
        return [f"the {backend} backend is unavailable: {state.reason}"]
    if device_type not in state.devices:
        if backend == "reference":
            return [f"the reference backend runs on CPU and CUDA tensors (plain PyTorch), not {device_type}"]
        return [f"the {backend} backend does not run on {device_type} tensors here ({state.reason})"]
    return []


def why_not(op: str, backend: str, device: torch.device, args: tuple) -> list:
    """[] when `backend` can run `op` on `args` (the op's argument NamedTuple), else every reason
    it cannot."""
    return _cannot_serve(op, backend, device.type) or _registry[op][backend].supports(args)


_logged_fallbacks: set = set()


@torch.compiler.assume_constant_result
def _log_fallback_once(op: str, candidate: str, reason: str) -> bool:
    """One warning per (op, backend) that refused a call, and one per backend that is unavailable
    altogether (a failed build would otherwise be reported once for every op)."""
    state = _status_constant(candidate)
    key = candidate if not state.available else (op, candidate)
    if key not in _logged_fallbacks and candidate != "reference":
        _logged_fallbacks.add(key)
        if not state.available:
            logger.warning("engine: the %s backend is unavailable, its ops fall back: %s", candidate, state.reason)
        else:
            logger.warning("engine: %s falls back from the %s backend: %s", op, candidate, reason)
    return True


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def _automatic_candidates(op: str, device: torch.device) -> tuple[str, ...]:
    """The backends of the automatic order that could serve `op` on `device`, in order: all that
    is left to ask per call is each one's `supports(args)`. Cached: availability does not change
    within a process (status is cached too). A backend left out is logged once here. Keyed by the
    device itself: reading device.type costs ~0.5 us a call, hashing the device far less."""
    device_type = device.type
    candidates = []
    for candidate in AUTOMATIC_ORDER.get(device_type, ("reference",)):
        reasons = _cannot_serve(op, candidate, device_type)
        if reasons:
            _log_fallback_once(op, candidate, "; ".join(reasons))
        else:
            candidates.append(candidate)
    return tuple(candidates)


def select(op: str, device: torch.device, args: tuple, backend: Optional[str] = None) -> str:
    """The backend that runs this call of `op` (see the module docstring for the rules). args is
    the op's argument NamedTuple, which each candidate's `supports` reads."""
    choice = explicit_choice(backend)
    if choice is not None:
        reasons = why_not(op, choice, device, args)
        if reasons:
            raise BackendError(f"backend {choice!r} cannot run {op}: {'; '.join(reasons)}")
        return choice
    for candidate in _automatic_candidates(op, device):
        reasons = _registry[op][candidate].supports(args)
        if not reasons:
            return candidate
        _log_fallback_once(op, candidate, "; ".join(reasons))
    return "reference"
