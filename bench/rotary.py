"""Benchmarks of rotary position embedding: q and k rotated in one call (rotary_qk), forward and
forward+backward, every engine backend against the same math in eager PyTorch (transformers'
rotate_half form, GPT-J's rotate_every_two) and its torch.compile.

Shapes: Llama-style prefill, q [B, 32, S, 128] and k [B, 8, S, 128] (GQA), half-split; the same
interleaved (GPT-J's convention); a partial rotary dim of 32 (GPT-NeoX's 25%); and a decode step
(S = 1, per-sequence offsets into a 4096-row table).

Bytes that must move, T = B*S tokens of (Hq + Hk) heads of D features of s bytes, rotary dim R:
    fwd:      read q, k, write q_out, k_out       2*T*(Hq + Hk)*D*s + 2 tables of T*R/2*s
    fwd+bwd:  the forward, then read dq_out, dk_out, write dq, dk: twice the forward
"""
import torch

import engine.functional as EF
from bench.harness import Case, compiled, implemented, parity_lines

Q_HEADS, K_HEADS, HEAD_DIM = 32, 8, 128
TABLE_ROWS = 4096
# name: (batch, seq, rotary dim, interleaved, decode offsets)
SHAPES = {
    "llama": (4, 512, 128, False, False),
    "gptj": (4, 512, 128, True, False),
    "neox_partial": (4, 512, 32, False, False),
    "decode": (32, 1, 128, False, True),
}
QUICK_SHAPES = {"llama": (1, 256, 128, False, False), "decode": (8, 1, 128, False, True)}


def torch_rotary(x, cos, sin, positions, rotary_dim, interleaved):
    """Plain PyTorch as a model writes it: cos/sin [P, R] laid out for the convention (cat(c, c)
    half-split, repeat_interleave(c, 2) interleaved), positions [S] or [B, 1, S]."""
    c, s = cos[positions], sin[positions]
    pairs, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        turned = torch.stack((-pairs[..., 1::2], pairs[..., 0::2]), -1).flatten(-2)
    else:
        turned = torch.cat((-pairs[..., rotary_dim // 2:], pairs[..., :rotary_dim // 2]), -1)
    return torch.cat((pairs * c + turned * s, rest), -1)


def _inputs(dims, dtype, device, requires_grad):
    batch, seq, rotary_dim, interleaved, decode = dims
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, Q_HEADS, seq, HEAD_DIM, generator=g).to(device, dtype).requires_grad_(requires_grad)
    k = torch.randn(batch, K_HEADS, seq, HEAD_DIM, generator=g).to(device, dtype).requires_grad_(requires_grad)
    cos, sin = EF.rotary_cos_sin(TABLE_ROWS, rotary_dim, theta=500000.0, device=device, dtype=dtype)
    offsets = torch.randint(0, TABLE_ROWS - seq, (batch,), generator=g).to(device) if decode else None
    full = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: torch.cat((t, t), -1))
    positions = torch.arange(seq, device=device)
    if offsets is not None:
        positions = offsets[:, None, None] + positions
    torch_args = (full(cos), full(sin), positions, rotary_dim, interleaved)
    tokens = batch * seq
    bytes_moved = (2 * tokens * (Q_HEADS + K_HEADS) * HEAD_DIM + tokens * rotary_dim) * q.element_size()
    return q, k, (cos, sin, interleaved, offsets), torch_args, bytes_moved, f"{batch}x{seq} R={rotary_dim}"


def _torch_qk(q, k, *torch_args):
    return torch_rotary(q, *torch_args), torch_rotary(k, *torch_args)


def _forward_case(shape, dims, dtype, device, backends, with_compile):
    q, k, (cos, sin, interleaved, offsets), torch_args, bytes_moved, label = _inputs(dims, dtype, device, False)
    impls = {f"engine:{be}": (lambda be=be: EF.rotary_qk(q, k, cos, sin, interleaved=interleaved, positions=offsets,
                                                          backend=be)[0]) for be in backends}
    impls["torch eager"] = lambda: _torch_qk(q, k, *torch_args)[0]
    if with_compile:
        compiled_call = compiled(_torch_qk)
        impls["torch.compile"] = lambda: compiled_call(q, k, *torch_args)[0]
    cos64, sin64 = torch_args[0].double(), torch_args[1].double()
    expected = lambda: torch_rotary(q.double(), cos64, sin64, *torch_args[2:])  # noqa: E731
    return Case("rotary", "fwd", f"{shape} {label}", dtype, impls, expected, bytes_moved=bytes_moved,
                sweep={"numel": q.numel() + k.numel()})


def _backward_case(shape, dims, dtype, device, backends, with_compile):
    q, k, (cos, sin, interleaved, offsets), torch_args, bytes_moved, label = _inputs(dims, dtype, device, True)
    g = torch.Generator().manual_seed(1)
    grads = (torch.randn(q.shape, generator=g).to(device, dtype), torch.randn(k.shape, generator=g).to(device, dtype))

    def step(call):  # forward + backward of both outputs; returns dq, the gradient we check
        return torch.autograd.grad(call(q, k), (q, k), grads)[0]

    impls = {f"engine:{be}": (lambda be=be: step(lambda a, b: EF.rotary_qk(
        a, b, cos, sin, interleaved=interleaved, positions=offsets, backend=be))) for be in backends}
    impls["torch eager"] = lambda: step(lambda a, b: _torch_qk(a, b, *torch_args))
    if with_compile:
        compiled_call = compiled(_torch_qk)
        impls["torch.compile"] = lambda: step(lambda a, b: compiled_call(a, b, *torch_args))

    def expected():
        q64 = q.detach().double().requires_grad_()
        out = torch_rotary(q64, torch_args[0].double(), torch_args[1].double(), *torch_args[2:])
        return torch.autograd.grad(out, q64, grads[0].double())[0]

    return Case("rotary", "fwd+bwd", f"{shape} {label}", dtype, impls, expected, bytes_moved=2 * bytes_moved,
                sweep={"numel": q.numel() + k.numel()})


def cases(device: torch.device, quick: bool, backends: list[str]):
    backends = implemented("rotary", backends)
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    for shape, dims in (QUICK_SHAPES if quick else SHAPES).items():
        for make in (_forward_case, _backward_case):
            for dtype in dtypes:
                yield make(shape, dims, dtype, device, backends, with_compile=not quick)


def targets(rows, ceilings) -> list[str]:
    """Issue 13's bench rows: the engine against torch eager and torch.compile of the same math."""
    return parity_lines(rows, ("rotary",))
