"""Argument checks for engine.functional: every bad input becomes a TypeError (wrong type or
dtype) or ValueError (wrong shape, value or device) naming the argument, before any kernel runs."""
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(value.dtype).removeprefix('torch.')}")
    return value


def optional_tensor(name: str, value, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> Optional[Tensor]:
    return None if value is None else tensor(name, value, dtypes)


def same_dtype(name: str, value: Optional[Tensor], reference_name: str, reference: Tensor) -> None:
    if value is not None and value.dtype != reference.dtype:
        raise TypeError(f"{name} has dtype {str(value.dtype).removeprefix('torch.')} but {reference_name} has "
                        f"{str(reference.dtype).removeprefix('torch.')}; they must match")


def same_place(a: Tensor, b: Tensor) -> bool:
    """Whether a and b are on the same device: two CPU tensors by two flag reads, where comparing
    .device builds two device objects (~0.4 us per pair; every op call checks several pairs)."""
    return (a.is_cpu and b.is_cpu) or a.device == b.device


def same_device(name: str, value: Optional[Tensor], reference_name: str, reference: Tensor) -> None:
    if value is not None and not same_place(value, reference):
        raise ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}; "
                         "they must be on the same device")


def shape(name: str, value: Optional[Tensor], expected: Sequence[int]) -> None:
    if value is not None and value.shape != tuple(expected):  # a Size is a tuple
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(value.shape)}")


def number(name: str, value, low: float = -math.inf, high: float = math.inf,
           include_high: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (low <= value and (value <= high if include_high else value < high)):
        bracket = "]" if include_high else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
    return value


def normalized_shape(value, input: Tensor) -> tuple[int, ...]:
    """torch's normalized_shape: an int or a sequence of ints matching input's trailing dims."""
    if type(value) in (tuple, list) and len(value) == 1 and type(value[0]) is int and input.dim() \
            and input.shape[-1] == value[0]:
        return (value[0],)  # the common case, in a third of the general path's time
    dims = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(dims, torch.Size):
        dims = tuple(dims)
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {value!r}")
    dims = tuple(dims)
    if len(dims) == 0 or any(d < 0 for d in dims):
        raise ValueError(f"normalized_shape must be non-empty with non-negative sizes, got {dims}")
    if input.dim() < len(dims) or tuple(input.shape[-len(dims):]) != dims:
        raise ValueError(f"normalized_shape {dims} does not match the trailing dims of input with shape "
                         f"{tuple(input.shape)}")
    return dims


def companion(name: str, value: Optional[Tensor], reference_name: str, reference: Tensor,
              expected_shape: Optional[Sequence[int]] = None) -> None:
    """An optional tensor that goes with `reference`: None, or a float tensor of reference's dtype
    and device (and of expected_shape, when given)."""
    if value is None:
        return
    if isinstance(value, Tensor) and value.dtype == reference.dtype and same_place(value, reference) and (
            expected_shape is None or value.shape == expected_shape):
        return  # valid: one test instead of four calls (this runs for every weight of every call)
    tensor(name, value)
    same_dtype(name, value, reference_name, reference)
    same_device(name, value, reference_name, reference)
    if expected_shape is not None:
        shape(name, value, expected_shape)


def same_dtypes_and_device(reference_name: str, reference: Tensor, **others: Optional[Tensor]) -> None:
    """Every given tensor matches `reference`'s dtype (TypeError) and device (ValueError)."""
    for name, value in others.items():
        if value is not None and value.dtype == reference.dtype and same_place(value, reference):
            continue  # valid, without the two checks' calls
        same_dtype(name, value, reference_name, reference)
        same_device(name, value, reference_name, reference)


def rank(name: str, value: Tensor, ranks: Sequence[int]) -> None:
    if value.dim() not in ranks:
        allowed = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{name} must be {allowed}, got {value.dim()}-D with shape {tuple(value.shape)}")


def broadcastable(name: str, value: Tensor, target: Sequence[int]) -> None:
    """value's shape broadcasts to `target` (torch's rules, trailing dims aligned)."""
    shape = tuple(value.shape)
    if len(shape) > len(target) or any(s not in (1, t) for s, t in zip(reversed(shape), reversed(tuple(target)))):
        raise ValueError(f"{name} with shape {shape} does not broadcast to {tuple(target)}")


def choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def ids_in_range(name: str, ids: Tensor, limit: int, what: str) -> None:
    """Every id in [0, limit): an embedding lookup past the table is a ValueError naming the
    argument and the offending value, not torch's bare IndexError (or a device-side assert on a
    GPU). One reduction and one sync per call; skipped while torch.compile traces, where the ids'
    values are not known (a graph cannot branch on them)."""
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds {bad}, outside [0, {limit - 1}] ({what} = {limit})")
