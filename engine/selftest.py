"""python -m engine.selftest: check an installed engine on this machine.

    python -m engine.selftest [--device cpu|cuda] [--quick] [--ops NAME,...] [--backends NAME,...]
                              [--json PATH] [--jobs N]

Prints the versions (python, torch, triton, transformers, CUDA and driver), the devices and every
backend with why it is or is not available. Then runs every op on every backend that runs on the
device (CPU tensors: cpu and reference, plus triton when the Triton interpreter is on; CUDA
tensors: triton, cuda and reference) in fp32, bf16 and fp16, forward and backward, on a small and
a medium shape (--quick: the small one only; the Triton interpreter: the small one only, as it
takes about a millisecond per program). Each result is judged against the float64 reference with
the project's accuracy rule (engine/accuracy.py: 2x the error plain PyTorch makes in the same
dtype on the same inputs, plus eps at the result's scale). Dropout is checked for
reproducibility (the same torch seed gives bit-identical outputs and gradients) and against the
float64 reference under the dropout mask every backend shares (engine/reference.py), so the
backends that run agree on it.

One row per check: op, backend, dtype, direction, shape, max error, allowed error, the result that
came closest to its allowance, time (of that first call: it includes Triton's compiles on a GPU)
and status. An exception in a check is a failed row with its message, never a crash. The exit
status is 1 when any check fails, when the device is not there, or when a backend the device
should have (cpu; triton and cuda on a GPU) is unavailable.

On a GPU nearly all the time goes into Triton's compiles (autotuning compiles every candidate
configuration), which take one CPU core each: there the ops are checked in parallel processes
(--jobs, default up to 8), one op per process. The compiles depend on the kernels' constexprs,
dtypes and the divisibility by 16 of the sizes and strides (Triton specializes on it), not on
the sizes themselves: the small and medium shapes of an op keep the same divisibility where that
costs nothing, so that both run the same compiled kernels. scripts/gpu_check.sh counts them.
"""
import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

import engine
import engine.functional as EF
from engine import backends, reference
from engine.accuracy import allowed_error, max_error

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# What each device must be able to run for the installation to count as working; other backends
# (the Triton interpreter on a CPU) are checked when they are available.
EXPECTED_BACKENDS = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
DROPOUT_P = 0.25
DROPOUT_SEED = 1234


# ---------------------------------------------------------------------------------------------
# Problems: one op on one set of inputs, as three functions of the same named inputs


@dataclass
class Problem:
    inputs: dict                 # name -> tensor; all of them are differentiated in the backward check
    engine: Callable             # (inputs, backend) -> {output name: tensor}, the engine op
    plain: Callable              # (inputs) -> outputs of what a user writes in plain PyTorch: the baseline
    reference: Callable          # (float64 inputs) -> outputs of engine/reference.py's math: the oracle
                                 # (the reference backend is that math too: see the dropout problems)
    reduction_length: int        # the longest sum behind any result (engine/accuracy.py)
    terms_scale: dict = field(default_factory=dict)  # result name -> magnitude of the terms summed into it
    backward: bool = True


def _randn(g: torch.Generator, *shape, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def _norm_problem(residual: bool, rms: bool):
    """layer_norm / rms_norm / add_layer_norm / add_rms_norm over the last dim of `shape`."""
    def build(shape, g):
        n = shape[-1]
        inputs = {"x": _randn(g, *shape, shift=0.5)}  # a non-zero mean, so that centering matters
        if residual:
            inputs["residual"] = _randn(g, *shape)
        inputs["weight"] = _randn(g, n, shift=1.0)
        if not rms:
            inputs["bias"] = _randn(g, n)
        eps = 1e-5

        def engine_op(t, backend):
            if residual:
                call = EF.add_rms_norm if rms else EF.add_layer_norm
                args = (t["weight"],) if rms else (t["weight"], t["bias"])
                y, total = call(t["x"], t["residual"], (n,), *args, eps, backend=backend)
                return {"y": y, "sum": total}
            if rms:
                return {"y": EF.rms_norm(t["x"], (n,), t["weight"], eps, backend=backend)}
            return {"y": EF.layer_norm(t["x"], (n,), t["weight"], t["bias"], eps, backend=backend)}

        def plain(t):
            total = t["x"] + t["residual"] if residual else t["x"]
            y = F.rms_norm(total, (n,), t["weight"], eps) if rms else F.layer_norm(total, (n,), t["weight"],
                                                                                    t["bias"], eps)
            return {"y": y, "sum": total} if residual else {"y": y}

        def reference_op(t):
            y, total, _, _ = reference.layer_norm(t["x"], t.get("residual"), t["weight"], t.get("bias"), eps, rms)
            return {"y": y, "sum": total} if residual else {"y": y}

        # rows sum `n` terms; the weight and bias gradients sum over the rows
        return Problem(inputs, engine_op, plain, reference_op, max(n, math.prod(shape[:-1])))
    return build


def _attention_problem(causal: bool):
    """scaled_dot_product_attention; shape (batch, query heads, key heads, seq, head dim)."""
    def build(shape, g):
        b, hq, hk, s, d = shape
        inputs = {"q": _randn(g, b, hq, s, d), "k": _randn(g, b, hk, s, d), "v": _randn(g, b, hk, s, d)}
        gqa = hq != hk

        def engine_op(t, backend):
            return {"out": EF.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=causal, enable_gqa=gqa,
                                                           backend=backend)}

        def plain(t):
            return {"out": F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=causal, enable_gqa=gqa)}

        def reference_op(t):
            return {"out": reference.attention(t["q"], t["k"], t["v"], None, causal, d ** -0.5)[0]}

        # dq and dk sum terms that cancel exactly for a query row that sees one key (the first row
        # under causality), as in tests/test_attention.py: their rounding scales with
        # |dO| |V| |K or Q| (dO is standard normal: |dO| <= ~4), not with the result
        terms = 4 * (inputs["v"].abs().max() * torch.maximum(inputs["q"].abs().max(), inputs["k"].abs().max())).item()
        return Problem(inputs, engine_op, plain, reference_op, max(d, s, s * hq // hk),
                       terms_scale={"dq": terms, "dk": terms})
    return build


def _decode_problem(shape, g):
    """attention_with_kv_cache: one new token per sequence against caches of different valid
    lengths (one full); shape (batch, query heads, key heads, cache length, head dim)."""
    b, hq, hk, s_max, d = shape
    inputs = {"q": _randn(g, b, hq, 1, d), "k_cache": _randn(g, b, hk, s_max, d), "v_cache": _randn(g, b, hk, s_max, d)}
    lengths = torch.randint(1, s_max + 1, (b,), generator=g, dtype=torch.int32)
    lengths[0] = s_max

    def on(t):  # the lengths live on the inputs' device
        return lengths.to(t["q"].device)

    def engine_op(t, backend):
        return {"out": EF.attention_with_kv_cache(t["q"], t["k_cache"], t["v_cache"], on(t), backend=backend)}

    def plain(t):  # what a torch user writes: SDPA over the whole cache under the decode mask
        visible = reference.decode_mask(on(t), 1, s_max)
        return {"out": F.scaled_dot_product_attention(t["q"], t["k_cache"], t["v_cache"], attn_mask=visible,
                                                      enable_gqa=hq != hk)}

    def reference_op(t):
        return {"out": reference.attention_with_kv_cache(t["q"], t["k_cache"], t["v_cache"], on(t), None,
                                                         d ** -0.5)[0]}

    return Problem(inputs, engine_op, plain, reference_op, max(d, s_max), backward=False)


def _gelu_problem(shape, g):
    inputs = {"x": _randn(g, *shape, scale=3.0)}
    return Problem(inputs, lambda t, backend: {"y": EF.gelu(t["x"], backend=backend)},
                   lambda t: {"y": F.gelu(t["x"])}, lambda t: {"y": reference.activate(t["x"], "gelu")}, 1)


TORCH_ACTIVATIONS = {"none": lambda y: y, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
                     "relu": F.relu}


def _linear_problem(activation: str):
    """linear with bias and `activation`; shape (rows, in features, out features)."""
    def build(shape, g):
        m, k, n = shape
        inputs = {"x": _randn(g, m, k), "weight": _randn(g, n, k, scale=k ** -0.5), "bias": _randn(g, n)}

        def engine_op(t, backend):
            return {"out": EF.linear(t["x"], t["weight"], t["bias"], activation=activation, backend=backend)}

        def plain(t):
            return {"out": TORCH_ACTIVATIONS[activation](F.linear(t["x"], t["weight"], t["bias"]))}

        def reference_op(t):
            return {"out": reference.linear(t["x"], t["weight"], t["bias"], activation)[0]}

        return Problem(inputs, engine_op, plain, reference_op, max(m, k, n))
    return build


def _ffn_inputs(shape, g):
    m, d_model, d_ff = shape
    return {"x": _randn(g, m, d_model), "w1": _randn(g, d_ff, d_model, scale=d_model ** -0.5), "b1": _randn(g, d_ff),
            "w2": _randn(g, d_model, d_ff, scale=d_ff ** -0.5), "b2": _randn(g, d_model),
            "residual": _randn(g, m, d_model)}


def _ffn_problem(shape, g):
    """feed_forward (gelu) with the residual add; shape (rows, d_model, d_ff)."""
    inputs = _ffn_inputs(shape, g)

    def engine_op(t, backend):
        return {"out": EF.feed_forward(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], "gelu", residual=t["residual"],
                                       backend=backend)}

    def plain(t):
        return {"out": F.linear(F.gelu(F.linear(t["x"], t["w1"], t["b1"])), t["w2"], t["b2"]) + t["residual"]}

    def reference_op(t):
        hidden = reference.linear(t["x"], t["w1"], t["b1"], "gelu")[0]
        return {"out": reference.linear(hidden, t["w2"], t["b2"], "none", residual=t["residual"])[0]}

    return Problem(inputs, engine_op, plain, reference_op, max(shape))


def _rotary_problem(rotary_dim: int, interleaved: bool):
    """rotary_qk of q and k (GQA) at per-sequence offsets; shape (batch, query heads, key heads,
    sequence, head dim). The plain form is reference.rotary too: torch has no rotary op, and the
    reference rounds once from fp32 as a careful user's code does."""
    def build(shape, g):
        b, hq, hk, s, d = shape
        inputs = {"q": _randn(g, b, hq, s, d), "k": _randn(g, b, hk, s, d)}
        cos, sin = EF.rotary_cos_sin(2 * s, rotary_dim, dtype=torch.float64)
        offsets = torch.randint(0, s + 1, (b,), generator=g)

        def tables(t):  # the tables in the inputs' dtype, the offsets on their device
            q = t["q"]
            return cos.to(q.device, q.dtype), sin.to(q.device, q.dtype), offsets.to(q.device)

        def engine_op(t, backend):
            c, sn, o = tables(t)
            q_out, k_out = EF.rotary_qk(t["q"], t["k"], c, sn, interleaved=interleaved, positions=o, backend=backend)
            return {"q_out": q_out, "k_out": k_out}

        def reference_op(t):
            c, sn, o = tables(t)
            return {"q_out": reference.rotary(t["q"], c, sn, o, interleaved),
                    "k_out": reference.rotary(t["k"], c, sn, o, interleaved)}

        return Problem(inputs, engine_op, reference_op, reference_op, 1)
    return build


# Dropout: the engine draws its Philox seed from torch's default generator, so torch.manual_seed
# fixes the mask, and every backend computes the same mask for a seed (engine/reference.py). The
# reference backend is the plain-torch math: seeded alike, it gives the float64 reference (on
# float64 inputs) and the baseline (in the checked dtype) under the very mask the others use.


def _seeded(call: Callable) -> Callable:
    def run(t, backend):
        torch.manual_seed(DROPOUT_SEED)
        return call(t, backend)
    return run


def _attention_dropout_problem(shape, g):
    """Causal scaled_dot_product_attention with dropout; shape as _attention_problem's."""
    b, hq, hk, s, d = shape
    inputs = {"q": _randn(g, b, hq, s, d), "k": _randn(g, b, hk, s, d), "v": _randn(g, b, hk, s, d)}

    @_seeded
    def engine_op(t, backend):
        return {"out": EF.scaled_dot_product_attention(t["q"], t["k"], t["v"], dropout_p=DROPOUT_P, is_causal=True,
                                                       enable_gqa=hq != hk, backend=backend)}

    on_reference = lambda t: engine_op(t, "reference")  # noqa: E731
    return Problem(inputs, engine_op, on_reference, on_reference, max(d, s, s * hq // hk))


def _ffn_dropout_problem(shape, g):
    """feed_forward with dropout on the hidden activation; shape as _ffn_problem's."""
    inputs = _ffn_inputs(shape, g)

    @_seeded
    def engine_op(t, backend):
        return {"out": EF.feed_forward(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], "gelu", dropout_p=DROPOUT_P,
                                       residual=t["residual"], backend=backend)}

    on_reference = lambda t: engine_op(t, "reference")  # noqa: E731
    return Problem(inputs, engine_op, on_reference, on_reference, max(shape))


# name -> (build(shape, generator), (small shape, medium shape), dtypes, reproducibility checked).
# Sequence lengths, rows and widths divisible by 16 in one shape are so in the other (see the
# module docstring). The medium shapes are modest so that the CPU run stays within two minutes.
_NORM_SHAPES = ((2, 9, 100), (2, 500, 768))
_ATTENTION_SHAPES = ((1, 2, 2, 37, 64), (2, 4, 4, 200, 64))
_GQA_SHAPES = ((1, 4, 2, 37, 64), (2, 4, 2, 200, 64))
_LINEAR_SHAPES = ((18, 64, 100), (250, 512, 1000))
_FFN_SHAPES = ((18, 64, 160), (130, 256, 1024))
_ROTARY_SHAPES = ((1, 4, 2, 9, 64), (2, 8, 2, 200, 64))
OPS = {
    "layer_norm": (_norm_problem(False, False), _NORM_SHAPES, DTYPES, False),
    "rms_norm": (_norm_problem(False, True), _NORM_SHAPES, DTYPES, False),
    "add_layer_norm": (_norm_problem(True, False), _NORM_SHAPES, DTYPES, False),
    "add_rms_norm": (_norm_problem(True, True), _NORM_SHAPES, DTYPES, False),
    "sdpa": (_attention_problem(False), _ATTENTION_SHAPES, DTYPES, False),
    "sdpa_causal": (_attention_problem(True), _ATTENTION_SHAPES, DTYPES, False),
    "sdpa_gqa_causal": (_attention_problem(True), _GQA_SHAPES, DTYPES, False),
    "attention_with_kv_cache": (_decode_problem, ((2, 4, 2, 64, 64), (4, 8, 2, 1024, 64)), DTYPES, False),
    "gelu": (_gelu_problem, ((3, 100), (500, 3000)), DTYPES, False),
    "linear": (_linear_problem("none"), _LINEAR_SHAPES, DTYPES, False),
    "linear_gelu": (_linear_problem("gelu"), _LINEAR_SHAPES, DTYPES, False),
    "linear_gelu_tanh": (_linear_problem("gelu_tanh"), _LINEAR_SHAPES, DTYPES, False),
    "linear_relu": (_linear_problem("relu"), _LINEAR_SHAPES, DTYPES, False),
    "feed_forward": (_ffn_problem, _FFN_SHAPES, DTYPES, False),
    "rotary": (_rotary_problem(64, False), _ROTARY_SHAPES, DTYPES, False),
    "rotary_interleaved_partial": (_rotary_problem(32, True), _ROTARY_SHAPES, DTYPES, False),
    # dropout: one dtype (the mask does not depend on it), the small shape only
    "sdpa_dropout": (_attention_dropout_problem, _GQA_SHAPES[:1], (torch.float32,), True),
    "feed_forward_dropout": (_ffn_dropout_problem, _FFN_SHAPES[:1], (torch.float32,), True),
}


# ---------------------------------------------------------------------------------------------
# Running one check


@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    direction: str               # "fwd", "bwd", or "-" for a row about the set-up
    shape: str
    max_error: Optional[float] = None
    allowed: Optional[float] = None
    worst: str = ""              # the result with the largest error relative to its allowance
    seconds: Optional[float] = None
    status: str = "ok"           # "ok" or "FAIL: why"

    @property
    def failed(self) -> bool:
        return self.status != "ok"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _poisoned_outputs():
    """Tensors allocated with torch.empty (in Python or C++) start as NaN while the engine runs,
    so an output element a kernel never writes fails the check instead of passing by luck."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill


def _forward(fn: Callable, inputs: dict, device: torch.device) -> tuple[dict, float]:
    """fn(inputs) and the seconds it took."""
    start = time.perf_counter()
    outputs = fn(inputs)
    _synchronize(device)
    return outputs, time.perf_counter() - start


def _backward(outputs: dict, inputs: dict, grad_outputs: dict, device: torch.device) -> tuple[dict, float]:
    """The gradient of every input ("d" + its name) for these output gradients, and the seconds."""
    start = time.perf_counter()
    values = torch.autograd.grad(list(outputs.values()), list(inputs.values()),
                                 [grad_outputs[name].to(out.dtype) for name, out in outputs.items()])
    _synchronize(device)
    return {"d" + name: value for name, value in zip(inputs, values)}, time.perf_counter() - start


def _judge(ours: dict, baseline: dict, expected: dict, problem: Problem, dtype, row: Row) -> Row:
    """Fills `row` with the verdict on every result of one direction (forward or backward); the
    row shows the result whose error came closest to (or furthest past) its allowance."""
    worst = None
    for name, actual in ours.items():
        if actual.shape != expected[name].shape:
            row.worst, row.status = name, f"FAIL: shape {tuple(actual.shape)} != {tuple(expected[name].shape)}"
            return row
        error = max_error(actual, expected[name])
        allowed = allowed_error(dtype, expected[name], baseline[name], problem.terms_scale.get(name, 0.0),
                                problem.reduction_length)
        ratio = math.inf if math.isnan(error) else error / allowed
        if worst is None or ratio > worst[0]:
            worst = (ratio, name, error, allowed)
    ratio, row.worst, row.max_error, row.allowed = worst
    if math.isnan(row.max_error):
        row.status = "FAIL: NaN in the result"
    elif ratio > 1:
        row.status = f"FAIL: error {row.max_error:.3g} > allowed {row.allowed:.3g}"
    return row


def _first_difference(first: dict, second: dict) -> Optional[str]:
    """None when two runs gave bit-identical results, else which result differs and where."""
    for name, a in first.items():
        if not torch.equal(a, second[name]):
            return f"{name}: {(a != second[name]).sum().item()} elements differ"
    return None


def _seed_of(op: str, shape: tuple) -> int:
    """A fixed seed per op and shape (str hashes change from one process to the next)."""
    return zlib.crc32(f"{op} {shape}".encode())


def check(op: str, backend: str, dtype: torch.dtype, shape: tuple, device: torch.device) -> list[Row]:
    """The rows of one op x backend x dtype x shape: forward, and backward where the op has one.
    Never raises: an exception becomes a failed row."""
    build, _, _, reproducible = OPS[op]

    def row(direction):
        return Row(op, backend, str(dtype).removeprefix("torch."), direction, "x".join(map(str, shape)))

    rows = []
    try:
        g = torch.Generator().manual_seed(_seed_of(op, shape))
        problem = build(shape, g)
        inputs = {n: t.to(device, dtype).requires_grad_(problem.backward) for n, t in problem.inputs.items()}
        inputs64 = {n: t.detach().double().requires_grad_(problem.backward) for n, t in inputs.items()}
        engine_op = lambda t: problem.engine(t, backend)  # noqa: E731

        expected, _ = _forward(problem.reference, inputs64, device)
        baseline, _ = _forward(problem.plain, inputs, device)
        with _poisoned_outputs():
            ours, seconds = _forward(engine_op, inputs, device)
        rows.append(_judge(ours, baseline, expected, problem, dtype, row("fwd")))
        rows[-1].seconds = seconds
        if problem.backward:
            grad_outputs = {n: _randn(g, *t.shape).to(device) for n, t in expected.items()}
            expected_grads, _ = _backward(expected, inputs64, grad_outputs, device)
            baseline_grads, _ = _backward(baseline, inputs, grad_outputs, device)
            with _poisoned_outputs():
                our_grads, seconds = _backward(ours, inputs, grad_outputs, device)
            rows.append(_judge(our_grads, baseline_grads, expected_grads, problem, dtype, row("bwd")))
            rows[-1].seconds = seconds
        if reproducible:  # the same torch seed again: bit-identical outputs and gradients
            with _poisoned_outputs():
                again, _ = _forward(engine_op, inputs, device)
                results = [(ours, again)]
                if problem.backward:
                    results.append((our_grads, _backward(again, inputs, grad_outputs, device)[0]))
            for verdict, (first, second) in zip(rows, results):
                difference = _first_difference(first, second)
                if difference and not verdict.failed:
                    verdict.status = f"FAIL: not reproducible with the same seed ({difference})"
    except Exception as error:  # any failure of the engine (or of the set-up) is a result to report
        failed = row("bwd" if rows else "fwd")
        failed.status = "FAIL: " + " ".join(f"{type(error).__name__}: {error}".split())[:300]
        rows.append(failed)
    return rows


# ---------------------------------------------------------------------------------------------
# The machine: versions, devices, backends


def _version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _triton_version() -> str:
    try:
        import triton
    except Exception as error:  # a broken install raises more than ImportError
        return f"does not import: {type(error).__name__}: {error}"
    return triton.__version__


def _command_lines(command: list[str]) -> list[str]:
    """The command's output lines; none when it is missing or fails."""
    if shutil.which(command[0]) is None:
        return []
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return done.stdout.strip().splitlines() if done.returncode == 0 else []


def versions() -> dict:
    from torch.utils import cpp_extension

    # the toolkit the cuda backend is built with (the one torch's extension builder finds)
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else "nvcc"
    nvcc_release = _command_lines([nvcc, "--version"])[-1:]
    driver = _command_lines(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])[:1]
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "engine": os.path.dirname(os.path.abspath(engine.__file__)),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "transformers": _version_of("transformers"),
        "torch CUDA": torch.version.cuda or ("none (ROCm " + torch.version.hip + ")" if torch.version.hip else "none"),
        "nvcc": nvcc_release[0] if nvcc_release else "not found",
        "NVIDIA driver": driver[0] if driver else "unknown (no working nvidia-smi)",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
    }


def devices() -> list[str]:
    lines = [f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{torch.get_num_threads()} torch threads"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, compute capability {p.major}.{p.minor}, "
                         f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    else:
        lines.append("cuda: none (torch.cuda.is_available() is False)")
    return lines


def runnable_backends(device: torch.device) -> list[str]:
    return [name for name, state in backends.available().items()
            if state.available and device.type in state.devices]


def plan(device: torch.device, quick: bool, ops: list[str], names: list[str]) -> list[tuple]:
    """(op, backend, dtype, shape) of every check of `ops` on backends `names` on this device."""
    checks = []
    for op in ops:
        _, shapes, dtypes, _ = OPS[op]
        for backend in names:
            interpreted = backend == "triton" and device.type == "cpu"
            for shape in shapes[:1] if quick or interpreted else shapes:
                checks += [(op, backend, dtype, shape) for dtype in dtypes]
    return checks


# ---------------------------------------------------------------------------------------------
# Output

COLUMNS = [("op", 24), ("backend", 9), ("dtype", 8), ("dir", 4), ("shape", 15), ("max err", 9), ("allowed", 9),
           ("worst", 9), ("time", 8)]


def format_row(row: Row) -> str:
    def number(value, spec, unit=""):
        return "-" if value is None else format(value, spec) + unit
    cells = [row.op, row.backend, row.dtype, row.direction, row.shape, number(row.max_error, ".2e"),
             number(row.allowed, ".2e"), row.worst, number(row.seconds, ".3f", "s")]
    return " ".join(cell.ljust(width) for cell, (_, width) in zip(cells, COLUMNS)) + " " + row.status


def header() -> str:
    return " ".join(name.ljust(width) for name, width in COLUMNS) + " status"


def _in_workers(ops: list[str], names: list[str], device: torch.device, quick: bool,
                jobs: int) -> Iterator[list[Row]]:
    """The rows of each op, checked in its own `python -m engine.selftest --ops OP` process, `jobs`
    at a time; yields each op's rows as its process ends. On a GPU nearly all the time goes into
    Triton compiles, which run on one CPU core per process, so processes divide the time; and a
    kernel that corrupts its CUDA context (an illegal address is sticky) spoils only its own op.
    The workers check the backends `names` that run here: one that does not run in a worker gives
    failed rows there, not fewer rows."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as folder:
        def run(op: str) -> list[Row]:
            path = os.path.join(folder, op + ".json")
            command = [sys.executable, "-m", "engine.selftest", "--device", str(device), "--ops", op,
                       "--backends", ",".join(names), "--json", path, "--jobs", "1"] + (["--quick"] if quick else [])
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            try:
                with open(path) as f:
                    # the worker's own set-up rows (backend availability) are the parent's to report
                    return [Row(**r) for r in json.load(f)["rows"] if r["op"] == op]
            except (OSError, ValueError) as error:
                tail = " ".join((done.stdout + done.stderr).split()[-60:])
                return [Row(op, "-", "-", "-", "-", status=f"FAIL: worker exited with status {done.returncode} "
                                                          f"({type(error).__name__}); output ends: {tail}")]

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in as_completed([pool.submit(run, op) for op in ops]):
                yield future.result()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when a GPU is visible)")
    parser.add_argument("--quick", action="store_true", help="the small shapes only")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from: {', '.join(OPS)}")
    parser.add_argument("--json", metavar="PATH", help="also write the versions, backends and rows as JSON")
    parser.add_argument("--backends", help="comma-separated (default: every backend that runs on the device)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="ops checked in parallel processes (default: 1 on the CPU, on a GPU up to 8)")
    args = parser.parse_args(argv)
    ops = args.ops.split(",")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {list(OPS)}")
    device = torch.device(args.device)
    if device.type not in EXPECTED_BACKENDS:
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    jobs = args.jobs or (1 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 1) // 2)))
    started = time.perf_counter()

    info = versions()
    print("versions:")
    for name, value in info.items():
        print(f"  {name}: {value}")
    print("devices:")
    for line in devices():
        print(f"  {line}")
    states = backends.available()  # the first call builds the C++ extension (minutes) unless cached
    print(f"backends (checked in {time.perf_counter() - started:.1f}s):")
    for name, state in states.items():
        print(f"  {name}: {'available' if state.available else 'UNAVAILABLE'}: {state.reason}")

    rows, checks, names = [], [], []
    if device.type == "cuda" and not torch.cuda.is_available():
        rows.append(Row("device", "-", "-", "-", "-", status="FAIL: --device cuda, but no GPU is visible"))
    else:
        for name in EXPECTED_BACKENDS[device.type]:
            if name not in runnable_backends(device):
                rows.append(Row("backend", name, "-", "-", "-", status=f"FAIL: unavailable: {states[name].reason}"))
        if device.type == "cpu" and "triton" not in runnable_backends(device):
            print("  (set TRITON_INTERPRET=1 to also run the Triton kernels on the CPU, in the interpreter)")
        names = args.backends.split(",") if args.backends else runnable_backends(device)
        unknown = [name for name in names if name not in backends.BACKENDS]
        if unknown:
            parser.error(f"unknown backends {unknown}; choose from {list(backends.BACKENDS)}")
        checks = plan(device, args.quick, ops, names)
    parallel = f", {jobs} processes" if jobs > 1 and checks else ""
    print(f"\n{len(checks)} checks on {device}{parallel}: the {'small' if args.quick else 'small and medium'} shapes "
          f"against the float64 reference, under engine/accuracy.py's rule\n")
    print(header())
    for row in rows:
        print(format_row(row), flush=True)
    if jobs > 1 and checks:
        produced = _in_workers(list(dict.fromkeys(c[0] for c in checks)), names, device, args.quick, jobs)
    else:
        produced = (check(*c, device) for c in checks)
    for op_rows in produced:
        for row in op_rows:
            rows.append(row)
            print(format_row(row), flush=True)

    failed = [row for row in rows if row.failed]
    seconds = time.perf_counter() - started
    summary = (f"selftest {'FAILED' if failed else 'passed'}: {len(rows) - len(failed)} ok, {len(failed)} failed, "
               f"on {device} in {seconds:.1f}s")
    if failed:
        print("\nfailures:")
        for row in failed:
            print("  " + format_row(row))
    print("\n" + summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": info, "devices": devices(),
                       "backends": {name: asdict(state) for name, state in states.items()},
                       "device": str(device), "quick": args.quick, "seconds": round(seconds, 1),
                       "rows": [asdict(row) for row in rows], "summary": summary}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
