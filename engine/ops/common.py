"""What every op module in engine/ops shares: the path from a validated call to its kernel.

Each op module (layer_norm.py, attention.py, linear.py) follows one pattern, top to bottom:
    1. the implementation contract (docstring) and a NamedTuple of the forward's arguments, which
       `supports` functions receive and which keys the backend choice;
    2. the backends: reference (engine/reference.py), triton (engine/kernels/<op>.py, imported on
       first use), cpu and cuda (csrc/, through `register_cpp`);
    3. autograd: one torch.library custom op per direction (what torch.compile traces, with fake
       kernels; its registered backward calls the backward custom op) and the same forward and
       backward as an eager autograd.Function (`eager_op`; its backward calls the backward
       function directly);
    4. the entry that engine.functional calls: lay out the arguments, `backends.select`, `run`.

Why two autograd wrappers. A torch.library custom op costs about 25 us of Python per call in eager
mode (schema checks, dispatcher redispatch, the autograd wrapper), several times a tiny kernel's
own time. `run` therefore calls the op's plain forward when no input needs a gradient, an
autograd.Function (about 5 us) when one does, and the custom op only while torch.compile traces,
so that fullgraph=True graphs hold one opaque node per call.

The plain forward and the custom op's body return the same outputs but for absent ones: custom
ops cannot return None or a Python int, so the body turns an absent output into an empty tensor
and the dropout seed into a tensor (`torch.tensor` alone costs ~2 us), which the plain forward
skips. The entry reads its outputs the same way from both.
"""
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from engine import backends
from engine._validate import FLOAT_DTYPES


def draw_seed() -> int:
    """A 62-bit dropout seed from torch's default generator, so torch.manual_seed reproduces it."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def unit_last_stride(t: Tensor) -> Tensor:
    """t itself when its last dim has unit stride (or size 1), else a contiguous copy. (A
    contiguous tensor, the common case, is known by one flag; t.stride(-1) costs ~0.4 us.)"""
    return t if t.is_contiguous() or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def rows(t: Tensor, n: int) -> Tensor:
    """t [..., N] as [M, N] with unit column stride: a view when the layout allows, else a copy.
    A t already [M, N] is not reshaped (reshape costs ~1 us of a tiny call)."""
    return unit_last_stride(t if t.dim() == 2 and t.shape[1] == n else t.reshape(-1, n))


def dtype_reason(dtype: torch.dtype, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> list[str]:
    """[] when dtype is allowed, else the one reason a backend cannot take it."""
    if dtype in allowed:
        return []
    names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
    return [f"dtype {str(dtype).removeprefix('torch.')} is not one of {names}"]


def register_cpp(op: str, forward: Callable[[str], Callable], backward: Optional[Callable[[str], Callable]],
                 supports: Callable[[str], Callable]) -> None:
    """Registers op for the "cpu" and "cuda" backends (one C++ extension each, same bindings):
    forward/backward/supports take the extension kind and return that backend's function."""
    for kind in ("cpu", "cuda"):
        backends.register(op, kind, forward(kind), backward(kind) if backward else None, supports(kind))


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """True when autograd must record this call: grad mode is on and an input requires grad."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def eager_op(forward: Callable, setup_context: Callable, backward: Callable) -> type:
    """The autograd.Function twin of a custom op: the same forward (the custom op's body), the
    same setup_context(ctx, inputs, output) and backward(ctx, *grads) as its register_autograd."""

    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    EagerOp.__name__ = EagerOp.__qualname__ = f"Eager_{forward.__name__.lstrip('_')}"
    return EagerOp


def run(custom_op, eager: Optional[type], plain: Callable, inputs: tuple, record_grad: bool):
    """Calls one op direction: the custom op while torch.compile traces, the eager
    autograd.Function when autograd must record the call, else the plain forward (see the module
    docstring). An op without autograd, such as the decode step, passes eager=None and
    record_grad=False."""
    if torch.compiler.is_compiling():
        return custom_op(*inputs)
    if record_grad:
        return eager.apply(*inputs)
    return plain(*inputs)
