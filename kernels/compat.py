"""Differences between the Triton releases the kernels support (3.6 to 3.9), in one place.

Interpreter scalars (triton < 3.7): the interpreter holds a scalar as a one-element 1-D numpy
array, and 3.6 turns it into a Python int (`range(0, n, BLOCK)` over a kernel argument n, for
example) with int(array). NumPy 2.4 made int() of an array with ndim > 0 a TypeError ("only
0-dimensional arrays can be converted to Python scalars"), so every loop bounded by a runtime
value failed under 3.6 with NumPy >= 2.4. Triton fixed it after 3.6 (triton-lang/triton#9172;
3.8 and 3.9 have the fix); `patch_interpreter` applies the same conversion to 3.6.

Interpreter launches from several threads (every release): the interpreter keeps the running
launch's grid and its patched language functions in process-wide state, so two threads launching
at once corrupt each other ("ValueError: y >= grid_dim[1]", found by tests/test_concurrency.py).
`patch_interpreter` makes launches take turns. On a GPU, launches are thread-safe and unaffected.
"""
import threading

import triton


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton, e.g. (3, 6)."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


# fp64 decode attention on NVIDIA GPUs: triton 3.6's MMAv2 lowering aborts the whole process
# (an assertion, "Currently fp64 don't support largeK MMA") compiling the decode split kernel's fp64
# tl.dot for sm80/sm90; 3.9 compiles it (python -m engine.readiness). 3.7 and 3.8 were not
# checked, so they are treated as 3.6: the triton backend leaves fp64 decode on GPUs to the
# others (the reference serves it) and readiness does not compile that case.
FP64_DECODE_ON_GPUS = triton_version() >= (3, 9)


def _scalar_index(self):
    return int(self.handle.data.item())  # .item(): a one-element array of any ndim


_INTERPRETER_LAUNCH = threading.Lock()


def _serialize_launches() -> None:
    from triton.runtime import interpreter
    original = interpreter.GridExecutor.__call__
    if getattr(original, "engine_compat", False):
        return  # already patched in this process

    def launch_alone(self, *args, **kwargs):
        with _INTERPRETER_LAUNCH:
            return original(self, *args, **kwargs)

    launch_alone.engine_compat = True
    interpreter.GridExecutor.__call__ = launch_alone


def patch_interpreter() -> None:
    """Make Triton interpreter launches take turns between threads, and convert scalars to ints
    with any NumPy (a no-op on Triton releases that do it themselves). Call it before a kernel
    runs in the interpreter."""
    _serialize_launches()
    if triton_version() >= (3, 7):
        return
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor
    if getattr(original, "engine_compat", False):
        return  # already patched in this process

    # The interpreter installs tensor.__index__ anew for every launch (and restores the old one
    # afterwards) through _patch_lang_tensor, so ours is installed right after it, in the same
    # scope, on every launch.
    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _scalar_index)

    patch_lang_tensor.engine_compat = True
    interpreter._patch_lang_tensor = patch_lang_tensor
