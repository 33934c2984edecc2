"""The README is part of the package a user installs: its examples run, its tables render, its links resolve.

Each ```python block of README.md runs as written (in its own namespace; nothing is downloaded: the model
example builds a small transformers model from a config), and the claims in its comments are checked on
the names it leaves behind.
"""

import copy
import re
from pathlib import Path

import pytest
import torch

from ..compare import assert_close

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.DOTALL | re.MULTILINE)


def _run(block: str) -> dict:
    namespace = {"__name__": "readme_example"}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def _block(word: str) -> str:
    found = [b for b in BLOCKS if word in b]
    assert len(found) == 1, f"expected one README python block using {word!r}, found {len(found)}"
    return found[0]


def test_usage_example_runs():
    ns = _run(_block("pk.attention("))
    assert ns["o"].shape == (2, 12, 128, 64) and torch.isfinite(ns["o"]).all()
    assert ns["z"].shape == (2, 128, 2048)


def test_model_example_runs_and_matches_transformers():
    ns = _run(_block("from_hf("))
    hf, model, ids, logits, out = (ns[k] for k in ("hf", "model", "ids", "logits", "out"))
    with torch.no_grad():
        truth = hf(ids).logits
        assert_close(logits, truth, name="Llama.from_hf logits vs transformers")
        greedy = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 24)
    assert torch.equal(out[:, :16], ids)
    # Greedy decoding follows the same argmax as transformers' unless two logits tie within rounding.
    assert torch.equal(out, greedy)


def test_tables_are_not_split():
    # Every run of table lines starts with a header and its separator row: a blank line inside a table makes
    # the rows after it a headerless run that renders as raw pipes.
    lines = README.splitlines()
    runs, current = [], []
    for line in lines + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            runs.append(current)
            current = []
    assert runs
    for run in runs:
        assert len(run) >= 2 and re.fullmatch(r"\|( *:?-+:? *\|)+", run[1].replace(" ", "")), (
            f"table without a header and separator row (split by a blank line?): {run[0][:80]}")


def test_links_stay_in_the_repository():
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if "://" not in t]
    assert "docs/architecture.md" in local
    for target in local:
        path = (ROOT / target).resolve()
        assert ROOT in path.parents and path.exists(), f"README links to {target}, not a file in the repository"
    assert "../" not in README, "README refers to a path outside the repository"


def test_transformers_example_runs_and_matches_the_unpatched_model():
    pytest.importorskip("transformers")
    block = _block("ptm_kernels.hf.apply(model)")
    ns = _run(block)
    model, ids, loss, tokens = (ns[k] for k in ("model", "ids", "loss", "tokens"))
    assert ns["out"].logits is None  # the fused loss path, as the README says
    import transformers

    twin = transformers.LlamaForCausalLM(copy.deepcopy(model.config))
    twin.load_state_dict(model.state_dict())
    twin.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert_close(loss.detach(), twin(input_ids=ids, labels=ids).loss, name="patched loss vs unpatched")
        assert torch.equal(tokens, twin.generate(ids, max_new_tokens=8, do_sample=False))
    assert not __import__("ptm_kernels.hf").hf.is_applied(model)  # revert ran
