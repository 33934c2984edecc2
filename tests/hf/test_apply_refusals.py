"""hf.apply refuses a model type it has no patches for, naming it and the supported ones; where this project's
own models convert that transformers class (models/, from_hf), the error names the converter."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="ptm_kernels.hf needs transformers")

import ptm_kernels.hf as hf  # noqa: E402
from ptm_kernels.models.reformer import ReformerModelWithLMHead  # noqa: E402


def test_unpatched_type_with_a_converter_names_it():
    config = transformers.ReformerConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, attention_head_size=16,
                                         attn_layers=["local", "lsh"], axial_pos_shape=[4, 8],
                                         axial_pos_embds_dim=[8, 24], max_position_embeddings=32, is_decoder=True,
                                         local_attn_chunk_length=4, lsh_attn_chunk_length=8, num_buckets=4)
    model = transformers.ReformerModelWithLMHead(config)
    with pytest.raises(ValueError, match=r"model_type 'reformer' is not supported; supported: .*llama") as err:
        hf.apply(model)
    hint = "ptm_kernels.models.reformer.ReformerModelWithLMHead.from_hf(model)"
    assert hint in str(err.value)
    ours = ReformerModelWithLMHead.from_hf(model)  # the hint works
    ids = torch.randint(1, 50, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, model.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_unpatched_type_without_a_converter_has_no_hint():
    model = transformers.FNetModel(transformers.FNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                           intermediate_size=37))
    with pytest.raises(ValueError, match="model_type 'fnet' is not supported") as err:
        hf.apply(model)
    assert "from_hf" not in str(err.value)
