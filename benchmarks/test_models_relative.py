"""Transformer-XL and XLNet pre-training steps (forward + backward + AdamW step): ptm-kernels against the eager
einsum + rel-shift implementations a user would otherwise run.

- XLNet (two-stream, permutation LM: perm_mask + target_mapping predicting 1/6 of the tokens): "ptm" is our
  XLNetLMHeadModel (one fused two_stream_attention per layer), "eager" transformers' XLNetLMHeadModel, on the
  same weights.
- Transformer-XL (a segment after a full memory, adaptive softmax): "ptm" is our TransfoXLLMHeadModel, "eager"
  the transcription of the release in tests/models/transformer_xl_reference.py on the same state dict.
Outputs are checked against the eager twin before timing; peak memory is recorded on GPU.

The issue's shapes (XLNet-base at L = 512; Transformer-XL 512 + memory 512) run on a GPU; a 2-core CPU runs
2 layers at L = 128 (+ memory 128), where the per-layer ratio is what matters.
"""

from __future__ import annotations

import pytest
import torch

from .common import DEVICE, GPU, check_close, measure, train_step

transformers = pytest.importorskip("transformers")

from ptm_kernels.models import transformer_xl, xlnet  # noqa: E402
from tests.models import transformer_xl_reference as txl_ref  # noqa: E402

ROUNDS = None if GPU else 3
VOCAB = 32000 if GPU else 8000  # the embedding and softmax would dominate a 2-core CPU step
XL_LAYERS, XL_L, XL_B = (12, 512, 4) if GPU else (2, 128, 2)
TXL_LAYERS, TXL_L, TXL_B = (6, 512, 4) if GPU else (2, 128, 2)


@pytest.mark.parametrize("impl", ["ptm", "eager"])
def test_xlnet_two_stream_train_step(benchmark, impl):
    torch.manual_seed(0)
    cfg = transformers.XLNetConfig(vocab_size=VOCAB, d_model=768, n_layer=XL_LAYERS, n_head=12, d_inner=3072,
                                   dropout=0.0, mem_len=None)
    hf = transformers.XLNetLMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, VOCAB, (XL_B, XL_L), generator=g)
    batch = xlnet.permutation_lm_inputs(ids, K=6, generator=g)
    inputs = {k: v.to(DEVICE) for k, v in dict(input_ids=ids, perm_mask=batch["perm_mask"],
                                                target_mapping=batch["target_mapping"],
                                                labels=batch["labels"]).items()}
    hf = hf.to(DEVICE).eval()
    ours = xlnet.XLNetLMHeadModel.from_hf(hf).to(DEVICE).eval()
    unlabelled = {k: v for k, v in inputs.items() if k != "labels"}  # with labels ours returns the loss only
    with torch.no_grad():
        check_close(ours(**unlabelled).logits, hf(**unlabelled).logits, "xlnet", rtol=1e-3, atol=1e-3)
        check_close(ours(**inputs).loss, hf(**inputs).loss, "xlnet loss", rtol=1e-3, atol=1e-3)
    model = ours if impl == "ptm" else hf
    del ours, hf
    model.train()
    step = train_step(model.parameters(), lambda: model(**inputs).loss)
    case = f"xlnet-{XL_LAYERS}l {XL_B}x{XL_L} predict {inputs['target_mapping'].shape[1]}"
    measure(benchmark, step, group="xlnet-pretrain", case=case, impl=impl, passes="train-step", rounds=ROUNDS,
            peak_memory=True)


@pytest.mark.parametrize("impl", ["ptm", "eager"])
def test_transformer_xl_train_step(benchmark, impl):
    torch.manual_seed(0)
    c = transformer_xl.TransfoXLConfig(n_token=VOCAB, d_model=512, d_embed=512, n_head=8, d_head=64, d_inner=2048,
                                       n_layer=TXL_LAYERS, cutoffs=(VOCAB // 8, 3 * VOCAB // 8), div_val=4, mem_len=TXL_L,
                                       same_length=False, clamp_len=-1, dropout=0.0)
    model = transformer_xl.TransfoXLLMHeadModel(c).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, c.n_token, (TXL_B, 2 * TXL_L + 1), generator=g).to(DEVICE)
    x0, x, y = ids[:, :TXL_L], ids[:, TXL_L:2 * TXL_L], ids[:, TXL_L + 1:]
    model.eval()
    with torch.no_grad():
        mems = model(x0).mems
        ours = model(x, mems=mems, labels=y)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref_mems = [m.transpose(0, 1).contiguous() for m in mems]
    with torch.no_grad():
        h, _ = txl_ref.forward(sd, c, x, ref_mems)
    check_close(ours.last_hidden_state, h, "transformer-xl", rtol=1e-3, atol=1e-3)
    if impl == "ptm":
        model.train()
        params = list(model.parameters())

        def loss():
            return model(x, mems=mems, labels=y).loss
    else:
        del model
        leaves = {k: v.requires_grad_(True) for k, v in sd.items()}
        params = list({v.data_ptr(): v for v in leaves.values()}.values())

        def loss():
            hid, _ = txl_ref.forward(leaves, c, x, ref_mems)
            return txl_ref.adaptive_nll(leaves, c, hid.reshape(-1, c.d_model), y.reshape(-1)).mean()
    step = train_step(params, loss)
    case = f"transformer-xl-{TXL_LAYERS}l {TXL_B}x{TXL_L} mem {TXL_L}"
    measure(benchmark, step, group="transformer-xl-train", case=case, impl=impl, passes="train-step",
            rounds=ROUNDS, peak_memory=True)
