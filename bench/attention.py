"""Benchmarks of attention: scaled_dot_product_attention forward and forward+backward over a
sweep of sequence lengths, causal and not, and the KV-cache decode step; every engine backend
against torch's own scaled_dot_product_attention on the same device; plus the peak extra memory
of each at S=512 and S=4096.

FLOPs (the convention of FlashAttention's benchmarks):
    forward   4 * B * H * Sq * Sk * D   (two matrix products), halved when causal
    backward  2.5x the forward (five products, one of them recomputing the scores)
    so forward+backward counts 3.5x the forward.
Decode reads the valid part of the cache once: bytes = 2 * B * Hk * L * D * s (K and V).
"""
import json
import math
import subprocess
import sys

import torch
import torch.nn.functional as F

import engine.functional as EF
from bench.harness import Case, implemented, parity_lines
from engine import reference

B, H, D = 4, 12, 64
TARGET_S = 512
LENGTHS = [128, 256, 512, 1024, 2048]
QUICK_LENGTHS = [512]


def _flops(b, h, s, d, causal):
    return 4 * b * h * s * s * d // (2 if causal else 1)


def _inputs(b, h, s, d, dtype, device, grad):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, s, d, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3)]


def _forward_case(s, causal, dtype, device, backends):
    q, k, v = _inputs(B, H, s, D, dtype, device, False)
    impls = {f"engine:{be}": (lambda be=be: EF.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=be))
             for be in backends if be != "reference" or s <= 1024}
    impls["torch eager"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    expected = lambda: reference.attention(q.double(), k.double(), v.double(), None, causal, D ** -0.5)[0]  # noqa
    return Case("attention" + ("_causal" if causal else ""), "fwd", f"{B}x{H}x{s}x{D}", dtype, impls, expected,
                flops=_flops(B, H, s, D, causal), sweep={"seq_len": s})


def _backward_case(s, causal, dtype, device, backends):
    q, k, v = _inputs(B, H, s, D, dtype, device, True)
    grad_out = torch.randn(B, H, s, D, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def step(call):  # forward + backward; returns dq, the gradient we check
        return torch.autograd.grad(call(q, k, v), (q, k, v), grad_out)[0]

    impls = {f"engine:{be}": (lambda be=be: step(lambda q, k, v: EF.scaled_dot_product_attention(
        q, k, v, is_causal=causal, backend=be))) for be in backends if be != "reference" or s <= 1024}
    impls["torch eager"] = lambda: step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))

    def expected():
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        out = reference.attention(q64, k64, v64, None, causal, D ** -0.5)[0]
        return torch.autograd.grad(out, (q64, k64, v64), grad_out.double())[0]

    return Case("attention" + ("_causal" if causal else ""), "fwd+bwd", f"{B}x{H}x{s}x{D}", dtype, impls, expected,
                flops=int(3.5 * _flops(B, H, s, D, causal)), sweep={"seq_len": s})


def _decode_case(batch, s_max, dtype, device, backends):
    """One new token per sequence against caches of different valid lengths (about S_max / 2)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(batch, H, 1, D, generator=g).to(device, dtype)
    k_cache = torch.randn(batch, H, s_max, D, generator=g).to(device, dtype)
    v_cache = torch.randn(batch, H, s_max, D, generator=g).to(device, dtype)
    lengths = torch.randint(s_max // 4, 3 * s_max // 4, (batch,), generator=g).to(device, torch.int32)
    visible = reference.decode_mask(lengths, 1, s_max)  # what a torch user passes as attn_mask
    longest = int(lengths.max())
    impls = {f"engine:{be}": (lambda be=be: EF.attention_with_kv_cache(q, k_cache, v_cache, lengths, backend=be))
             for be in backends}
    impls["torch eager"] = lambda: F.scaled_dot_product_attention(
        q, k_cache[:, :, :longest], v_cache[:, :, :longest], attn_mask=visible[..., :longest])
    expected = lambda: reference.attention_with_kv_cache(  # noqa: E731
        q.double(), k_cache.double(), v_cache.double(), lengths, None, D ** -0.5)[0]
    bytes_moved = 2 * H * int(lengths.sum()) * D * q.element_size()
    return Case("attention_decode", "fwd", f"{batch}x{H}x1x{D} cache {s_max}", dtype, impls, expected,
                bytes_moved=bytes_moved, sweep={"batch": batch})


# the device the cases run on, for the memory measurement in targets()
_device = torch.device("cpu")


def cases(device: torch.device, quick: bool, backends: list[str]):
    global _device
    _device = device
    lengths = QUICK_LENGTHS if quick else LENGTHS
    decode_backends = implemented("attention_decode", backends)
    backends = implemented("attention", backends)
    for causal in (False, True):
        for s in lengths:
            yield _forward_case(s, causal, torch.float32, device, backends)
        for s in lengths:
            yield _backward_case(s, causal, torch.float32, device, backends)
        if not quick:  # bf16 at the target length
            yield _forward_case(TARGET_S, causal, torch.bfloat16, device, backends)
            yield _backward_case(TARGET_S, causal, torch.bfloat16, device, backends)
    for batch in ((1,) if quick else (1, 8)):
        yield _decode_case(batch, 2048, torch.float32, device, decode_backends)


# ---------------------------------------------------------------------------------------------
# Peak extra memory: measured in a fresh process per implementation, on the device the cases ran
# on. CPU (Linux): the peak resident set during one call minus the resident set before it; the
# peak counter (VmHWM) is reset first through /proc/self/clear_refs. CUDA: the peak of the bytes
# torch's allocator hands out during the call minus those held before it. Inputs are allocated
# and touched before, and a warm-up call on a tiny problem keeps one-time allocations (and, on a
# GPU, compiles) out. The output itself is part of the extra memory.

_MEMORY_CHILD = """
import json, sys, torch, torch.nn.functional as F
import engine.functional as EF
impl, s, device = sys.argv[1], int(sys.argv[2]), torch.device(sys.argv[3])
def call(q, k, v):
    if impl == "torch eager":
        return F.scaled_dot_product_attention(q, k, v)
    return EF.scaled_dot_product_attention(q, k, v, backend=impl.split(":")[1])
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
call(*(torch.randn(1, 2, 16, 64, device=device) for _ in range(3)))
q, k, v = (torch.randn(1, 12, s, 64, device=device) for _ in range(3))
if device.type == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = call(q, k, v)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - before) / 2**20
else:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    out = call(q, k, v)
    extra = (status_kib("VmHWM") - before) / 1024
print(json.dumps({"extra_mib": extra}))
"""


def peak_extra_mib(impl: str, s: int, device: torch.device) -> float:
    result = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, impl, str(s), str(device)], capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["extra_mib"]


def targets(rows, ceilings) -> list[str]:
    lines = parity_lines(rows, ("attention", "attention_causal", "attention_decode"))
    shape = f"{B}x{H}x{TARGET_S}x{D}"
    pick = {(r.op, r.direction, r.implementation): r for r in rows if r.shape == shape and r.dtype == "float32"}
    for op, direction, goal in [("attention_causal", "fwd", 1.5), ("attention", "fwd", 1.0),
                                ("attention", "fwd+bwd", 1.0), ("attention_causal", "fwd+bwd", None)]:
        row = pick.get((op, direction, "engine:cpu"))
        if row:
            target = f"; target >= {goal}x" if goal else ""
            lines.append(f"{op} {direction}, cpu backend, {shape} fp32: {row.speedup:.2f}x torch SDPA "
                         f"({row.tflop_per_s:.3f} TFLOP/s){target}")
    impls = sorted({r.implementation for r in rows if r.op.startswith("attention") and r.op != "attention_decode"})
    for s in (512, 4096):
        measured = []
        for impl in impls:
            if impl == "engine:reference" and s > 1024:
                continue
            measured.append(f"{impl} {peak_extra_mib(impl, s, _device):.1f}")
        lines.append(f"attention fwd peak extra memory (MiB) on {_device.type}, B=1 H=12 S={s} D=64 fp32 "
                     f"(output alone {12 * s * 64 * 4 / 2**20:.1f}; S^2 scores {12 * s * s * 4 / 2**20:.0f}): "
                     + ", ".join(measured))
    return lines
