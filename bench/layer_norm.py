"""Benchmarks of the layer-norm family: layer_norm, add_layer_norm, rms_norm; forward and
forward+backward; every engine backend against eager PyTorch (and torch.compile at the target
shape, fp32 and bf16).

Bytes that must move, for M rows of N elements of s bytes (each counted once):
    layer_norm      fwd: read x, write y                        2*M*N*s + 2*N*s (weight, bias)
    rms_norm        fwd: read x, write y                        2*M*N*s + N*s   (weight)
    add_layer_norm  fwd: read x, residual, write y, sum         4*M*N*s + 2*N*s
    backward adds:  read dy, x, write dx                        3*M*N*s (+ M*N*s read of the sum's
                    gradient for add_layer_norm) + one write per weight/bias gradient (N*s each)
"""
import torch
import torch.nn.functional as F

import engine.functional as EF
from bench.harness import Case, compiled, implemented, parity_lines

TARGET_ROWS, TARGET_WIDTH = 8192, 768
WIDTHS = [256, 512, 768, 1024, 2048, 4096, 8192, 16384, 65536]
QUICK_WIDTHS = [768, 4096]

OPS = {
    # name: (engine call, plain torch call, number of [M, N] tensors read+written fwd, params)
    "layer_norm": (lambda x, r, w, b, be: EF.layer_norm(x, (x.shape[-1],), w, b, backend=be),
                   lambda x, r, w, b: F.layer_norm(x, (x.shape[-1],), w, b), 2, 2),
    "rms_norm": (lambda x, r, w, b, be: EF.rms_norm(x, (x.shape[-1],), w, 1e-6, backend=be),
                 lambda x, r, w, b: F.rms_norm(x, (x.shape[-1],), w, 1e-6), 2, 1),
    "add_layer_norm": (lambda x, r, w, b, be: EF.add_layer_norm(x, r, (x.shape[-1],), w, b, backend=be),
                       lambda x, r, w, b: (F.layer_norm(s := x + r, (x.shape[-1],), w, b), s), 4, 2),
}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _forward_case(op, m, n, dtype, device, backends, with_compile):
    engine_call, torch_call, tensors, params = OPS[op]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, n, generator=g).to(device, dtype)
    r = torch.randn(m, n, generator=g).to(device, dtype)
    w = torch.randn(n, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype)
    impls = {f"engine:{be}": (lambda be=be: _first(engine_call(x, r, w, b, be))) for be in backends}
    impls["torch eager"] = lambda: _first(torch_call(x, r, w, b))
    if with_compile:
        compiled_call = compiled(torch_call)
        impls["torch.compile"] = lambda: _first(compiled_call(x, r, w, b))
    expected = lambda: _first(torch_call(x.double(), r.double(), w.double(), b.double()))  # noqa: E731
    s = x.element_size()
    return Case(op, "fwd", f"{m}x{n}", dtype, impls, expected,
                bytes_moved=tensors * m * n * s + params * n * s, sweep={"width": n})


def _backward_case(op, m, n, dtype, device, backends, with_compile):
    engine_call, torch_call, tensors, params = OPS[op]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, n, generator=g).to(device, dtype).requires_grad_()
    r = torch.randn(m, n, generator=g).to(device, dtype).requires_grad_()
    w = torch.randn(n, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(n, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(m, n, generator=g).to(device, dtype)
    leaves = (x, w, b) if params == 2 else (x, w)

    def step(call):  # forward + backward of y; returns the input's gradient, the one we check
        return torch.autograd.grad(_first(call(x, r, w, b)), leaves, dy)[0]

    impls = {f"engine:{be}": (lambda be=be: step(lambda *a: engine_call(*a, be))) for be in backends}
    impls["torch eager"] = lambda: step(torch_call)
    if with_compile:
        compiled_call = compiled(torch_call)
        impls["torch.compile"] = lambda: step(compiled_call)

    def expected():
        x64, r64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, r, w, b))
        leaves64 = (x64, w64, b64) if params == 2 else (x64, w64)
        return torch.autograd.grad(_first(torch_call(x64, r64, w64, b64)), leaves64, dy.double())[0]

    s = x.element_size()
    backward_tensors = 3 + (1 if op == "add_layer_norm" else 0)
    return Case(op, "fwd+bwd", f"{m}x{n}", dtype, impls, expected,
                bytes_moved=(tensors + backward_tensors) * m * n * s + 2 * params * n * s, sweep={"width": n})


def cases(device: torch.device, quick: bool, backends: list[str]):
    backends = implemented("layer_norm", backends)
    widths = QUICK_WIDTHS if quick else WIDTHS
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    for op in OPS:
        for make in (_forward_case, _backward_case):
            for dtype in dtypes:
                for n in widths if dtype == torch.float32 else [TARGET_WIDTH]:
                    m = TARGET_ROWS * TARGET_WIDTH // n  # same number of elements at every width
                    at_target = (m, n) == (TARGET_ROWS, TARGET_WIDTH)
                    yield make(op, m, n, dtype, device, backends, with_compile=at_target and not quick)


def targets(rows, ceilings) -> list[str]:
    """The issues' targets on this machine, from the rows just measured."""
    lines = parity_lines(rows, tuple(OPS))
    shape = f"{TARGET_ROWS}x{TARGET_WIDTH}"
    pick = {(r.op, r.direction, r.implementation): r for r in rows if r.shape == shape and r.dtype == "float32"}
    for op in ("layer_norm", "rms_norm"):
        fwd = pick.get((op, "fwd", "engine:cpu"))
        if fwd:
            lines.append(f"{op} fwd, cpu backend, {shape} fp32: {fwd.pct_of_copy:.0f}% of copy bandwidth "
                         f"({fwd.gb_per_s:.1f} of {ceilings.copy_gb_per_s:.1f} GB/s); target >= 90%")
    add = pick.get(("add_layer_norm", "fwd", "engine:cpu"))
    if add:
        lines.append(f"add_layer_norm fwd, cpu backend, {shape} fp32: {add.speedup:.2f}x eager "
                     f"F.layer_norm(x + r); target >= 1.15x")
    return lines
