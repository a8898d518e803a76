"""The drop-in transformer layers (engine.nn): loading the state_dict of torch's module gives
torch's outputs (eval, fp32) and gradients; training mode runs; bad arguments raise clear errors;
the positional embeddings. Tiny shapes (width 16-32, a few positions) keep the file fast."""
import math

import pytest
import torch

import engine.functional
import engine.nn as enn

E, H, B, L, S = 16, 4, 2, 5, 7  # attention: embed dim, heads, batch, query and key lengths
D, FF, T = 32, 48, 5  # layers: d_model, dim_feedforward, target length (source length S)
ATOL, RTOL = 2e-5, 1e-5


def close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randomize(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Random values everywhere (zero-initialized biases would hide a bias bug)."""
    torch.manual_seed(1234)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def pair(torch_cls, engine_cls, *args, **kwargs):
    """(torch module with random parameters, engine module loaded from its state_dict), both eval."""
    theirs = randomize(torch_cls(*args, **kwargs)).eval()
    ours = engine_cls(*args, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def seq(batch_first: bool, n: int, width: int, batch: int = B) -> torch.Tensor:
    return torch.randn((batch, n, width) if batch_first else (n, batch, width))


# ---------------------------------------------------------------------------------------------
# MultiheadAttention


def _masks(kind: str, length: int, keys: int):
    """(attn_mask, key_padding_mask) in torch.nn.MultiheadAttention's convention (bool True = not
    allowed); every query row keeps key 0 visible so that torch gives no NaN."""
    attn = kpm = None
    if "kpm" in kind:
        hidden = torch.rand(B, keys) < 0.4
        hidden[:, 0] = False
        kpm = hidden if "bool" in kind else torch.where(hidden, -1e4, 0.0) + 0.1 * torch.randn(B, keys)
    if "attn2" in kind or "attn3" in kind:
        shape = (length, keys) if "attn2" in kind else (B * H, length, keys)
        hidden = torch.rand(shape) < 0.4
        hidden[..., 0] = False
        attn = hidden if "bool" in kind else torch.randn(shape)
    return attn, kpm


MHA_CASES = [  # (batch_first, attention kind, kdim/vdim, add_bias_kv, add_zero_attn)
    (False, "self", None, False, False),
    (True, "self", None, False, False),
    (False, "cross", None, False, False),
    (True, "shared_kv", None, False, False),
    (True, "cross", 12, False, False),
    (False, "cross", 12, False, False),
    (True, "self", None, True, True),
]
MASK_KINDS = ["none", "kpm_bool", "kpm_float", "attn2_bool", "attn2_float", "attn3_bool", "attn3_float",
              "attn2_kpm_bool", "attn3_kpm_float"]


@pytest.mark.parametrize("batch_first,kind,kdim,bias_kv,zero_attn", MHA_CASES)
def test_mha_matches_torch(batch_first, kind, kdim, bias_kv, zero_attn):
    torch.manual_seed(0)
    theirs, ours = pair(torch.nn.MultiheadAttention, enn.MultiheadAttention, E, H, add_bias_kv=bias_kv,
                        add_zero_attn=zero_attn, kdim=kdim, vdim=kdim, batch_first=batch_first)
    query = seq(batch_first, L, E)
    if kind == "self":
        query, key, value = query, query, query
        keys = L
    else:
        key = seq(batch_first, S, kdim or E)
        value = key if kind == "shared_kv" else seq(batch_first, S, kdim or E)
        keys = S
    for mask_kind in MASK_KINDS:
        attn_mask, kpm = _masks(mask_kind, L, keys)
        for need_weights, average in ((False, True), (True, True), (True, False)):
            kwargs = dict(attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need_weights,
                          average_attn_weights=average)
            expected, expected_w = theirs(query, key, value, **kwargs)
            out, weights = ours(query, key, value, **kwargs)
            close(out, expected)
            if need_weights:
                close(weights, expected_w)
            else:
                assert weights is None


def test_mha_is_causal():
    """is_causal with the causal attn_mask (torch's hint) and, an engine extra, without it."""
    torch.manual_seed(1)
    theirs, ours = pair(torch.nn.MultiheadAttention, enn.MultiheadAttention, E, H, batch_first=True)
    x = seq(True, L, E)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    expected = theirs(x, x, x, attn_mask=causal, need_weights=False)[0]
    close(ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0], expected)
    close(ours(x, x, x, is_causal=True, need_weights=False)[0], expected)
    out, weights = ours(x, x, x, is_causal=True, average_attn_weights=False)
    close(out, expected)
    assert (weights.triu(1) == 0).all()
    # with a padding mask too: torch merges the masks; the engine applies both and causality
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, 2] = True
    causal = causal.isinf()  # bool like the padding mask (torch warns on mixed mask types)
    close(ours(x, x, x, attn_mask=causal, key_padding_mask=kpm, is_causal=True, need_weights=False)[0],
          theirs(x, x, x, attn_mask=causal, key_padding_mask=kpm, is_causal=True, need_weights=False)[0])


def test_mha_unbatched():
    torch.manual_seed(2)
    theirs, ours = pair(torch.nn.MultiheadAttention, enn.MultiheadAttention, E, H)
    q, k = torch.randn(L, E), torch.randn(S, E)
    attn_mask, kpm = torch.rand(H, L, S) < 0.3, torch.rand(S) < 0.3
    attn_mask[..., 0] = False
    kpm[0] = False
    for need_weights in (True, False):
        expected = theirs(q, k, k, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need_weights)
        out = ours(q, k, k, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need_weights)
        assert out[0].shape == (L, E)
        close(out[0], expected[0])
        if need_weights:
            close(out[1], expected[1])


def test_mha_fully_masked_rows_attend_to_nothing():
    """Where torch gives NaN, the engine's attention gives 0: the output row is out_proj.bias,
    the weights are 0, and gradients stay finite."""
    torch.manual_seed(3)
    theirs, ours = pair(torch.nn.MultiheadAttention, enn.MultiheadAttention, E, H, batch_first=True)
    x = seq(True, L, E).requires_grad_()
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1] = True  # every key of sequence 1 hidden
    for need_weights in (True, False):
        expected = theirs(x, x, x, key_padding_mask=kpm, need_weights=need_weights)[0]
        out, weights = ours(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        if need_weights:  # torch's explicit softmax path (its SDPA path may give zeros too)
            assert torch.isnan(expected[1]).all()
        close(out[0], expected[0])
        close(out[1], ours.out_proj.bias.expand(L, E))
        if need_weights:
            assert (weights[1] == 0).all()
        out.sum().backward()
        assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in ours.parameters())
        x.grad = None
        ours.zero_grad()


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_gradients_match_torch(need_weights):
    torch.manual_seed(4)
    theirs, ours = pair(torch.nn.MultiheadAttention, enn.MultiheadAttention, E, H, kdim=12, vdim=10)
    q = seq(False, L, E)
    k, v = seq(False, S, 12), seq(False, S, 10)
    attn_mask, kpm = _masks("attn2_kpm_bool", L, S)
    inputs = [(q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()) for _ in range(2)]
    grad = torch.randn(L, B, E)
    for module, (qi, ki, vi) in zip((theirs, ours), inputs):
        module(qi, ki, vi, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need_weights)[0].backward(grad)
    for a, b in zip(inputs[0], inputs[1]):
        close(b.grad, a.grad, atol=1e-4, rtol=1e-4)
    for (name, p), q_ in zip(theirs.named_parameters(), ours.parameters()):
        assert q_.grad is not None, name
        close(q_.grad, p.grad, atol=1e-4, rtol=1e-4)


def test_mha_training_dropout():
    """Dropout on the probabilities in training mode only: eval is deterministic, training with
    p > 0 differs from eval, p = 0 in training equals eval, and backward runs."""
    torch.manual_seed(5)
    ours = randomize(enn.MultiheadAttention(E, H, dropout=0.5, batch_first=True))
    x = seq(True, L, E)
    ours.eval()
    reference = ours(x, x, x, need_weights=False)[0]
    ours.train()
    for need_weights in (False, True):
        out, weights = ours(x, x, x, need_weights=need_weights)
        assert not torch.allclose(out, reference)
        out.sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())
    ours.dropout = 0.0
    close(ours(x, x, x, need_weights=False)[0], reference)


# ---------------------------------------------------------------------------------------------
# Encoder and decoder layers

ACTIVATIONS = ["relu", "gelu", torch.nn.functional.gelu, torch.nn.GELU(approximate="tanh"), torch.tanh]


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["relu", "gelu", "F.gelu", "GELU-tanh", "tanh-unfused"])
def test_encoder_layer_matches_torch(norm_first, activation):
    torch.manual_seed(6)
    for batch_first, bias in ((False, True), (True, False)):
        theirs, ours = pair(torch.nn.TransformerEncoderLayer, enn.TransformerEncoderLayer, D, H, FF, 0.1, activation,
                            batch_first=batch_first, norm_first=norm_first, bias=bias)
        assert isinstance(ours.self_attn, enn.MultiheadAttention) and isinstance(ours.norm1, enn.LayerNorm)
        x = seq(batch_first, S, D)
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[1, -2:] = True
        causal = torch.nn.Transformer.generate_square_subsequent_mask(S)
        close(ours(x), theirs(x))
        close(ours(x, src_key_padding_mask=kpm), theirs(x, src_key_padding_mask=kpm))
        close(ours(x, src_mask=causal, is_causal=True), theirs(x, src_mask=causal, is_causal=True))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_decoder_layer_matches_torch(norm_first, activation):
    torch.manual_seed(7)
    for batch_first, bias in ((False, True), (True, False)):
        theirs, ours = pair(torch.nn.TransformerDecoderLayer, enn.TransformerDecoderLayer, D, H, FF, 0.1, activation,
                            batch_first=batch_first, norm_first=norm_first, bias=bias)
        assert isinstance(ours.multihead_attn, enn.MultiheadAttention) and isinstance(ours.norm3, enn.LayerNorm)
        tgt, memory = seq(batch_first, T, D), seq(batch_first, S, D)
        tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(T)
        # float padding masks like the float attention masks (torch warns on mixed mask types)
        memory_kpm = torch.zeros(B, S)
        memory_kpm[0, -3:] = -math.inf
        tgt_kpm = torch.zeros(B, T)
        tgt_kpm[1, -1] = -math.inf
        memory_mask = torch.randn(T, S)
        close(ours(tgt, memory), theirs(tgt, memory))
        kwargs = dict(tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_kpm,
                      memory_key_padding_mask=memory_kpm, tgt_is_causal=True)
        close(ours(tgt, memory, **kwargs), theirs(tgt, memory, **kwargs))


def test_layers_use_the_fused_ops(monkeypatch):
    """Eval pre-LN: residual + norm through add_layer_norm, the feed-forward residual fused into
    feed_forward; post-LN: every residual + norm through add_layer_norm."""
    calls = []
    for name in ("add_layer_norm", "feed_forward", "scaled_dot_product_attention"):
        original = getattr(engine.functional, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, args, kwargs))
            return _original(*args, **kwargs)
        monkeypatch.setattr(engine.functional, name, spy)
    x = seq(True, S, D)
    pre = enn.TransformerEncoderLayer(D, H, FF, batch_first=True, norm_first=True).eval()
    pre(x)
    names = [c[0] for c in calls]
    assert names == ["scaled_dot_product_attention", "add_layer_norm", "feed_forward"]
    assert calls[2][1][7] is not None  # the residual argument of feed_forward
    calls.clear()
    post = enn.TransformerEncoderLayer(D, H, FF, batch_first=True).eval()
    post(x)
    assert [c[0] for c in calls] == ["scaled_dot_product_attention", "add_layer_norm", "feed_forward",
                                     "add_layer_norm"]


# ---------------------------------------------------------------------------------------------
# Stacks and the full Transformer


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_decoder_stacks_match_torch(norm_first):
    torch.manual_seed(8)
    # built from torch's own layers: the copies become engine layers; final norms included
    enc_layer = torch.nn.TransformerEncoderLayer(D, H, FF, batch_first=True, norm_first=norm_first)
    dec_layer = torch.nn.TransformerDecoderLayer(D, H, FF, batch_first=True, norm_first=norm_first)
    theirs_enc = randomize(torch.nn.TransformerEncoder(enc_layer, 2, torch.nn.LayerNorm(D),
                                                       enable_nested_tensor=False)).eval()
    theirs_dec = randomize(torch.nn.TransformerDecoder(dec_layer, 2, torch.nn.LayerNorm(D))).eval()
    ours_enc = enn.TransformerEncoder(enc_layer, 2, torch.nn.LayerNorm(D)).eval()
    ours_dec = enn.TransformerDecoder(dec_layer, 2, torch.nn.LayerNorm(D)).eval()
    ours_enc.load_state_dict(theirs_enc.state_dict())
    ours_dec.load_state_dict(theirs_dec.state_dict())
    assert all(type(layer) is enn.TransformerEncoderLayer for layer in ours_enc.layers)
    assert all(type(layer) is enn.TransformerDecoderLayer for layer in ours_dec.layers)
    assert type(enc_layer) is torch.nn.TransformerEncoderLayer  # the caller's layer is left alone

    src, tgt = seq(True, S, D), seq(True, T, D)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, -2:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(T)
    memory = ours_enc(src, src_key_padding_mask=kpm)
    close(memory, theirs_enc(src, src_key_padding_mask=kpm))
    close(ours_dec(tgt, memory, tgt_mask=causal, memory_key_padding_mask=kpm),
          theirs_dec(tgt, memory, tgt_mask=causal, memory_key_padding_mask=kpm))
    # a bool causal mask is detected too
    close(ours_dec(tgt, memory, tgt_mask=causal.isinf()), theirs_dec(tgt, memory, tgt_mask=causal))


def test_causal_mask_is_detected_and_not_read(monkeypatch):
    seen = []
    original = engine.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        seen.append((attn_mask, is_causal))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)
    monkeypatch.setattr(engine.functional, "scaled_dot_product_attention", spy)
    encoder = enn.TransformerEncoder(enn.TransformerEncoderLayer(D, H, FF), 2).eval()
    x = seq(False, S, D)
    encoder(x, mask=torch.nn.Transformer.generate_square_subsequent_mask(S))
    assert seen == [(None, True), (None, True)]
    seen.clear()
    not_causal = torch.zeros(S, S)
    encoder(x, mask=not_causal)
    assert [c for _, c in seen] == [False, False] and all(m is not None for m, _ in seen)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # torch's constructor, about its fast path
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_matches_torch(norm_first):
    torch.manual_seed(9)
    theirs = torch.nn.Transformer(D, H, 2, 2, FF, 0.1, "gelu", norm_first=norm_first)
    torch.manual_seed(9)
    ours = enn.Transformer(D, H, 2, 2, FF, 0.1, "gelu", norm_first=norm_first)
    # same modules, keys and initial values for the same seed
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    assert list(theirs_state) == list(ours_state)
    assert all(torch.equal(theirs_state[k], ours_state[k]) for k in theirs_state)
    assert isinstance(ours.encoder, enn.TransformerEncoder) and isinstance(ours.decoder.norm, enn.LayerNorm)

    randomize(theirs).eval()
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    src, tgt = seq(False, S, D), seq(False, T, D)
    src_kpm = torch.zeros(B, S, dtype=torch.bool)
    src_kpm[0, -3:] = True
    tgt_mask = ours.generate_square_subsequent_mask(T)
    assert torch.equal(tgt_mask, torch.nn.Transformer.generate_square_subsequent_mask(T))
    kwargs = dict(tgt_mask=tgt_mask, src_key_padding_mask=src_kpm, memory_key_padding_mask=src_kpm)
    expected = theirs(src, tgt, **kwargs)  # grad enabled: torch takes no nested-tensor fast path
    out = ours(src, tgt, **kwargs)
    close(out, expected)

    grad = torch.randn_like(out)
    expected.backward(grad)
    out.backward(grad)
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
        close(q.grad, p.grad, atol=1e-4, rtol=1e-4)


def test_transformer_custom_encoder_decoder_used_as_given():
    torch.manual_seed(13)
    encoder = enn.TransformerEncoder(enn.TransformerEncoderLayer(D, H, FF), 1)
    decoder = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(D, H, FF), 1)
    ours = enn.Transformer(D, H, custom_encoder=encoder, custom_decoder=decoder).eval()
    assert ours.encoder is encoder and ours.decoder is decoder
    theirs = torch.nn.Transformer(D, H, custom_encoder=encoder, custom_decoder=decoder).eval()
    src, tgt = seq(False, S, D), seq(False, T, D)
    close(ours(src, tgt), theirs(src, tgt))


def test_training_mode_runs():
    """Training mode: the dropouts (hidden, attention, outer) are active, backward gives finite
    gradients everywhere; with dropout 0 training equals eval equals torch."""
    torch.manual_seed(10)
    model = enn.Transformer(D, H, 1, 1, FF, 0.3, batch_first=True, norm_first=True)
    src, tgt = seq(True, S, D), seq(True, T, D)
    model.eval()
    reference = model(src, tgt)
    model.train()
    out = model(src, tgt, tgt_is_causal=True)
    assert out.shape == reference.shape and not torch.allclose(out, reference)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    theirs, ours = pair(torch.nn.TransformerEncoderLayer, enn.TransformerEncoderLayer, D, H, FF, 0.0,
                        batch_first=True)
    theirs.train()
    ours.train()
    x = seq(True, S, D)
    close(ours(x), theirs(x))


def test_unbatched_layers():
    torch.manual_seed(11)
    theirs, ours = pair(torch.nn.TransformerDecoderLayer, enn.TransformerDecoderLayer, D, H, FF)
    tgt, memory = torch.randn(T, D), torch.randn(S, D)
    close(ours(tgt, memory, tgt_is_causal=True, tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(T)),
          theirs(tgt, memory, tgt_is_causal=True, tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(T)))


# ---------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("make,error,match", [
    (lambda: enn.MultiheadAttention(10, 3), ValueError, "divisible"),
    (lambda: enn.MultiheadAttention(0, 1), ValueError, "embed_dim must be positive"),
    (lambda: enn.MultiheadAttention(8, 2, dropout=1.0), ValueError, "dropout"),
    (lambda: enn.MultiheadAttention(8, 2, kdim=0), ValueError, "kdim"),
    (lambda: enn.MultiheadAttention(8.0, 2), TypeError, "embed_dim must be an int"),
    (lambda: enn.TransformerEncoderLayer(8, 2, activation="swish"), ValueError, "activation"),
    (lambda: enn.TransformerEncoderLayer(8, 2, activation=3), TypeError, "activation"),
    (lambda: enn.TransformerDecoderLayer(8, 3), ValueError, "divisible"),
    (lambda: enn.TransformerDecoderLayer(8, 2, dim_feedforward=0), ValueError, "dim_feedforward"),
    (lambda: enn.TransformerEncoderLayer(8, 2, layer_norm_eps=-1.0), ValueError, "layer_norm_eps"),
    (lambda: enn.TransformerEncoder(enn.TransformerEncoderLayer(8, 2, 16), 0), ValueError, "num_layers"),
    (lambda: enn.TransformerDecoder("layer", 2), TypeError, "decoder_layer"),
    (lambda: enn.Transformer(8, 2, 0, 1, 16), ValueError, "num_layers"),
    (lambda: enn.Transformer(8, 2, 1, 1, 16, activation="tanh"), ValueError, "activation"),
])
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_forward_inputs():
    mha = enn.MultiheadAttention(E, H, batch_first=True)
    x = seq(True, L, E)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        mha(x, x, x, attn_mask=torch.zeros(L, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        mha(x, x, x, key_padding_mask=torch.zeros(B + 1, L, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        mha(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))
    with pytest.raises(ValueError, match="last dim"):
        mha(x, x[..., :-1], x)
    with pytest.raises(ValueError, match="batch size"):
        mha(x, x[:1], x[:1])
    with pytest.raises(ValueError, match="3-D"):
        mha(x[0, 0], x[0, 0], x[0, 0])
    model = enn.Transformer(D, H, 1, 1, FF)
    with pytest.raises(ValueError, match="d_model"):
        model(seq(False, S, D + 1), seq(False, T, D + 1))
    with pytest.raises(ValueError, match="batch size"):
        model(seq(False, S, D), seq(False, T, D, batch=B + 1))


# ---------------------------------------------------------------------------------------------
# Embeddings


def test_sinusoidal_positional_encoding():
    dim, max_len = 7, 50  # odd dim: the last channel is a sine
    pe = enn.SinusoidalPositionalEncoding(dim, max_len)
    assert "pe" not in pe.state_dict() and pe.pe.shape == (max_len, dim) and pe.pe.dtype == torch.float32
    for p in (0, 1, 13, 49):
        for i in range(dim):
            angle = p / 10000 ** ((i - i % 2) / dim)
            expected = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert abs(pe.pe[p, i].item() - expected) < 1e-6
    assert torch.equal(pe(4), pe.pe[:4])
    assert torch.equal(pe(3, offset=10), pe.pe[10:13])
    starts = torch.tensor([0, 5])
    assert torch.equal(pe(3, offset=starts), torch.stack([pe.pe[0:3], pe.pe[5:8]]))
    ids = torch.tensor([[0, 2], [7, 1]])
    assert torch.equal(pe(ids), pe.pe[ids])
    assert torch.equal(pe(ids, offset=starts), pe.pe[ids + starts[:, None]])
    assert enn.SinusoidalPositionalEncoding(8, 4, dtype=torch.float64).pe.dtype == torch.float64
    with pytest.raises(ValueError, match="exceed"):
        pe(10, offset=45)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        pe(torch.tensor([3, 50]))
    with pytest.raises(TypeError, match="position ids"):
        pe(torch.tensor([1.0]))


def test_learned_positional_embedding():
    torch.manual_seed(12)
    emb = enn.LearnedPositionalEmbedding(16, 8)
    assert list(emb.state_dict()) == ["weight"] and emb.max_positions == 16
    assert torch.equal(emb(5), emb.weight[:5])
    assert torch.equal(emb(2, offset=3), emb.weight[3:5])
    offsets = torch.tensor([1, 4, 0])
    assert emb(2, offset=offsets).shape == (3, 2, 8)
    assert torch.equal(emb(2, offset=offsets)[1], emb.weight[4:6])
    ids = torch.tensor([[0, 15], [3, 3]])
    assert torch.equal(emb(ids), emb.weight[ids])
    emb(4).sum().backward()
    assert emb.weight.grad[:4].eq(1).all() and emb.weight.grad[4:].eq(0).all()
    with pytest.raises(ValueError, match="exceed"):
        emb(17)
    with pytest.raises(ValueError, match="max_positions must be positive"):
        enn.LearnedPositionalEmbedding(0, 8)
    with pytest.raises(TypeError, match="offset"):
        emb(2, offset=1.5)
    assert enn.Embedding is torch.nn.Embedding
