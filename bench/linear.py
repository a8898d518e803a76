"""Benchmarks of the fused feed-forward pieces: linear with GeLU in the epilogue, the whole FFN
block, the Llama-style SwiGLU FFN block, and GeLU alone; forward and forward+backward, fp32 and bf16; every engine backend against
eager PyTorch and torch.compile, with the bare matrix product of the same shape and dtype for scale.
bf16 products run at M = 1024 only: on a CPU without bf16 dot-product instructions (AVX2, or
AVX-512 without avx512_bf16) torch's bf16 GEMM is ~8x slower than its fp32 GEMM (x [4096, 768] @
W^T [768, 3072]: ~1.05 s against ~0.13 s on the 2-core AVX2 VM), and M = 4096 would take minutes.

FLOPs: a product [M, K] x [K, N] is 2*M*N*K; forward+backward of a linear layer is 3x its
forward (dX and dW are one product each). The FFN block is two products, [M, d] x [d, d_ff] and
[M, d_ff] x [d_ff, d]; the SwiGLU block's first product is 2 * d_ff wide (gate and up). GeLU moves 2*numel*s bytes forward (read x, write y) and 3*numel*s in
backward (read dy, x, write dx).
"""
import torch
import torch.nn.functional as F

import engine.functional as EF
from bench.harness import Case, compiled, implemented, parity_lines
from engine import reference

M, D_MODEL, D_FF = 4096, 768, 3072
QUICK_M = 1024
SWIGLU_FF = 2048   # Llama's hidden width is ~8/3 d_model: w1 [2 * 2048, 768] holds gate and up


def _params(m, dtype, device, grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, D_MODEL, generator=g).to(device, dtype).requires_grad_(grad)
    w1 = (torch.randn(D_FF, D_MODEL, generator=g) * D_MODEL ** -0.5).to(device, dtype).requires_grad_(grad)
    b1 = torch.randn(D_FF, generator=g).to(device, dtype).requires_grad_(grad)
    w2 = (torch.randn(D_MODEL, D_FF, generator=g) * D_FF ** -0.5).to(device, dtype).requires_grad_(grad)
    b2 = torch.randn(D_MODEL, generator=g).to(device, dtype).requires_grad_(grad)
    return x, w1, b1, w2, b2


def _torch_linear_gelu(x, w, b):
    return F.gelu(F.linear(x, w, b))


def _torch_ffn(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _linear_gelu_cases(m, dtype, device, backends, with_compile):
    x, w1, b1, _, _ = _params(m, dtype, device, False)
    impls = {f"engine:{be}": (lambda be=be: EF.linear(x, w1, b1, "gelu", backend=be)) for be in backends}
    impls["torch eager"] = lambda: _torch_linear_gelu(x, w1, b1)
    if with_compile:
        compiled_forward = compiled(_torch_linear_gelu)
        impls["torch.compile"] = lambda: compiled_forward(x, w1, b1)
    impls["torch matmul alone"] = lambda: torch.mm(x, w1.t())
    expected = lambda: reference.linear(x.double(), w1.double(), b1.double(), "gelu")[0]  # noqa: E731
    flops = 2 * m * D_FF * D_MODEL
    yield Case("linear_gelu", "fwd", f"{m}x{D_MODEL}->{D_FF}", dtype, impls, expected, flops=flops,
               sweep={"rows": m}, unchecked=("torch matmul alone",))

    xg, wg, bg, _, _ = _params(m, dtype, device, True)
    dy = torch.randn(m, D_FF, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def step(call):  # forward + backward; returns dx
        return torch.autograd.grad(call(xg, wg, bg), (xg, wg, bg), dy)[0]

    impls = {f"engine:{be}": (lambda be=be: step(lambda x, w, b: EF.linear(x, w, b, "gelu", backend=be)))
             for be in backends}
    impls["torch eager"] = lambda: step(_torch_linear_gelu)
    if with_compile:
        compiled_step = compiled(_torch_linear_gelu)
        impls["torch.compile"] = lambda: step(compiled_step)

    def expected_grad():
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (xg, wg, bg))
        return torch.autograd.grad(reference.linear(x64, w64, b64, "gelu")[0], (x64, w64, b64), dy.double())[0]

    yield Case("linear_gelu", "fwd+bwd", f"{m}x{D_MODEL}->{D_FF}", dtype, impls, expected_grad, flops=3 * flops,
               sweep={"rows": m})


def _ffn_cases(m, dtype, device, backends, with_compile):
    params = _params(m, dtype, device, False)
    impls = {f"engine:{be}": (lambda be=be: EF.feed_forward(*params, backend=be)) for be in backends}
    impls["torch eager"] = lambda: _torch_ffn(*params)
    if with_compile:
        compiled_forward = compiled(_torch_ffn)
        impls["torch.compile"] = lambda: compiled_forward(*params)
    expected = lambda: _torch_ffn(*(t.double() for t in params))  # noqa: E731
    flops = 2 * 2 * m * D_FF * D_MODEL
    yield Case("feed_forward", "fwd", f"{m}x{D_MODEL}x{D_FF}", dtype, impls, expected, flops=flops, sweep={"rows": m})

    grad_params = _params(m, dtype, device, True)
    dy = torch.randn(m, D_MODEL, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def step(call):
        return torch.autograd.grad(call(*grad_params), grad_params, dy)[0]

    impls = {f"engine:{be}": (lambda be=be: step(lambda *p: EF.feed_forward(*p, backend=be))) for be in backends}
    impls["torch eager"] = lambda: step(_torch_ffn)
    if with_compile:
        compiled_step = compiled(_torch_ffn)
        impls["torch.compile"] = lambda: step(compiled_step)

    def expected_grad():
        params64 = [t.detach().double().requires_grad_() for t in grad_params]
        return torch.autograd.grad(_torch_ffn(*params64), params64, dy.double())[0]

    yield Case("feed_forward", "fwd+bwd", f"{m}x{D_MODEL}x{D_FF}", dtype, impls, expected_grad, flops=3 * flops,
               sweep={"rows": m})


def _torch_swiglu_ffn(x, w1, w2):
    gate, up = F.linear(x, w1).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def _swiglu_params(m, dtype, device, grad):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, D_MODEL, generator=g).to(device, dtype).requires_grad_(grad)
    w1 = (torch.randn(2 * SWIGLU_FF, D_MODEL, generator=g) * D_MODEL ** -0.5).to(device, dtype).requires_grad_(grad)
    w2 = (torch.randn(D_MODEL, SWIGLU_FF, generator=g) * SWIGLU_FF ** -0.5).to(device, dtype).requires_grad_(grad)
    return x, w1, w2


def _swiglu_ffn_cases(m, dtype, device, backends, with_compile):
    """feed_forward(..., "swiglu") without biases (Llama's MLP) against the same block in torch."""
    x, w1, w2 = _swiglu_params(m, dtype, device, False)
    impls = {f"engine:{be}": (lambda be=be: EF.feed_forward(x, w1, None, w2, None, "swiglu", backend=be))
             for be in backends}
    impls["torch eager"] = lambda: _torch_swiglu_ffn(x, w1, w2)
    if with_compile:
        compiled_forward = compiled(_torch_swiglu_ffn)
        impls["torch.compile"] = lambda: compiled_forward(x, w1, w2)
    expected = lambda: _torch_swiglu_ffn(x.double(), w1.double(), w2.double())  # noqa: E731
    flops = 2 * m * D_MODEL * (2 * SWIGLU_FF) + 2 * m * SWIGLU_FF * D_MODEL
    shape = f"{m}x{D_MODEL}x{SWIGLU_FF}"
    yield Case("swiglu_feed_forward", "fwd", shape, dtype, impls, expected, flops=flops, sweep={"rows": m})

    grad_params = _swiglu_params(m, dtype, device, True)
    dy = torch.randn(m, D_MODEL, generator=torch.Generator().manual_seed(3)).to(device, dtype)

    def step(call):  # forward + backward; returns dx
        return torch.autograd.grad(call(*grad_params), grad_params, dy)[0]

    impls = {f"engine:{be}": (lambda be=be: step(lambda x, w1, w2: EF.feed_forward(x, w1, None, w2, None, "swiglu",
                                                                                   backend=be)))
             for be in backends}
    impls["torch eager"] = lambda: step(_torch_swiglu_ffn)
    if with_compile:
        compiled_step = compiled(_torch_swiglu_ffn)
        impls["torch.compile"] = lambda: step(compiled_step)

    def expected_grad():
        params64 = [t.detach().double().requires_grad_() for t in grad_params]
        return torch.autograd.grad(_torch_swiglu_ffn(*params64), params64, dy.double())[0]

    yield Case("swiglu_feed_forward", "fwd+bwd", shape, dtype, impls, expected_grad, flops=3 * flops,
               sweep={"rows": m})


def _gelu_cases(numel, dtype, device, backends, with_compile):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=g).to(device, dtype)
    impls = {f"engine:{be}": (lambda be=be: EF.gelu(x, backend=be)) for be in backends}
    impls["torch eager"] = lambda: F.gelu(x)
    if with_compile:
        compiled_gelu = compiled(F.gelu)
        impls["torch.compile"] = lambda: compiled_gelu(x)
    yield Case("gelu", "fwd", f"{numel}", dtype, impls, lambda: F.gelu(x.double()),
               bytes_moved=2 * numel * x.element_size(), sweep={"numel": numel})

    xg = x.detach().clone().requires_grad_()
    dy = torch.randn(numel, generator=g).to(device, dtype)

    def step(call):  # forward + backward; returns dx
        return torch.autograd.grad(call(xg), xg, dy)[0]

    impls = {f"engine:{be}": (lambda be=be: step(lambda t: EF.gelu(t, backend=be))) for be in backends}
    impls["torch eager"] = lambda: step(F.gelu)
    if with_compile:
        compiled_step = compiled(F.gelu)
        impls["torch.compile"] = lambda: step(compiled_step)

    def expected_grad():
        x64 = xg.detach().double().requires_grad_()
        return torch.autograd.grad(F.gelu(x64), x64, dy.double())[0]

    yield Case("gelu", "fwd+bwd", f"{numel}", dtype, impls, expected_grad,
               bytes_moved=5 * numel * x.element_size(), sweep={"numel": numel})


def cases(device: torch.device, quick: bool, backends: list[str]):
    linear_backends = implemented("linear", backends)
    shapes = [(QUICK_M, torch.float32)] if quick else [(1024, torch.float32), (M, torch.float32),
                                                       (QUICK_M, torch.bfloat16)]
    for m, dtype in shapes:
        with_compile = not quick and (m == M or dtype == torch.bfloat16)
        yield from _linear_gelu_cases(m, dtype, device, linear_backends, with_compile)
        yield from _ffn_cases(m, dtype, device, linear_backends, with_compile)
        yield from _swiglu_ffn_cases(m, dtype, device, linear_backends, with_compile)
    gelu_backends = implemented("gelu", backends)
    for dtype in [torch.float32] if quick else [torch.float32, torch.bfloat16]:
        for numel in [2**22] if quick else [2**20, 2**22, 2**24]:
            yield from _gelu_cases(numel, dtype, device, gelu_backends, with_compile=not quick and numel == 2**22)


def targets(rows, ceilings) -> list[str]:
    lines = parity_lines(rows, ("linear_gelu", "feed_forward", "swiglu_feed_forward", "gelu"))
    pick = {(r.op, r.direction, r.shape, r.dtype, r.implementation): r for r in rows}
    for (op, direction, shape, dtype, name), fused in pick.items():
        if name != "engine:cpu":
            continue
        bare = pick.get((op, direction, shape, dtype, "torch matmul alone"))
        if op == "linear_gelu" and bare:
            lines.append(f"linear(activation='gelu') fwd, cpu backend, {shape} {dtype}: "
                         f"{fused.median_ms / bare.median_ms:.3f}x the time of torch.mm alone in {dtype} "
                         f"(target <= 1.03x)")
        if (op, direction) == ("feed_forward", "fwd+bwd"):
            lines.append(f"feed_forward fwd+bwd, cpu backend, {shape} {dtype}: {fused.speedup:.2f}x eager "
                         f"PyTorch (target >= 1.05x)")
    return lines
