"""MASS (models/mass.py) against the plain-PyTorch transcription in mass_reference.py, on MASS's own
pre-training examples (fragment masking): logits, loss and every parameter's gradient; cached decoding."""

import torch
import torch.nn.functional as F

from . import mass_reference as ref
from ._import import model_module

mass = model_module("mass")
noising = model_module("noising")
TOL = 1e-4


def _model():
    torch.manual_seed(0)
    c = mass.MassConfig(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, dropout=0.0,
                        max_position_embeddings=64)
    model = mass.Mass(c)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(std=0.3) if "norm" not in name else p.add_(0.1 * torch.randn_like(p))
        model.final_logits_bias.normal_()
    return model


def _examples():
    """Two sentences (lengths 12 and 8, right padded) fragment-masked; decoder inputs of equal length 6 / 4."""
    g = torch.Generator().manual_seed(0)
    src = torch.full((2, 12), 2)
    mask = torch.zeros(2, 12, dtype=torch.long)
    dec, pos, labels = torch.full((2, 6), 2), torch.zeros(2, 6, dtype=torch.long), torch.full((2, 6), -100)
    for row, n in enumerate((12, 8)):
        ex = noising.mass_fragment_mask(torch.randint(6, 100, (n,), generator=g), 5, 100, generator=g)
        k = len(ex.labels)
        src[row, :n], mask[row, :n] = ex.encoder_input, 1
        dec[row, :k], pos[row, :k], labels[row, :k] = ex.decoder_input, ex.decoder_positions, ex.labels
    return src, mask, dec, pos, labels


def test_mass_matches_reference():
    model = _model().train()  # dropout 0: train mode runs the same math
    src, mask, dec, pos, labels = _examples()
    out = model(src, mask, decoder_input_ids=dec, decoder_position_ids=pos, labels=labels)
    p = ref.params_from(model)
    want = ref.forward(p, model.config, src, mask, dec, pos)
    want_loss = F.cross_entropy(want.flatten(0, 1), labels.flatten(), ignore_index=-100)
    real = labels != -100
    assert (out.logits - want)[real].abs().max().item() <= TOL
    assert abs(out.loss.item() - want_loss.item()) <= TOL
    params = [p for p in model.parameters()]
    got_grads = torch.autograd.grad(out.loss, params)
    want_grads = torch.autograd.grad(want_loss, params)
    for (name, _), a, b in zip(model.named_parameters(), got_grads, want_grads):
        assert (a - b).abs().max().item() <= TOL, name


def test_mass_cached_generation():
    model = _model().eval()
    src, mask, *_ = _examples()
    cached = model.generate(src, 8, attention_mask=mask, eos_token_id=None)
    full = model.generate(src, 8, attention_mask=mask, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, full)
    beams = model.generate(src, 8, attention_mask=mask, eos_token_id=None, num_beams=3)
    assert beams.shape == (2, 9)
