"""LLaMA with transformers' RoPE scaling variants (rope_parameters rope_type linear, dynamic, llama3, yarn) against
transformers, on the same random weights: logits on a left-padded batch longer than max_position_embeddings
(the dynamic variant rescales there), greedy generation past it, and the config round trip."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ._import import model_module  # noqa: E402

V, MAX_POS, L = 100, 32, 48  # sequences run past max_position_embeddings
TOL = 1e-4

VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "yarn_mscale": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16, "beta_fast": 16.0,
                    "beta_slow": 2.0, "mscale": 2.0, "mscale_all_dim": 1.0},
}


def _pair(variant):
    torch.manual_seed(0)
    # theta 100: the low frequencies turn within the positions used, so every part of each variant matters
    c = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                                 rope_parameters={"rope_theta": 100.0, **VARIANTS[variant]}, initializer_range=0.2,
                                 bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(c).eval()
    hf.config._attn_implementation = "eager"
    return hf, model_module("llama").Llama.from_hf(hf).eval()


@pytest.fixture(params=list(VARIANTS), scope="module")
def pair(request):
    return _pair(request.param)


def test_logits_past_max_positions(pair):
    hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(1, V, (2, L))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, :7] = 0  # left padding: row 1 counts its own positions
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for n in (20, L):  # within max_position_embeddings, then past it (dynamic NTK rescales there)
            want = hf(ids[:, :n], attention_mask=mask[:, :n], position_ids=pos[:, :n]).logits
            got = ours(ids[:, :n], attention_mask=mask[:, :n], position_ids=pos[:, :n]).logits
            real = mask[:, :n].bool()
            assert (got - want)[real].abs().max().item() <= TOL


def test_scaling_changes_the_logits(pair):
    """The variant is not the plain rotary (else the comparison above would test nothing of it)."""
    hf, ours = pair
    plain = model_module("llama").Llama(ours.config.__class__(**{**ours.config.__dict__, "rope_scaling": None}))
    plain.load_state_dict(ours.state_dict())
    ids = torch.randint(1, V, (1, L))
    with torch.no_grad():
        assert (plain.eval()(ids).logits - ours(ids).logits).abs().max().item() > 1e-3


def test_greedy_generation_past_max_positions(pair):
    hf, ours = pair
    torch.manual_seed(2)
    ids = torch.randint(1, V, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    new = L - 10
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0)
    got = ours.generate(ids, new, attention_mask=mask)
    assert torch.equal(got[:, 10:], want[:, 10:])


def test_config_round_trip(pair):
    hf, ours = pair
    back = ours.config.to_hf().rope_parameters
    assert back == hf.config.rope_parameters
