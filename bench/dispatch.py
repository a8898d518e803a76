"""The cost of one call: tiny shapes where the Python path to the kernel, not the kernel, decides
the time. The engine (automatic backend choice) against torch eager, forward and forward+backward,
and small transformers models before and after engine.optimize.

    layer_norm     x [2, 16, 64], weight and bias [64]
    linear_gelu    x [2, 16, 64] -> 256 (bias, GeLU)
    sdpa_causal    q, k, v [1, 4, 16, 16], is_causal
    decode_step    q [1, 12, 1, 64] against a [1, 12, 128, 64] KV cache holding 100 keys
                   (torch eager: SDPA over the cache's first 100 positions)
    gpt2_tiny / bert_tiny   transformers GPT2LMHeadModel / BertModel, width 64, 2 layers, 4 heads,
                   2 x 16 tokens, eval, no_grad: "transformers" is the model as built,
                   "transformers+engine.optimize" a deep copy after engine.optimize.

Each case runs with torch.set_num_threads(1) (Case.threads), as the per-call targets are stated:
at these sizes neither library uses a second thread, and one thread keeps the machine's other
core from adding noise. Times are medians of interleaved samples (bench/harness.py).
"""
import copy

import torch
import torch.nn.functional as F

import engine.functional as EF
from bench.harness import Case

BASELINE = "torch eager"
ENGINE = "engine"
FORWARD_TARGET, BACKWARD_TARGET = 1.5, 2.0  # engine time / torch eager time, at most


def _op_cases(requires_grad: bool, device: torch.device):
    """(op, shape, engine function, torch function, inputs): each function takes the inputs."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0, grad=requires_grad):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_(grad)

    yield ("layer_norm", "2x16x64", lambda x, w, b: EF.layer_norm(x, (64,), w, b),
           lambda x, w, b: F.layer_norm(x, (64,), w, b), (randn(2, 16, 64), randn(64), randn(64)))
    yield ("linear_gelu", "2x16x64->256", lambda x, w, b: EF.linear(x, w, b, activation="gelu"),
           lambda x, w, b: F.gelu(F.linear(x, w, b)), (randn(2, 16, 64), randn(256, 64, scale=0.125), randn(256)))
    yield ("sdpa_causal", "1x4x16x16", lambda q, k, v: EF.scaled_dot_product_attention(q, k, v, is_causal=True),
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
           tuple(randn(1, 4, 16, 16) for _ in range(3)))
    if not requires_grad:  # decoding has no backward
        lengths = torch.tensor([100], dtype=torch.int32, device=device)
        yield ("decode_step", "1x12x1x64 cache 100/128",
               lambda q, k, v: EF.attention_with_kv_cache(q, k, v, lengths),
               lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :, :100], v[:, :, :100]),
               (randn(1, 12, 1, 64), randn(1, 12, 128, 64), randn(1, 12, 128, 64)))


def _forward_and_backward(fn, inputs):
    """forward, then the gradients of the output's sum; returns the first input's gradient."""
    return torch.autograd.grad(fn(*inputs).sum(), inputs)[0]


def _tiny_model_cases(device: torch.device):
    import transformers

    import engine

    transformers.logging.set_verbosity_error()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).to(device).eval()
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=100),
        add_pooling_layer=False).to(device).eval()
    for name, model, output in (("gpt2_tiny", gpt2, "logits"), ("bert_tiny", bert, "last_hidden_state")):
        optimized = copy.deepcopy(model)
        engine.optimize(optimized)
        model64 = copy.deepcopy(model).double()
        yield Case(name, "fwd", "2x16 w64 2L", torch.float32,
                   {"transformers": lambda m=model, o=output: _model_output(m, ids, o),
                    "transformers+engine.optimize": lambda m=optimized, o=output: _model_output(m, ids, o)},
                   lambda m=model64, o=output: _model_output(m, ids, o), baseline="transformers", threads=1)


def _model_output(model, ids, output: str):
    with torch.no_grad():
        return getattr(model(ids), output)


def cases(device: torch.device, quick: bool, backend_names: list[str]):
    """backend_names is unused: the per-call cost is that of the automatic choice users get."""
    for direction in ("fwd", "fwd+bwd"):
        backward = direction == "fwd+bwd"
        for op, shape, engine_fn, torch_fn, inputs in _op_cases(backward, device):
            inputs64 = tuple(t.detach().double().requires_grad_(backward) for t in inputs)
            if backward:
                impls = {ENGINE: lambda f=engine_fn, i=inputs: _forward_and_backward(f, i),
                         BASELINE: lambda f=torch_fn, i=inputs: _forward_and_backward(f, i)}
                expected = lambda f=torch_fn, i=inputs64: _forward_and_backward(f, i)  # noqa: E731
            else:
                impls = {ENGINE: lambda f=engine_fn, i=inputs: f(*i), BASELINE: lambda f=torch_fn, i=inputs: f(*i)}
                expected = lambda f=torch_fn, i=inputs64: f(*i)  # noqa: E731
            yield Case(op, direction, shape, torch.float32, impls, expected, threads=1)
    yield from _tiny_model_cases(device)


def targets(rows, ceilings) -> list[str]:
    lines = []
    for r in rows:
        if r.implementation == ENGINE and r.speedup:
            ratio = 1 / r.speedup
            goal = FORWARD_TARGET if r.direction == "fwd" else BACKWARD_TARGET
            lines.append(f"dispatch {r.op} {r.direction} {r.shape}: engine {r.median_ms * 1e3:.1f} us per call = "
                         f"{ratio:.2f}x torch eager's time (target <= {goal}x)")
        if r.implementation == "transformers+engine.optimize" and r.speedup:
            lines.append(f"{r.op} {r.shape}: transformers after engine.optimize {r.speedup:.2f}x before "
                         f"(target >= 1.0x)")
    return lines
