"""Reformer against transformers on the same weights: the LM's logits (eval), every gradient (train mode, dropout
0: transformers' reversible backward against our autograd), the encoder's hidden states with padding, learned
positions, and the to_hf round trip. Config fields one by one: test_from_hf_fields.py (ReformerConfig).

Tiny configs: head dim 16 (the fused op's smallest; the model runs smaller ones in plain torch), local chunks of
4 and LSH chunks of 8, so that sequences of 32 hold several chunks and hashing rounds."""

import pytest
import torch

from ._import import model_module

transformers = pytest.importorskip("transformers")
reformer = model_module("reformer")
hf_tensors = model_module("convert").hf_tensors

TOL = 1e-4  # float32 on both sides, logits O(5): ~1e-6 relative
BASE = dict(vocab_size=50, hidden_size=32, num_attention_heads=2, attention_head_size=16,
            attn_layers=["local", "lsh", "local", "lsh"], axial_pos_shape=[4, 8], axial_pos_embds_dim=[8, 24],
            max_position_embeddings=32, feed_forward_size=48, local_attn_chunk_length=4, lsh_attn_chunk_length=8,
            num_buckets=4, num_hashes=2, hash_seed=7, is_decoder=True, hidden_dropout_prob=0.0,
            local_attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0)

CASES = {
    "two rounds": {},
    "one round": dict(num_hashes=1),
    "three rounds, bucket factors": dict(num_hashes=3, num_buckets=[2, 4]),
    "lsh only, own chunk": dict(attn_layers=["lsh", "lsh"], lsh_num_chunks_before=0),
    "local only, two chunks back": dict(attn_layers=["local", "local"], local_num_chunks_before=2),
    "learned positions": dict(axial_pos_embds=False, hidden_act="gelu"),
}


def _pair(cls: str, seed: int, **change):
    """A transformers model with random weights (std 0.5: attention far from uniform) and ours from it."""
    torch.manual_seed(seed)
    hf = getattr(transformers, cls)(transformers.ReformerConfig(**{**BASE, **change}))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5)
    ours = getattr(reformer, cls).from_hf(hf)
    return hf, ours


def _batch(L: int, seed: int, padded: bool):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (2, L), generator=g)
    mask = torch.ones(2, L, dtype=torch.long)
    if padded:
        mask[1, L - 7:] = 0
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("L,padded", [(32, False), (32, True), (27, False), (6, False)],
                         ids=["32", "32 padded", "27 (padded to 32 inside)", "6 (one chunk)"])
def test_lm_logits_match_transformers(seed, case, L, padded):
    hf, ours = _pair("ReformerModelWithLMHead", seed, **CASES[case])
    ids, mask = _batch(L, seed, padded)
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids, attention_mask=mask).logits
        mine = ours.eval()(ids, mask).logits
    real = mask.bool()
    diff = (mine - theirs).abs()[real].max().item()
    assert diff < TOL, f"{case}: logits differ by {diff}"


@pytest.mark.parametrize("case", ["two rounds", "one round", "learned positions"])
def test_gradients_match_transformers(seed, case):
    """Train mode, dropout 0: the next-token loss and every parameter's gradient. Two rounds combine through the
    log-sum-exp in plain torch (it needs a gradient); one round runs the fused op's backward."""
    hf, ours = _pair("ReformerModelWithLMHead", seed, **CASES[case])
    ids, _ = _batch(32, seed, False)
    hf.train()(input_ids=ids, labels=ids).loss.backward()
    loss = ours.train()(ids, labels=ids).loss
    loss.backward()
    theirs = hf_tensors(hf, ours.hf_mapping(), "grad")
    for name, p in ours.named_parameters():
        g = theirs[name]
        scale = g.abs().max().item() + 1e-6
        diff = (p.grad - g).abs().max().item()
        assert diff < 1e-4 * max(1.0, scale), f"{case}: gradient of {name} differs by {diff} (largest {scale})"


@pytest.mark.parametrize("padded", [False, True])
def test_encoder_hidden_states_match_transformers(seed, padded):
    """ReformerModel, not a decoder: chunks see their neighbours both ways (rolled around the ends)."""
    hf, ours = _pair("ReformerModel", seed, is_decoder=False, lsh_num_chunks_after=1, local_num_chunks_after=1)
    ids, mask = _batch(32, seed, padded)
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        mine = ours.eval()(ids, mask).last_hidden_state
    diff = (mine - theirs).abs()[mask.bool()].max().item()
    assert diff < TOL, f"hidden states differ by {diff}"


def test_to_hf_round_trip(seed):
    hf, ours = _pair("ReformerModelWithLMHead", seed)
    back = ours.to_hf().eval()
    ids, mask = _batch(32, seed, True)
    with torch.no_grad():
        a, b = hf.eval()(input_ids=ids, attention_mask=mask).logits, back(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs()[mask.bool()].max().item() < TOL


def test_training_length_is_checked():
    _, ours = _pair("ReformerModelWithLMHead", 0)
    ids, _ = _batch(24, 0, False)  # a multiple of the chunks' 8, not axial_pos_shape's 4 * 8 = 32
    with pytest.raises(ValueError, match=r"axial_pos_shape's product 4 \* 8 = 32"):
        ours.train()(ids)
    with pytest.raises(ValueError, match=r"multiple of 8 \(the least common multiple of the chunk lengths"):
        ours.train()(_batch(27, 0, False)[0])


def test_positions_past_the_axial_grid_are_refused():
    _, ours = _pair("ReformerModelWithLMHead", 0)
    ids, _ = _batch(8, 0, False)
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 32\)"):
        ours.eval()(ids, position_ids=torch.arange(30, 38).expand(2, -1))


def test_unsupported_attention_kind_is_refused():
    with pytest.raises(NotImplementedError, match="attn_layers"):
        reformer.ReformerConfig(attn_layers=("lsh", "full"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["one round", "two rounds"])
def test_half_precision_within_transformers_error(dtype, case):
    """from_hf keeps the dtype; the logits are within twice transformers' own error in that dtype (against its
    float32 logits) plus a rounding unit. Fixed seeds: a position whose rotated vectors nearly tie can hash to
    another bucket in half precision, on either side, and moves its whole chunk; that is the model, not an error,
    but it would make the bound flaky on random draws."""
    from tests.compare import assert_close

    hf, _ = _pair("ReformerModelWithLMHead", 0, **CASES[case])
    ids, mask = _batch(32, 0, True)
    with torch.no_grad():
        truth = hf.eval()(input_ids=ids, attention_mask=mask).logits
        half = hf.to(dtype)
        ours = reformer.ReformerModelWithLMHead.from_hf(half).eval()
        assert {p.dtype for p in ours.parameters()} == {dtype}
        mine, theirs = ours(ids, mask).logits, half(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert mine.dtype == dtype
    assert_close(mine[real], truth[real], theirs[real], name=f"{case} {dtype} logits")


def test_checkpointed_layers_give_the_same_gradients(seed):
    """checkpoint_layers recomputes each layer in the backward with the random state restored: with dropout on
    and hash_seed None (fresh LSH rotations each call), the loss and every gradient equal the plain run's."""
    _, ours = _pair("ReformerModelWithLMHead", seed, hash_seed=None, hidden_dropout_prob=0.1,
                    local_attention_probs_dropout_prob=0.1, lsh_attention_probs_dropout_prob=0.1)
    ids, _ = _batch(32, seed, False)
    grads = []
    for recompute in (False, True):
        ours.checkpoint_layers = recompute
        ours.zero_grad()
        torch.manual_seed(seed)
        loss = ours.train()(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}))
    (plain_loss, plain), (loss, recomputed) = grads
    assert torch.equal(loss, plain_loss)
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("shape", [(2, 0), (0, 32), (0, 5)], ids=["no tokens", "no rows", "no rows, padded"])
def test_empty_inputs_give_empty_logits(shape):
    """transformers raises on these; ours returns empty logits of the right shape."""
    _, ours = _pair("ReformerModelWithLMHead", 0)
    with torch.no_grad():
        logits = ours.eval()(torch.randint(1, 50, shape)).logits
    assert logits.shape == (*shape, 50)
