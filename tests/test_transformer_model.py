"""engine.models.Transformer, the encoder-decoder: shapes, causal masking in the decoder, padding
masks, post-LN and pre-LN, the wiring against torch.nn's layers with the same weights, and a tiny
copy task whose loss falls and which greedy translation then solves."""
import math

import pytest
import torch

from engine.models.transformer import Transformer, TransformerConfig

VOCAB = 17   # 0 pad, 1 bos, 2 eos, 3.. data tokens


def tiny(**overrides):
    args = dict(src_vocab_size=VOCAB, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                dim_feedforward=64, dropout=0.0, max_len=64)
    args.update(overrides)
    torch.manual_seed(0)
    return Transformer(TransformerConfig(**args)).eval()


def batch(b=3, s=7, t=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, s), generator=g), torch.randint(3, VOCAB, (b, t), generator=g)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_shapes_and_loss(norm_first):
    model = tiny(norm_first=norm_first)
    src, tgt = batch()
    labels = torch.roll(tgt, -1, 1)
    labels[:, -1] = -100
    logits, loss = model(src, tgt, labels=labels)
    assert logits.shape == (3, 5, VOCAB)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, :-1].reshape(-1))
    torch.testing.assert_close(loss, expected)
    assert model(src, tgt)[1] is None
    assert (model.encoder.norm is not None) == norm_first  # pre-LN stacks close with a LayerNorm


def test_output_projection_tied_and_embeddings_shared():
    model = tiny()
    assert model.output.weight is model.tgt_embed.weight
    assert model.src_embed is not model.tgt_embed
    shared = tiny(share_embeddings=True, tie_output=False)
    assert shared.src_embed is shared.tgt_embed and shared.output.weight is not shared.tgt_embed.weight


def test_decoder_is_causal():
    """Changing target token k changes the logits at positions >= k only."""
    model = tiny()
    src, tgt = batch()
    with torch.no_grad():
        base, _ = model(src, tgt)
        changed = tgt.clone()
        changed[:, 3] = (changed[:, 3] + 1 - 3) % (VOCAB - 3) + 3
        after, _ = model(src, changed)
    torch.testing.assert_close(after[:, :3], base[:, :3], atol=1e-6, rtol=0)
    assert (after[:, 3:] - base[:, 3:]).abs().amax() > 1e-3


def test_padding_masks():
    model = tiny()
    src, tgt = batch()
    src_pad = torch.zeros_like(src, dtype=torch.bool)
    src_pad[1, 4:] = True
    src_pad[2, 2:] = True
    with torch.no_grad():
        base, _ = model(src, tgt, src_key_padding_mask=src_pad)
        # the padded source tokens' contents are invisible
        other = src.masked_fill(src_pad, 5)
        torch.testing.assert_close(model(other, tgt, src_key_padding_mask=src_pad)[0], base, atol=1e-6, rtol=0)
        # a padded batch row equals that row alone, unpadded
        alone, _ = model(src[2:3, :2], tgt[2:3])
        torch.testing.assert_close(base[2:3], alone, atol=1e-5, rtol=1e-5)
        # target padding (right padding) leaves the real positions unchanged
        tgt_pad = torch.zeros_like(tgt, dtype=torch.bool)
        tgt_pad[0, 3:] = True
        padded, _ = model(src, tgt, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad)
        torch.testing.assert_close(padded[0, :3], base[0, :3], atol=1e-6, rtol=0)
        # integer masks (1 = padding) are accepted too
        torch.testing.assert_close(model(src, tgt, src_key_padding_mask=src_pad.long())[0], base)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_wiring_matches_torch_layers(norm_first):
    """The same computation written with torch.nn's encoder/decoder stacks and our weights."""
    model = tiny(norm_first=norm_first)
    c = model.config
    args = dict(d_model=c.d_model, nhead=c.nhead, dim_feedforward=c.dim_feedforward, dropout=0.0,
                batch_first=True, norm_first=norm_first)
    norm = (lambda: torch.nn.LayerNorm(c.d_model)) if norm_first else (lambda: None)
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(**args), c.num_encoder_layers, norm(),
                                          enable_nested_tensor=False).eval()
    decoder = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(**args), c.num_decoder_layers,
                                          norm()).eval()
    encoder.load_state_dict(model.encoder.state_dict())
    decoder.load_state_dict(model.decoder.state_dict())
    src, tgt = batch()
    src_pad = torch.zeros_like(src, dtype=torch.bool)
    src_pad[0, 5:] = True
    scale = math.sqrt(c.d_model)
    with torch.no_grad():
        x = model.src_embed(src) * scale + model.positions.pe[:src.shape[1]]
        memory = encoder(x, src_key_padding_mask=src_pad)
        y = model.tgt_embed(tgt) * scale + model.positions.pe[:tgt.shape[1]]
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        h = decoder(y, memory, tgt_mask=causal, memory_key_padding_mask=src_pad, tgt_is_causal=True)
        expected = h @ model.output.weight.t()
        got, _ = model(src, tgt, src_key_padding_mask=src_pad)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_copy_task_loss_falls_and_greedy_translation_copies():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(src_vocab_size=8, d_model=32, nhead=4, num_encoder_layers=1,
                                          num_decoder_layers=1, dim_feedforward=64, dropout=0.0, max_len=16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    length, bos, eos = 4, 1, 2
    losses = []
    for _ in range(60):
        body = torch.randint(3, 8, (32, length), generator=g)
        tgt_in = torch.cat([torch.full((32, 1), bos), body], 1)
        labels = torch.cat([body, torch.full((32, 1), eos)], 1)
        _, loss = model(body, tgt_in, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    test = torch.randint(3, 8, (32, length), generator=g)
    out = model.translate(test, max_new_tokens=length + 2)
    assert out[:, 0].eq(bos).all()
    copied = (out[:, 1:length + 1] == test).float().mean().item()
    assert copied > 0.6, (copied, test, out)  # chance: 0.2 (5 data tokens); about 0.8 after these 60 steps
    assert model.training  # translate restores the mode


def test_translate_stops_and_pads_after_eos():
    model = tiny()
    src, _ = batch()
    out = model.translate(src, max_new_tokens=6)
    assert out.shape[0] == 3 and 2 <= out.shape[1] <= 7
    for row in out.tolist():
        if 2 in row[1:]:
            first = row.index(2, 1)
            assert all(t == 0 for t in row[first + 1:])


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of nhead"):
        TransformerConfig(src_vocab_size=10, d_model=30, nhead=4)
    with pytest.raises(ValueError, match="share_embeddings"):
        TransformerConfig(src_vocab_size=10, tgt_vocab_size=12, share_embeddings=True)
    with pytest.raises(ValueError, match="activation"):
        TransformerConfig(src_vocab_size=10, activation="swish")
    model = tiny()
    src, tgt = batch()
    with pytest.raises(TypeError, match="src"):
        model(src.float(), tgt)
    with pytest.raises(ValueError, match="src_key_padding_mask"):
        model(src, tgt, src_key_padding_mask=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        model(src, tgt, labels=tgt[:, :2])
    with pytest.raises(ValueError, match="max_len"):
        model(torch.randint(3, VOCAB, (1, 65)), tgt[:1])
