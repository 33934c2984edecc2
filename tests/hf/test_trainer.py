"""A few transformers.Trainer steps, patched vs unpatched: the same per-step losses and final weights.

Gradient accumulation makes Trainer pass `num_items_in_batch` (the fused loss must sum and divide like
transformers' loss); the packed run uses transformers' DataCollatorWithFlattening (position_ids restart per
document, no attention mask: the "ptm" mask function turns that into segments).
"""

import copy
import tempfile

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="ptm_kernels.hf needs transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")

import ptm_kernels.hf as hf  # noqa: E402

from tests.hf import test_bart, test_gpt2, test_llama  # noqa: E402
from tests.hf._common import VOCAB  # noqa: E402

STEPS = 4


def documents(n=16):
    """Variable-length 'count up' documents: learnable, and padded or packed differently per batch."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 13, (1,), generator=gen))
        start = int(torch.randint(0, VOCAB, (1,), generator=gen))
        ids = ((start + torch.arange(length)) % VOCAB).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def pad_right(features):
    L = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(features):
        ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, :len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train(model, collator):
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=STEPS, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=documents(), data_collator=collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    return torch.tensor(losses, dtype=torch.float64), model


# padded rows (gpt2; bart: seq2seq, decoder inputs shifted from the labels) and packed documents (llama) each
# once: a Trainer run is seconds on 2 cores
@pytest.mark.parametrize("kind,collate", [("llama", "packed"), ("gpt2", "padded"), ("bart", "padded")])
def test_trainer_steps_match(kind, collate):
    model = {"llama": test_llama.build, "gpt2": lambda: test_gpt2.build("gpt2"), "bart": test_bart.build}[kind]()
    collator = pad_right if collate == "padded" else transformers.DataCollatorWithFlattening()
    if collate == "packed":  # with a KV cache (use_cache) transformers does not look for packed documents
        model.config.use_cache = False
    initial = copy.deepcopy(model)
    patched = hf.apply(copy.deepcopy(model))
    want, model = train(model, collator)
    got, patched = train(patched, collator)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    # weights: Adam divides each update by sqrt(v), so an entry whose gradient is ~0 moves by ~lr in a
    # direction that float32 rounding of that gradient decides; single entries can differ by a step. The
    # update of each tensor as a whole must agree to 0.1%. Not compared: a key-projection bias (BART) adds the
    # same amount to every score of a row, which softmax ignores, so its gradient is 0 up to rounding and
    # Adam moves it (by ~1e-6) in directions only rounding decides.
    for (name, p), q, p0 in zip(model.named_parameters(), patched.parameters(), initial.parameters()):
        if name.endswith("k_proj.bias"):
            continue
        update = (p - p0).norm()
        assert update > 0, f"{name} did not train"
        assert (q - p).norm() <= 1e-3 * update, f"{name}: updates differ by {(q - p).norm() / update:.2e}"
