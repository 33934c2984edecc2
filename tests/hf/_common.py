"""Shared by the tests/hf files: small batches and one forward/backward that returns what is compared."""

import torch

VOCAB = 128


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


def forward_backward(model, inputs):
    """(logits without labels, loss with labels, {name: grad})."""
    model.zero_grad()
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    loss = model(**inputs).loss
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


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


def assert_same_results(got, want, logits=True):
    """got / want: forward_backward results (logits, loss, {name: grad}, ...) of the patched and the unpatched
    model: within tests/compare.py's float32 tolerance, and the same parameters got a gradient."""
    from tests.compare import assert_close

    if logits:
        assert_close(got[0], want[0], name="logits")
    assert_close(got[1], want[1], name="loss")
    assert set(got[2]) == set(want[2])
    for name, g in want[2].items():
        assert_close(got[2][name], g, name=f"grad {name}")


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
