"""Many threads at once: 8 threads make mixed calls (ops x backends, the backend chosen by argument
or by a `backends.use()` block, which is per thread), and every result equals the serial one bit
for bit. The backend choice, the extension's loading, the fallback log and the kernels' scratch
state are shared by the threads; none of them may leak from one call into another."""
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import engine.functional as EF
from engine import backends

THREADS = 8
CALLS_PER_THREAD = 24


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(48, 64, generator=g), residual=torch.randn(48, 64, generator=g),
                w=torch.randn(64, generator=g), b=torch.randn(64, generator=g),
                w1=torch.randn(96, 64, generator=g) / 8, b1=torch.randn(96, generator=g),
                w2=torch.randn(64, 96, generator=g) / 10, b2=torch.randn(64, generator=g),
                q=torch.randn(2, 4, 24, 16, generator=g), k=torch.randn(2, 2, 24, 16, generator=g),
                v=torch.randn(2, 2, 24, 16, generator=g), bias=torch.randn(1, 4, 24, 24, generator=g),
                q1=torch.randn(2, 4, 1, 16, generator=g),
                lengths=torch.tensor([24, 11], dtype=torch.int32), rope=EF.rotary_cos_sin(32, 12),
                offsets=torch.tensor([3, 8]))


OPS = {
    "layer_norm": lambda t, be: EF.layer_norm(t["x"], (64,), t["w"], t["b"], backend=be),
    "add_rms_norm": lambda t, be: EF.add_rms_norm(t["x"], t["residual"], (64,), t["w"], backend=be)[0],
    "linear_gelu": lambda t, be: EF.linear(t["x"], t["w1"], t["b1"], activation="gelu", backend=be),
    "feed_forward": lambda t, be: EF.feed_forward(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], backend=be),
    "sdpa": lambda t, be: EF.scaled_dot_product_attention(t["q"], t["k"], t["v"], t["bias"], is_causal=True,
                                                          enable_gqa=True, backend=be),
    "decode": lambda t, be: EF.attention_with_kv_cache(t["q1"], t["k"], t["v"], t["lengths"], backend=be),
    "rotary": lambda t, be: EF.rotary(t["q"], *t["rope"], interleaved=True, positions=t["offsets"], backend=be),
}


def _runnable_backends() -> list[str]:
    return [name for name in ("reference", "cpu", "triton") if backends.status(name).available
            and "cpu" in backends.status(name).devices]


def test_threads_get_the_serial_results():
    names = _runnable_backends()
    assert "reference" in names
    tensors = _inputs()
    calls = [(op, backend) for op in OPS for backend in names]
    serial = {(op, backend): OPS[op](tensors, backend) for op, backend in calls}
    start = threading.Barrier(THREADS)

    def worker(thread: int) -> list[str]:
        start.wait()  # all threads call at once
        wrong = []
        for i in range(CALLS_PER_THREAD):
            op, backend = calls[(thread * 5 + i * 7) % len(calls)]
            # half of the calls name the backend, half choose it by a use() block of this thread
            by_block = (thread + i) % 2 == 0
            with backends.use(backend) if by_block else contextlib.nullcontext():
                result = OPS[op](tensors, None if by_block else backend)
            if not torch.equal(result, serial[(op, backend)]):
                wrong.append(f"thread {thread}, call {i}: {op} on {backend} "
                             f"({'use() block' if by_block else 'backend='}) differs from the serial result")
        return wrong

    with ThreadPoolExecutor(THREADS) as pool:
        wrong = [w for part in pool.map(worker, range(THREADS)) for w in part]
    assert not wrong, "\n".join(wrong)


def test_a_use_block_stays_in_its_thread():
    """While one thread is inside backends.use("reference"), another thread's automatic choice is
    unaffected."""
    if not backends.status("cpu").available:
        pytest.skip(f"the cpu backend is unavailable: {backends.status('cpu').reason}")
    x = torch.randn(8, 64)
    inside, outside = threading.Event(), threading.Event()
    chosen = {}

    def in_block():
        with backends.use("reference"):
            chosen["block"] = backends.select("layer_norm", x.device, _layer_norm_args(x), None)
            inside.set()
            outside.wait(timeout=30)

    def automatic():
        inside.wait(timeout=30)
        chosen["automatic"] = backends.select("layer_norm", x.device, _layer_norm_args(x), None)
        outside.set()

    threads = [threading.Thread(target=in_block), threading.Thread(target=automatic)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert chosen == {"block": "reference", "automatic": "cpu"}


def _layer_norm_args(x):
    from engine.ops.layer_norm import LayerNormArgs

    return LayerNormArgs(x, None, None, None, 1e-5, False)
