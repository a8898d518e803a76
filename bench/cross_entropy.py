"""Benchmarks of linear_cross_entropy: the loss of cross_entropy(hidden @ W^T, targets), forward +
backward (d_hidden and d_W), fp32, every engine backend against torch eager's unfused
F.cross_entropy(F.linear(...)), which holds the [N, V] logits; and the peak extra memory of one
forward + backward of each.

Shapes: GPT-2's head, d = 768 and V = 50257, at N = 8192 tokens (the issue's target: the logits
alone are N * V * 4 = 1.6 GB) and at N = 1024 (--quick: that one alone; on a 2-core CPU one
unfused step at N = 8192 takes tens of seconds).

FLOPs: three products of 2*N*V*d each (logits, d_hidden, d_W).
Peak extra memory: the most memory one forward + backward holds at once beyond its inputs, its
gradients included (d_hidden [N, d] and d_W [V, d]: 0.18 GB at the target shape, which any
implementation returns). Measured in a fresh process per implementation (python -m
bench.cross_entropy IMPLEMENTATION N DEVICE) after a small warm-up call: on CUDA the caching
allocator's peak; on a CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs
after the inputs are made and freed heap memory is trimmed; glibc's default allocator settings,
not the timing run's, which keep freed memory), which counts the pages the call touched.
The float64 reference of d_hidden is computed by the engine's reference backend in float64 (in
chunks: torch's unfused float64 step at the target shape would need ~10 GB).
"""
import ctypes
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import engine.functional as EF
from bench.harness import Case, implemented, parity_lines

VOCAB, WIDTH = 50257, 768
TARGET_ROWS, QUICK_ROWS = 8192, 1024


def _inputs(n, dtype, device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, WIDTH, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(VOCAB, WIDTH, generator=g) * WIDTH ** -0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (n,), generator=g).to(device)
    targets[::10] = -100  # some positions without a loss, as padding gives
    return hidden, weight, targets


def _unfused(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight), targets)


def _step(loss_fn, hidden, weight, targets):
    """Forward + backward; returns d_hidden (d_W is computed too)."""
    return torch.autograd.grad(loss_fn(hidden, weight, targets), (hidden, weight))[0]


def _implementation(name: str):
    """The loss function an implementation name stands for ("torch eager" or "engine:<backend>")."""
    if name == "torch eager":
        return _unfused
    backend = name.removeprefix("engine:")
    return lambda h, w, t: EF.linear_cross_entropy(h, w, t, backend=backend)


def cases(device: torch.device, quick: bool, backends: list[str]):
    names = ["torch eager"] + [f"engine:{be}" for be in implemented("cross_entropy", backends)]
    for n in [QUICK_ROWS] if quick else [QUICK_ROWS, TARGET_ROWS]:
        big = n == TARGET_ROWS and device.type == "cpu"
        hidden, weight, targets = _inputs(n, torch.float32, device)
        # on a CPU one step at the target shape takes tens of seconds: the reference backend (its
        # row step in plain torch) is timed at the small shape only
        impls = {name: (lambda fn=_implementation(name), h=hidden, w=weight, t=targets: _step(fn, h, w, t))
                 for name in names if not (big and name == "engine:reference")}

        def expected(hidden=hidden, weight=weight, targets=targets):
            h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
            return _step(_implementation("engine:reference"), h64, w64, targets)

        yield Case("linear_cross_entropy", "fwd+bwd", f"{n}x{WIDTH}->{VOCAB}", torch.float32, impls, expected,
                   flops=3 * 2 * n * VOCAB * WIDTH, sweep={"rows": n}, repeats=3 if big else None)


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_extra_bytes(name: str, n: int, device: torch.device) -> int:
    """The peak extra memory of one forward + backward of implementation `name` at N = n (see the
    module docstring); call it in a fresh process."""
    fn = _implementation(name)
    # a first small call loads what the implementation loads once (the C++ extension, the BLAS
    # and OpenMP thread pools), which is no part of its per-call memory
    _step(fn, torch.randn(8, WIDTH, device=device, requires_grad=True),
          torch.randn(100, WIDTH, device=device, requires_grad=True), torch.zeros(8, dtype=torch.int64, device=device))
    hidden, weight, targets = _inputs(n, torch.float32, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        torch.autograd.grad(fn(hidden, weight, targets), (hidden, weight))
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set (VmHWM) to the current one
    base = _resident_bytes("VmRSS")
    torch.autograd.grad(fn(hidden, weight, targets), (hidden, weight))
    return _resident_bytes("VmHWM") - base


def _measure_in_subprocess(name: str, n: int, device: torch.device) -> int:
    done = subprocess.run([sys.executable, "-m", "bench.cross_entropy", name, str(n), str(device)],
                          capture_output=True, text=True, check=True,
                          env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def targets(rows, ceilings) -> list[str]:
    lines = parity_lines(rows, ("linear_cross_entropy",))
    measured = {(r.shape, r.implementation) for r in rows if r.op == "linear_cross_entropy"}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for shape, name in sorted(measured):
        n = int(shape.split("x")[0])
        if name == "engine:reference":
            continue
        extra = _measure_in_subprocess(name, n, device)
        logits = n * VOCAB * 4
        gradients = (n + VOCAB) * WIDTH * 4
        lines.append(f"linear_cross_entropy fwd+bwd {shape} fp32, {name}: peak extra memory {extra / 1e9:.3f} GB = "
                     f"{100 * extra / logits:.1f}% of the {logits / 1e9:.2f} GB logits; less the gradients "
                     f"({gradients / 1e9:.3f} GB): {100 * (extra - gradients) / logits:.1f}% (target <= 10%)")
    return lines


if __name__ == "__main__":
    name, n, device = sys.argv[1], int(sys.argv[2]), torch.device(sys.argv[3])
    print(json.dumps({"peak_extra_bytes": peak_extra_bytes(name, n, device)}))
