"""transformers encoders patched in place by `ptm_kernels.hf` against the same model unpatched (SDPA).

Cases (both impls load the same weights; each step is forward + backward of the loss, gradients reset):
- hf-bert-mlm: BertForMaskedLM, 4 layers at bert-base widths (hidden 768, 12 heads, FFN 3072, vocab 30522),
  batch 8 x 128 with 20% padding, 15% of the real tokens labelled, dropout 0 and 0.1.
- hf-t5: T5ForConditionalGeneration, 4 + 4 layers at t5-small widths (d_model 512, 8 heads, d_ff 2048,
  vocab 32128, "relu" FFN), source 8 x 128 with 20% padding, target 8 x 64, dropout 0.
- hf-bart: BartForConditionalGeneration, 4 + 4 layers at bart-base widths (d_model 768, 12 heads, FFN 3072,
  vocab 50265, GELU), source 8 x 128 with 20% padding, target 8 x 64, dropout 0.

impl "ptm": the model after `ptm_kernels.hf.apply` (labelled-rows MLM loss / fused linear cross-entropy,
unpadded encoder, fused norms and activations, T5's relative bias as a Toeplitz part, BART's residual adds
fused into its LayerNorms); "sdpa": the same
transformers model unpatched with attn_implementation="sdpa". Before timing, the losses of the two (dropout
off) are checked against each other: a fast wrong model is not a result.
"""

from __future__ import annotations

import copy

import pytest
import torch

from .common import DEVICE, GPU, measure

transformers = pytest.importorskip("transformers")

ROUNDS = None if GPU else 5
PAD_FRACTION = 0.2
LABEL_FRACTION = 0.15
IMPLS = ["ptm", "sdpa"]


def _apply(model):
    """hf.apply when the dispatcher exists, else the family function directly (same patches)."""
    from ptm_kernels import hf

    if hasattr(hf, "apply"):
        return hf.apply(model)
    from ptm_kernels.hf import bart, bert, t5  # noqa: F401  (registers the families)
    from ptm_kernels.hf.patching import FAMILIES, Patcher, PatchOptions

    FAMILIES[model.config.model_type](model, PatchOptions(), Patcher())
    return model


def _padding_mask(B: int, L: int) -> torch.Tensor:
    """Lengths falling linearly from L to (1 - 2 * PAD_FRACTION) L: PAD_FRACTION of the batch is padding."""
    lengths = torch.tensor([round(L * (1 - 2 * PAD_FRACTION * i / max(1, B - 1))) for i in range(B)])
    return (torch.arange(L) < lengths[:, None]).long()


def _twins(model_class, config):
    """(patched, unpatched SDPA) on the same weights, on DEVICE."""
    torch.manual_seed(0)
    reference = model_class(config)
    reference.set_attn_implementation("sdpa")
    patched = _apply(copy.deepcopy(reference))
    return patched.to(DEVICE), reference.to(DEVICE)


def _step(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        for p in params:
            p.grad = None
        model(**batch).loss.backward()
    return run


def _check_loss(patched, reference, batch, name):
    patched.eval(), reference.eval()
    with torch.no_grad():
        a, b = patched(**batch).loss, reference(**batch).loss
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    patched.train(), reference.train()


# ---------------------------------------------------------------------------------------------- BERT MLM


def _bert_batch(B: int, L: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    mask = _padding_mask(B, L)
    ids = torch.randint(1000, vocab, (B, L), generator=g) * mask
    labelled = (torch.rand(B, L, generator=g) < LABEL_FRACTION) & (mask == 1)
    labels = torch.where(labelled, ids, torch.full_like(ids, -100))
    return dict(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), labels=labels.to(DEVICE))


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["dropout0", "dropout0.1"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bert_mlm_train_step(benchmark, impl, dropout):
    config = transformers.BertConfig(num_hidden_layers=4, hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=dropout)
    patched, reference = _twins(transformers.BertForMaskedLM, config)
    batch = _bert_batch(8, 128, config.vocab_size)
    _check_loss(patched, reference, batch, "bert mlm")
    model = patched if impl == "ptm" else reference
    del patched, reference
    measure(benchmark, _step(model, batch), group="hf-bert-mlm",
            case=f"4l bert-base 8x128 pad20% labels15% dropout{dropout}", impl=impl, passes="fwd+bwd",
            rounds=ROUNDS, peak_memory=True)


# -------------------------------------------------------------------------------------------------- T5


def _seq2seq_batch(B: int, Ls: int, Lt: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    mask = _padding_mask(B, Ls)
    ids = torch.randint(2, vocab, (B, Ls), generator=g) * mask
    labels = torch.randint(2, vocab, (B, Lt), generator=g)
    return dict(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), labels=labels.to(DEVICE))


def _seq2seq_train_step(benchmark, impl, model_class, config, group, case):
    patched, reference = _twins(model_class, config)
    batch = _seq2seq_batch(8, 128, 64, config.vocab_size)
    _check_loss(patched, reference, batch, group)
    model = patched if impl == "ptm" else reference
    del patched, reference
    measure(benchmark, _step(model, batch), group=group, case=case, impl=impl, passes="fwd+bwd", rounds=ROUNDS,
            peak_memory=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_t5_train_step(benchmark, impl):
    config = transformers.T5Config(d_model=512, d_ff=2048, num_heads=8, d_kv=64, num_layers=4,
                                   num_decoder_layers=4, vocab_size=32128, dropout_rate=0.0,
                                   decoder_start_token_id=0)
    _seq2seq_train_step(benchmark, impl, transformers.T5ForConditionalGeneration, config, "hf-t5",
                        "4+4l t5-small 8x128->64 pad20%")


# ------------------------------------------------------------------------------------------------ BART


@pytest.mark.parametrize("impl", IMPLS)
def test_bart_train_step(benchmark, impl):
    config = transformers.BartConfig(d_model=768, encoder_layers=4, decoder_layers=4, encoder_attention_heads=12,
                                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                                     vocab_size=50265, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    _seq2seq_train_step(benchmark, impl, transformers.BartForConditionalGeneration, config, "hf-bart",
                        "4+4l bart-base 8x128->64 pad20%")
