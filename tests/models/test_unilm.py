"""UniLM: each self-attention mode (an analytic mask) equals the same model under the equivalent dense mask."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ptm_kernels import AttentionMask  # noqa: E402

from ._import import model_module  # noqa: E402
from .parity import batch, check_eval  # noqa: E402

unilm = model_module("unilm")

L = 12


def _model():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    hf = transformers.BertForMaskedLM(cfg)
    return unilm.UniLMForMaskedLM.from_hf(hf), hf


def _layouts():
    right = batch()  # [source, target, padding]: lengths 12, 9, 5
    src_right = torch.tensor([5, 4, 2])
    # UniLM's layout [source, source padding, target, target padding] with source padded to S = 5
    S, src, tgt = 5, torch.tensor([5, 3, 2]), torch.tensor([7, 4, 1])
    j = torch.arange(L)
    real = (j < src[:, None]) | ((j >= S) & (j < S + tgt[:, None]))
    split = dict(input_ids=torch.where(real, right["input_ids"], 0), attention_mask=real.long(),
                 token_type_ids=(j >= S).long().expand(3, L) * real)
    return [("right_padded", right, src_right), ("source_padded", split, torch.full((3,), S))]


def _dense(mode, real, source_lengths):
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    if mode == "bidirectional":
        rule = torch.ones(L, L, dtype=torch.bool).expand(3, L, L)
    elif mode == "left_to_right":
        rule = (j <= i).expand(3, L, L)
    else:
        rule = (j < source_lengths.view(3, 1, 1)) | (j <= i)
    return (rule & real[:, None, :]).unsqueeze(1)  # [B, 1, L, L]


@pytest.mark.parametrize("layout", [0, 1], ids=["right_padded", "source_padded"])
@pytest.mark.parametrize("mode", unilm.MODES)
def test_mode_equals_dense_mask(mode, layout):
    model, _ = _model()
    name, inputs, src = _layouts()[layout]
    real = inputs["attention_mask"].bool()
    mask = unilm.unilm_mask(mode, inputs["attention_mask"], source_lengths=src)
    assert mask.dense_mask is None and mask.additive_bias is None  # analytic parts only
    dense = AttentionMask.dense(_dense(mode, real, src))
    kw = dict(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"])

    model.eval()
    with torch.no_grad():
        a = model(**kw, attention_mask=inputs["attention_mask"], mode=mode, source_lengths=src)
        b = model(**kw, mask=dense)
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=1e-5, rtol=1e-5)

    model.train()  # dropout 0: gradients agree too
    grads = []
    for m in (mask, dense):
        model.zero_grad()
        model(**kw, mask=m).logits[real].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-5, msg=n)


def test_bidirectional_is_bert():
    model, hf = _model()
    check_eval(model, hf, batch(), [("hidden", None), ("logits", "logits")], "unilm/bidirectional")


def test_left_to_right_ignores_the_future():
    model, _ = _model()
    model.eval()
    ids = batch()["input_ids"][:1]
    with torch.no_grad():
        a = model(ids, mode="left_to_right").logits
        b = model(torch.cat([ids[:, :6], torch.randint(5, 100, (1, L - 6))], 1), mode="left_to_right").logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
