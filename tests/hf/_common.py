"""Shared by the tests/hf files: small batches, one forward/backward that returns what is compared, and the
comparisons every patched-vs-unpatched test makes."""

import copy

import torch

VOCAB = 128


def perturb(model, select, scale=0.1):
    """Move the parameters whose name `select` accepts by scale * N(0, 1): norms start at 1 / 0 and biases at 0,
    where a wrong weight mapping would not show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if select(name):
                p.add_(scale * torch.randn_like(p))
    return model


def batch(B=3, L=12):
    """Right padding in row 1 (training collators pad right); padded positions carry no label."""
    ids = torch.randint(0, VOCAB, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def left_padded_prompts(B=3, L=7):
    ids = torch.randint(1, VOCAB, (B, L))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids, mask


def seq2seq_batch(B=3, Ls=16, Lt=10, pad_token_id=0, first_id=3, padded_from=(12, 5)):
    """Source right-padded with pad_token_id in rows 1 and 2 from the columns padded_from on (none past Ls);
    target labels ignored (-100) at the end of row 2; ids from first_id up (clear of the special tokens)."""
    ids = torch.randint(first_id, VOCAB, (B, Ls))
    mask = torch.ones(B, Ls, dtype=torch.long)
    mask[1, padded_from[0]:] = 0
    mask[2, padded_from[1]:] = 0
    labels = torch.randint(first_id, VOCAB, (B, Lt))
    labels[2, Lt - 3:] = -100
    return dict(input_ids=ids.masked_fill(mask == 0, pad_token_id), attention_mask=mask, labels=labels)


def forward_backward(model, inputs, logits_inputs=None):
    """(logits of a call without labels (`logits_inputs`, default input_ids and attention_mask), loss with
    labels, {name: grad} of the parameters that get one, the logits of the call with labels (the patched MLM /
    seq2seq / causal-LM losses return None there))."""
    model.zero_grad()
    if logits_inputs is None:
        logits_inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    logits = model(**logits_inputs).logits
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), out.loss.detach(), grads, out.logits


def seq2seq_no_labels(inputs):
    """The call without labels of a seq2seq batch: the labels as decoder inputs, the decoder mask padded at the
    end of row 0."""
    decoder_mask = torch.ones_like(inputs["labels"])
    decoder_mask[0, -2:] = 0
    return dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                decoder_input_ids=inputs["labels"].clamp(min=0), decoder_attention_mask=decoder_mask)


def seq2seq_forward_backward(model, inputs):
    """forward_backward of an encoder-decoder, its call without labels seq2seq_no_labels(inputs)."""
    return forward_backward(model, inputs, seq2seq_no_labels(inputs))


def unpatched_then_patched(model, run):
    """(run(model), run(model) after hf.apply(model)): what the unpatched and the patched model give."""
    import ptm_kernels.hf as hf

    want = run(model)
    hf.apply(model)
    return want, run(model)


def greedy_left_padded(model, max_new_tokens):
    """Greedy generate of a causal LM (eval mode) on left_padded_prompts(), unpatched then patched:
    (prompt ids, unpatched tokens, patched tokens)."""
    ids, mask = left_padded_prompts()
    want, got = unpatched_then_patched(model.eval(), lambda m: m.generate(
        ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0))
    return ids, want, got


def float64_bf16_patched(model, run):
    """run(m) for the float64 model (the truth; `model` itself, converted), an unpatched bf16 copy and a patched
    bf16 copy: the three results assert_bf16_within_twice_torch compares."""
    import ptm_kernels.hf as hf

    truth = model.double()
    base = copy.deepcopy(truth).to(torch.bfloat16)
    patched = hf.apply(copy.deepcopy(truth).to(torch.bfloat16))
    return [run(m) for m in (truth, base, patched)]


def assert_same_convergence(model, batches):
    """Liger-style: the model trained with AdamW on `batches`, unpatched and patched (a copy): per-step losses
    within 1e-5 relative in float32, and the losses fall."""
    import ptm_kernels.hf as hf

    patched = hf.apply(copy.deepcopy(model))
    losses = [train_losses(m, batches) for m in (model, patched)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    assert losses[0][-5:].mean() < losses[0][:5].mean(), "the mini model should learn something"


def real_rows(logits, inputs):
    """Logits of the real tokens: padded query rows see no key and are padding in every implementation
    (ours gives zeros like torch's SDPA, transformers' eager an average of masked keys)."""
    return logits[inputs["attention_mask"].bool()]


def train_losses(model, batches, lr=1e-3):
    """Per-step losses of AdamW on `batches` (dicts of model inputs with labels), as float64."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for inputs in batches:
        opt.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def assert_bf16_within_twice_torch(outputs, rows=lambda x: x):
    """outputs = (float64 model's, unpatched bf16 model's, patched bf16 model's) results of a forward_backward:
    the patched error against float64 within 2x the unpatched one's (+ a rounding unit), tests/compare.py."""
    from tests.compare import assert_close

    t, b, p = outputs
    assert_close(rows(p[0]), rows(t[0]), rows(b[0]), name="logits")
    assert_close(p[1], t[1], b[1], name="loss", precision=torch.bfloat16)
    for name, g in t[2].items():
        assert_close(p[2][name], g, b[2][name], name=f"grad {name}")


def assert_same_results(got, want, logits=True, rows=lambda x: x, what=""):
    """got / want: forward_backward results (logits, loss, {name: grad}, ...) of the patched and the unpatched
    model: within tests/compare.py's float32 tolerance, and the same parameters got a gradient. rows: the
    logits compared (e.g. real_rows: padded query rows differ by design); what: added to the failure names."""
    from tests.compare import assert_close

    if logits:
        assert_close(rows(got[0]), rows(want[0]), name=f"logits{what}")
    assert_close(got[1], want[1], name=f"loss{what}")
    assert set(got[2]) == set(want[2])
    for name, g in want[2].items():
        assert_close(got[2][name], g, name=f"grad {name}{what}")


def assert_causal_lm_patched_equal(model):
    """A causal LM on `batch()`: the patched model's logits (real rows), loss and gradients = the unpatched's."""
    inputs = batch()
    want, got = unpatched_then_patched(model, lambda m: forward_backward(m, inputs))
    assert_same_results(got, want, rows=lambda logits: real_rows(logits, inputs))


def assert_causal_lm_bf16_within_twice_torch(model):
    """A causal LM on `batch()`: bf16 errors against float64 within 2x the unpatched bf16 model's (real rows)."""
    inputs = batch()
    assert_bf16_within_twice_torch(float64_bf16_patched(model, lambda m: forward_backward(m, inputs)),
                                   rows=lambda logits: real_rows(logits, inputs))


def assert_revert_bit_identical(model, run):
    """apply, run, revert: `run(model)` (a forward_backward) gives bit-identical logits, loss and gradients
    before and after, and the attention implementation is the one the model had."""
    import ptm_kernels.hf as hf

    impl = model.config._attn_implementation
    before = run(model)
    hf.apply(model)
    run(model)
    hf.revert(model)
    assert model.config._attn_implementation == impl
    after = run(model)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    for name, g in before[2].items():
        assert torch.equal(after[2][name], g), name
