"""Benchmarks of whole models: a GPT-2-small-shaped engine.models.GPT (12 layers, 768 wide, 12 heads,
vocabulary 50257, random weights, fp32, eval) against transformers' GPT2LMHeadModel with the same
config and weights (eval, torch.no_grad, its default SDPA attention), and against the engine's own
`reference` backend (engine.backends.use("reference"): the same model code on plain torch ops).

    forward  logits of every position of a batch of 4 x 512 tokens: tokens/s = 4 * 512 / time.
             FLOPs = 2 * tokens * (12 * L * C^2 + C * V)   (the products: qkv 3C^2, proj C^2, MLP 8C^2
                     per layer, lm_head C * V)
                   + 2 * L * B * S^2 * C                    (causal attention: q k^T and p v, half the
                                                              square each: 4 * B * S^2 * C / 2 per layer)
             Checked against the same model in float64 on the reference backend.
             Also timed: transformers under torch.compile (fp32), and both models in bf16 at 4 x 128
             (the fp32 weights rounded once; 3 repeats, as a CPU without bf16 dot products takes
             seconds per transformers bf16 call).
    decode   greedy generation of 128 new tokens after a 32-token prompt, batch 1 and 8: tokens/s =
             B * 128 / time (prefill included, as a user of generate sees it). engine: GPT.generate
             (preallocated KV cache, attention_with_kv_cache); transformers: generate(do_sample=False)
             with min_new_tokens = max_new_tokens so that both produce the same number of tokens.
             "max err" of a decode row is the largest |token id difference| against transformers'
             tokens: 0 means the same sequences.
`--quick` runs 2 layers (same width and vocabulary), forward 4 x 128 and 32 new tokens.
"""
import copy

import torch

from bench.harness import Case, compiled
from engine import backends
from engine.models import GPT

BASELINE = "transformers"
GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
QUICK_LAYERS = 2
FORWARD_SHAPE, QUICK_FORWARD_SHAPE = (4, 512), (4, 128)
BF16_FORWARD_SHAPE = (4, 128)  # a quarter of the fp32 tokens: see _forward_case
PROMPT, NEW_TOKENS, QUICK_NEW_TOKENS = 32, 128, 32
DECODE_BATCHES = (1, 8)

_models: dict = {}
_tokens: dict = {}  # (op, shape) -> tokens produced per call, for tokens/s in targets()


def _pair(n_layer: int, device: torch.device, dtype: torch.dtype = torch.float32):
    """(transformers GPT2LMHeadModel, engine GPT with the same weights) in `dtype`, eval; built once
    per layer count and dtype and shared by the cases (1 GB of weights for 12 layers in fp32). The
    bf16 pair is the fp32 pair's weights rounded once."""
    key = (n_layer, str(device), dtype)
    if key not in _models:
        if dtype == torch.float32:
            import transformers

            transformers.logging.set_verbosity_error()
            torch.manual_seed(0)
            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2_SMALL, "n_layer": n_layer}))
            hf = hf.to(device).eval()
        else:
            hf = copy.deepcopy(_pair(n_layer, device)[0]).to(dtype)
        _models[key] = (hf, GPT.from_hf(hf).to(device))
    return _models[key]


def _label(n_layer: int) -> str:
    return "gpt2" if n_layer == GPT2_SMALL["n_layer"] else f"gpt2-{n_layer}L"


def _forward_case(n_layer: int, batch: int, seq: int, device: torch.device, dtype: torch.dtype = torch.float32,
                  with_compile: bool = False) -> Case:
    """fp32: engine (automatic backends and reference), transformers, and transformers under
    torch.compile when with_compile. bf16: engine and transformers only, 3 repeats (on a CPU
    without bf16 dot products a transformers bf16 call takes seconds)."""
    hf, ours = _pair(n_layer, device, dtype)
    ids = torch.randint(0, GPT2_SMALL["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)

    def engine_auto():
        with torch.no_grad():
            return ours(ids)[0]

    def engine_reference():
        with torch.no_grad(), backends.use("reference"):
            return ours(ids)[0]

    def transformers_forward(model=hf):
        with torch.no_grad():
            return model(ids).logits

    def expected():
        model64 = copy.deepcopy(ours).double()
        with torch.no_grad(), backends.use("reference"):
            return model64(ids)[0]

    impls = {"engine:auto": engine_auto, BASELINE: transformers_forward}
    if dtype == torch.float32:
        impls["engine:reference"] = engine_reference
    if with_compile:
        compiled_hf = compiled(hf)
        impls["torch.compile(transformers)"] = lambda: transformers_forward(compiled_hf)
    c, v, tokens = GPT2_SMALL["n_embd"], GPT2_SMALL["vocab_size"], batch * seq
    flops = 2 * tokens * (12 * n_layer * c * c + c * v) + 2 * n_layer * batch * seq * seq * c
    op = f"{_label(n_layer)}_forward"
    shape = f"{batch}x{seq}"
    _tokens[(op, shape)] = tokens
    return Case(op, "fwd", shape, dtype, impls, expected, flops=flops, sweep={}, baseline=BASELINE,
                repeats=3 if dtype == torch.bfloat16 else None)


def _decode_case(n_layer: int, batch: int, new_tokens: int, device: torch.device) -> Case:
    hf, ours = _pair(n_layer, device)
    ids = torch.randint(0, GPT2_SMALL["vocab_size"], (batch, PROMPT), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)
    mask = torch.ones_like(ids)

    def engine_auto():
        return ours.generate(ids, new_tokens, top_k=1)

    def engine_reference():
        with backends.use("reference"):
            return ours.generate(ids, new_tokens, top_k=1)

    def transformers_generate():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)

    op = f"{_label(n_layer)}_greedy_decode"
    shape = f"{batch}x({PROMPT}+{new_tokens})"
    _tokens[(op, shape)] = batch * new_tokens
    return Case(op, "fwd", shape, torch.float32,
                {"engine:auto": engine_auto, "engine:reference": engine_reference, BASELINE: transformers_generate},
                lambda: transformers_generate().double(), sweep={}, baseline=BASELINE)


def cases(device: torch.device, quick: bool, backend_names: list[str]):
    """backend_names is unused: the model runs every op on the automatic choice ("engine:auto")
    and on the reference backend; single-backend runs would fail on ops a backend lacks."""
    n_layer = QUICK_LAYERS if quick else GPT2_SMALL["n_layer"]
    batch, seq = QUICK_FORWARD_SHAPE if quick else FORWARD_SHAPE
    yield _forward_case(n_layer, batch, seq, device, with_compile=not quick)
    if not quick:
        yield _forward_case(n_layer, *BF16_FORWARD_SHAPE, device, torch.bfloat16)
    for b in DECODE_BATCHES:
        yield _decode_case(n_layer, b, QUICK_NEW_TOKENS if quick else NEW_TOKENS, device)
    yield from bert_cases(device, quick, backend_names)  # the BERT section below


def targets(rows, ceilings) -> list[str]:
    lines = []
    model_rows = [r for r in rows if (r.op, r.shape) in _tokens]
    for key in dict.fromkeys((r.op, r.shape, r.dtype) for r in model_rows):
        group = {r.implementation: r for r in model_rows if (r.op, r.shape, r.dtype) == key}
        tokens = _tokens[key[:2]]
        rates = ", ".join(f"{name} {tokens / (r.median_ms / 1e3):,.1f}" for name, r in group.items())
        engine = group.get("engine:auto")
        if engine is None:
            continue
        goal = 2.0 if "decode" in key[0] else 1.3
        what = "greedy generate" if "decode" in key[0] else "forward"
        same = ""
        if "decode" in key[0] and engine.max_error is not None:
            same = "; tokens identical to transformers'" if engine.max_error == 0 else \
                "; tokens DIFFER from transformers'"
        lines.append(f"{key[0]} {key[1]} {engine.dtype} tokens/s: {rates}; engine {engine.speedup:.2f}x "
                     f"transformers' {what} (target >= {goal}x){same}")
    return lines + bert_targets(rows, ceilings)


# =============================================================================================
# BERT-base-shaped encoder: engine.models.BERT against transformers' BertModel with the same
# config and weights (12 layers, 768 wide, 12 heads, FFN 3072, vocabulary 30522, random weights,
# fp32), eval mode, torch.no_grad, last hidden states of a batch of 8 x 128 tokens, without and with
# padding (right padding, lengths uniform in [64, 128]), and in bf16 without padding. sequences/s =
# 8 / time.
# Implementations: "engine:auto" (engine.models.BERT, automatic backend choice), "engine:reference"
# (the same model on the reference backend), "transformers" (BertModel, its default SDPA attention;
# the baseline), "transformers+engine.optimize" (that BertModel with its attention, output, MLP and
# norm modules swapped by engine.optimize), "torch.compile(transformers)" (fp32). Checked against
# transformers' BertModel in float64.
# FLOPs (matrix products; B sequences of S tokens, width H, FFN width I, L layers; padding counted,
# as every implementation computes it): L * (8*B*S*H^2 + 4*B*S*H*I + 4*B*S^2*H) = q, k, v and
# output projections 4 * 2BSH^2, the FFN 2 * 2BSHI, q k^T and p v 2 * 2BS^2H.
# `--quick` runs 2 layers (same width).

BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522)
BERT_SHAPE = (8, 128)
_bert_cache: dict = {}
_bert_sequences: dict = {}  # (op, shape) -> sequences per call, for sequences/s in bert_targets()


def _bert_models(n_layer: int, device: torch.device, dtype: torch.dtype = torch.float32):
    """(transformers BertModel, engine BERT with its weights, a BertModel copy after
    engine.optimize) in `dtype`, built once per layer count and dtype (bf16: the fp32 weights
    rounded once)."""
    key = (n_layer, str(device), dtype)
    if key not in _bert_cache:
        import transformers

        import engine
        from engine.models import BERT

        if dtype == torch.float32:
            transformers.logging.set_verbosity_error()
            torch.manual_seed(0)
            config = transformers.BertConfig(**{**BERT_BASE, "num_hidden_layers": n_layer})
            hf = transformers.BertModel(config, add_pooling_layer=False).to(device).eval()
        else:
            hf = copy.deepcopy(_bert_models(n_layer, device)[0]).to(dtype)
        optimized = copy.deepcopy(hf)
        engine.optimize(optimized)
        _bert_cache[key] = (hf, BERT.from_hf(hf).to(device, dtype), optimized)
    return _bert_cache[key]


def _bert_forward_case(n_layer: int, padded: bool, device: torch.device, dtype: torch.dtype = torch.float32,
                       with_compile: bool = False) -> Case:
    """As _forward_case: bf16 without the reference backend, 3 repeats."""
    hf, ours, optimized = _bert_models(n_layer, device, dtype)
    b, s = BERT_SHAPE
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, BERT_BASE["vocab_size"], (b, s), generator=g).to(device)
    mask = None
    if padded:
        lengths = torch.randint(s // 2, s + 1, (b,), generator=g)
        lengths[0] = s
        mask = (torch.arange(s)[None] < lengths[:, None]).long().to(device)

    def engine_auto():
        with torch.no_grad():
            return ours.encode(ids, attention_mask=mask)

    def engine_reference():
        with torch.no_grad(), backends.use("reference"):
            return ours.encode(ids, attention_mask=mask)

    def transformers_forward(model=hf):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    def expected():
        model64 = copy.deepcopy(hf).double()
        with torch.no_grad():
            return model64(input_ids=ids, attention_mask=mask).last_hidden_state

    h, i = BERT_BASE["hidden_size"], BERT_BASE["intermediate_size"]
    flops = n_layer * (8 * b * s * h * h + 4 * b * s * h * i + 4 * b * s * s * h)
    op = "bert_forward" if n_layer == BERT_BASE["num_hidden_layers"] else f"bert-{n_layer}L_forward"
    shape = f"{b}x{s}" + (" padded" if padded else "")
    _bert_sequences[(op, shape)] = b
    impls = {"engine:auto": engine_auto, BASELINE: transformers_forward,
             "transformers+engine.optimize": lambda: transformers_forward(optimized)}
    if dtype == torch.float32:
        impls["engine:reference"] = engine_reference
    if with_compile:
        compiled_hf = compiled(hf)
        impls["torch.compile(transformers)"] = lambda: transformers_forward(compiled_hf)
    return Case(op, "fwd", shape, dtype, impls, expected, flops=flops, sweep={}, baseline=BASELINE,
                repeats=3 if dtype == torch.bfloat16 else None)


def bert_cases(device: torch.device, quick: bool, backend_names: list[str]):
    """The BERT forward cases (backend_names unused, as in cases())."""
    n_layer = QUICK_LAYERS if quick else BERT_BASE["num_hidden_layers"]
    for padded in (False, True):
        yield _bert_forward_case(n_layer, padded, device, with_compile=not quick)
    if not quick:
        yield _bert_forward_case(n_layer, False, device, torch.bfloat16)


def bert_targets(rows, ceilings) -> list[str]:
    """sequences/s of every implementation and the engine's ratio to transformers' BertModel."""
    lines = []
    bert_rows = [r for r in rows if (r.op, r.shape) in _bert_sequences]
    for key in dict.fromkeys((r.op, r.shape, r.dtype) for r in bert_rows):
        group = {r.implementation: r for r in bert_rows if (r.op, r.shape, r.dtype) == key}
        sequences = _bert_sequences[key[:2]]
        rates = ", ".join(f"{name} {sequences / (r.median_ms / 1e3):,.2f}" for name, r in group.items())
        engine = group.get("engine:auto")
        if engine is None:
            continue
        lines.append(f"{key[0]} {key[1]} {engine.dtype} sequences/s: {rates}; engine {engine.speedup:.2f}x "
                     f"transformers' BertModel (target >= 1.1x)")
    return lines
