"""Transformer-XL from transformers' layout (its TransfoXLLMHeadModel, gone in transformers 5) against transformers
itself: fixtures/transfo_xl_hf.pt holds random weights, configs and the log-probabilities that transformers 4.35.2
computed over three segments with the memory carried (fixtures/make_transfo_xl_hf.py made it, once, in a
throwaway venv). Three cases, two tail clusters in each, so the order of the adaptive softmax's cluster rows shows;
between them every field of TransfoXLConfig that changes the math takes two values or more."""

import ast
import inspect
import os

import pytest
import torch

from ._import import model_module

txl = model_module("transformer_xl")
FIXTURE = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "transfo_xl_hf.pt"))
CASES = [k for k in FIXTURE if k not in ("transformers_version", "config_fields")]
TOL = 1e-4  # float32 on both sides; log-probabilities O(1)

# TransfoXLConfig's own fields (fixture["config_fields"]), as test_from_hf_fields.py classifies the others' fields.
# HONOURED: they take at least two values across the fixture's cases, each matched against transformers.
HONOURED = {"vocab_size", "cutoffs", "d_model", "d_embed", "n_head", "d_inner", "div_val", "pre_lnorm", "n_layer",
            "mem_len", "clamp_len", "same_length", "untie_r", "layer_norm_epsilon", "tie_word_embeddings",
            "proj_share_all_but_first"}
REFUSED = {"attn_type": 1, "sample_softmax": 8, "adaptive": False}
NOT_MATH = {
    "d_head": "16 in every case: the kernels' smallest head dim (the layouts scale with it like n_head's)",
    "dropout": "dropout probability: identity in eval; carried into our config for training",
    "dropatt": "attention dropout probability: identity in eval; carried into our config for training",
    "init": "initialisation only", "init_range": "initialisation only", "proj_init_std": "initialisation only",
    "init_std": "initialisation only", "eos_token_id": "a generation id",
}
# proj_share_all_but_first reaches the saved config as tie_projs (transformers derives one from the other)
SAVED_AS = {"proj_share_all_but_first": "tie_projs"}


def _log_probs(model, ids, segments):
    """Our log-probabilities [segments, B, L, V], segment by segment with our memory carried, from the zero memory
    that transformers starts from when given none (the release starts from an empty one)."""
    L = ids.shape[1] // segments
    out, mems = [], model.zero_mems(ids.shape[0])
    with torch.no_grad():
        for s in range(segments):
            o = model(ids[:, s * L:(s + 1) * L], mems=mems, return_log_probs=True)
            out.append(o.log_probs)
            mems = o.mems
    return torch.stack(out)


@pytest.mark.parametrize("name", CASES)
def test_matches_transformers(name):
    case = FIXTURE[name]
    model = txl.TransfoXLLMHeadModel.from_hf_state(case["state_dict"], case["config"]).eval()
    theirs = case["log_probs"]
    ours = _log_probs(model, case["input_ids"], theirs.shape[0])
    diff = (ours - theirs).abs().max().item()
    assert diff < TOL, f"{name}: log-probabilities differ by {diff}"


@pytest.mark.parametrize("name", CASES)
def test_cluster_rows_are_reversed(name):
    """Read in transformers' order as they are (the release's layout, no reversal), the same weights give other
    log-probabilities: the reversal is what makes the match, not an accident of the weights."""
    case = FIXTURE[name]
    model = txl.TransfoXLLMHeadModel(txl.config_from_hf(case["config"])).eval()
    ours = model.state_dict()  # (transformers also lists shared r biases under each layer: keep ours' names)
    renamed = {k.removeprefix("transformer."): v for k, v in case["state_dict"].items()}
    model.load_state_dict({k: v for k, v in renamed.items() if k in ours})  # strict: every weight of ours
    ours = _log_probs(model, case["input_ids"], case["log_probs"].shape[0])
    assert (ours - case["log_probs"]).abs().max().item() > 0.01


def test_every_config_field_is_classified():
    fields = set(FIXTURE["config_fields"])
    assert fields == HONOURED | set(REFUSED) | set(NOT_MATH)
    for name in HONOURED:  # exercised: two values or more across the cases
        values = {repr(FIXTURE[c]["config"][SAVED_AS.get(name, name)]) for c in CASES}
        assert len(values) >= 2, f"{name} takes one value only: {values}"


def test_refuses_what_it_cannot_run():
    case = FIXTURE[CASES[0]]
    for field, value in REFUSED.items():
        with pytest.raises(NotImplementedError, match=field):
            txl.TransfoXLLMHeadModel.from_hf_state(case["state_dict"], {**case["config"], field: value})
    extra = {**case["state_dict"], "transformer.layers.0.dec_attn.scale": torch.ones(2)}
    with pytest.raises(KeyError, match="transformer.layers.0.dec_attn.scale"):
        txl.TransfoXLLMHeadModel.from_hf_state(extra, case["config"])


def test_keeps_the_dtype_and_needs_no_transformers():
    case = FIXTURE[CASES[0]]
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in case["state_dict"].items()}
    model = txl.TransfoXLLMHeadModel.from_hf_state(half, case["config"])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    imported = []
    for node in ast.walk(ast.parse(inspect.getsource(txl))):
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append(node.module or "")
    assert not any(m.startswith("transformers") for m in imported), imported
