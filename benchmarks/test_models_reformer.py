"""Reformer LM (local + LSH layers): ptm-kernels against transformers' ReformerModelWithLMHead on the same weights,
the model a user would otherwise run. Eval forward and a training step (forward + backward + AdamW).

Ours runs each layer's chunks as one fused attention call; transformers computes the chunks' scores in torch
(and recomputes the layers' activations in its reversible backward, which saves memory and costs a second forward).
With num_hashes > 1 our training step combines the rounds in plain torch (the fused op's log-sum-exp carries no
gradient), so that case shows what is left on the table. Logits are checked against transformers before timing.
"""

from __future__ import annotations

import pytest
import torch

from .common import DEVICE, GPU, check_close, measure, random_ids, train_step

transformers = pytest.importorskip("transformers")

from ptm_kernels.models import reformer  # noqa: E402

ROUNDS = None if GPU else 3
B, L = (8, 4096) if GPU else (2, 1024)
AXIAL = (64, 64) if GPU else (32, 32)


def _config(num_hashes: int):
    return transformers.ReformerConfig(
        vocab_size=320, hidden_size=256, num_attention_heads=4, attention_head_size=64,
        attn_layers=["local", "lsh", "local", "lsh"], axial_pos_shape=AXIAL, axial_pos_embds_dim=(64, 192),
        max_position_embeddings=AXIAL[0] * AXIAL[1], feed_forward_size=512, local_attn_chunk_length=64,
        lsh_attn_chunk_length=64, num_buckets=2 * L // 64, num_hashes=num_hashes, hash_seed=0, is_decoder=True,
        hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0)


def _models(impl: str, num_hashes: int):
    torch.manual_seed(0)
    hf = transformers.ReformerModelWithLMHead(_config(num_hashes)).eval()
    ids = random_ids(B, L, 1, 320)
    ours = reformer.ReformerModelWithLMHead.from_hf(hf).to(DEVICE).eval()
    hf = hf.to(DEVICE)
    with torch.no_grad():
        check_close(ours(ids).logits, hf(input_ids=ids).logits, "reformer", rtol=1e-3, atol=1e-3)
    return (ours if impl == "ptm" else hf), ids


@pytest.mark.parametrize("num_hashes", [1, 2])
@pytest.mark.parametrize("impl", ["ptm", "eager"])
def test_reformer_forward(benchmark, impl, num_hashes):
    model, ids = _models(impl, num_hashes)

    def run():
        with torch.no_grad():
            model(ids)
    measure(benchmark, run, group="reformer-lm", case=f"4l {B}x{L} hashes={num_hashes}", impl=impl,
            passes="forward", rounds=ROUNDS)


@pytest.mark.parametrize("num_hashes", [1, 2])
@pytest.mark.parametrize("impl", ["ptm", "ptm-checkpoint", "eager"])
def test_reformer_train_step(benchmark, impl, num_hashes):
    """ptm-checkpoint: ours with checkpoint_layers (each layer recomputed in the backward, as transformers'
    reversible layers are): the memory side of the trade."""
    model, ids = _models("ptm" if impl.startswith("ptm") else impl, num_hashes)
    model.train()
    if impl == "ptm-checkpoint":
        model.checkpoint_layers = True
    loss = (lambda: model(ids, labels=ids).loss) if impl != "eager" else (lambda: model(input_ids=ids, labels=ids).loss)
    measure(benchmark, train_step(model.parameters(), loss), group="reformer-lm",
            case=f"4l {B}x{L} hashes={num_hashes}", impl=impl, passes="train-step", rounds=ROUNDS, peak_memory=True)
