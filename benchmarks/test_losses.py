"""Benchmarks of the fused losses against what users would otherwise run, measured in the same run:

- cross_entropy: F.cross_entropy eager (on the logits' dtype), torch.compile of it, Liger-Kernel (GPU);
- linear_cross_entropy: hidden @ W.T then F.cross_entropy (eager), with the peak memory of each: the fused
  op never holds the [N, V] logits (nor their float32 copy or gradient);
- mlm_loss: a BERT MLM head as transformers runs it (transform and decoder on every token, loss with
  ignore_index) against ours (gather the labelled rows, then the fused linear cross-entropy).

Each test validates against eager on the same inputs before timing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ptm_kernels as pk

from .common import DEVICE, DTYPES, GPU, check_close, fwd_bwd, liger, measure

IGNORE = -100
# (name, rows, vocabulary): LLaMA-2's 32k vocabulary; fewer rows on a 2-core CPU
CE_CASES = [("llama-32k", 8 * 2048 if GPU else 1024, 32000)]
# (name, rows, hidden, vocabulary) for the fused linear cross-entropy
LINEAR_CASES = [("llama-32k", 8 * 2048 if GPU else 1024, 4096 if GPU else 512, 32000)]
ROUNDS = None if GPU else 3  # a CPU linear cross-entropy step is ~1 s: three rounds


def _labels(N, V, ignored=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignored] = IGNORE
    return y.to(DEVICE)


def _eager_ce(logits, labels):
    return F.cross_entropy(logits, labels, ignore_index=IGNORE)


def _liger_ce(logits, labels):
    return liger().liger_cross_entropy(logits, labels, ignore_index=IGNORE)


_compiled = {}


def _ce_fn(impl):
    if impl == "ptm":
        return lambda x, y: pk.cross_entropy(x, y, ignore_index=IGNORE)
    if impl == "eager":
        return _eager_ce
    if impl == "liger":
        return _liger_ce
    if "ce" not in _compiled:
        _compiled["ce"] = torch.compile(_eager_ce, dynamic=False)
    return _compiled["ce"]


def _ce_impls(dtype):
    impls = ["ptm", "eager"]
    if GPU or dtype == torch.float32:  # torch.compile costs ~10 s per graph on a 2-core CPU
        impls.append("compiled")
    if liger() is not None:
        impls.append("liger")
    return impls


@pytest.mark.parametrize("case,N,V", CE_CASES, ids=[c[0] for c in CE_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("impl", ["ptm", "eager", "compiled", "liger"])
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
def test_cross_entropy(benchmark, case, N, V, dtype, impl, passes):
    if impl not in _ce_impls(dtype):
        pytest.skip(f"{impl} is not measured for {dtype} on {DEVICE.type} (torch.compile: one dtype on CPU; "
                    f"Liger: GPU with liger-kernel installed)")
    logits = torch.randn(N, V, device=DEVICE, dtype=dtype).requires_grad_(True)
    labels = _labels(N, V)
    fn = _ce_fn(impl)
    check_close(fn(logits, labels), F.cross_entropy(logits.float(), labels, ignore_index=IGNORE),
                f"cross_entropy {impl}")
    elt = torch.finfo(dtype).bits // 8
    name = f"{case} {str(dtype)[6:]}"
    if passes == "fwd":
        with torch.no_grad():
            measure(benchmark, lambda: fn(logits, labels), group="cross_entropy", case=name, impl=impl,
                    passes=passes, bytes_moved=N * V * elt)
    else:
        measure(benchmark, fwd_bwd(lambda: fn(logits, labels), [logits], [torch.ones((), device=DEVICE)]),
                group="cross_entropy", case=name, impl=impl, passes=passes)


def _eager_linear_ce(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y, ignore_index=IGNORE)


@pytest.mark.parametrize("case,N,D,V", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("impl", ["ptm", "eager", "liger"])
def test_linear_cross_entropy(benchmark, case, N, D, V, dtype, impl):
    """Forward and backward of the LM head's loss, with the peak memory growth of the timed call."""
    if impl == "liger" and liger() is None:
        pytest.skip("Liger-Kernel is measured on GPU only, when liger-kernel is installed")
    h = torch.randn(N, D, device=DEVICE, dtype=dtype).requires_grad_(True)
    w = (torch.randn(V, D, device=DEVICE, dtype=dtype) / D ** 0.5).requires_grad_(True)
    y = _labels(N, V)
    fn = {"ptm": lambda: pk.linear_cross_entropy(h, w, y, ignore_index=IGNORE),
          "eager": lambda: _eager_linear_ce(h, w, y),
          "liger": lambda: liger().liger_fused_linear_cross_entropy(h, w, y, ignore_index=IGNORE)}[impl]
    check_close(fn(), _eager_linear_ce(h, w, y), f"linear_cross_entropy {impl}")
    run = fwd_bwd(fn, [h, w], [torch.ones((), device=DEVICE)])
    run()  # the first call allocates the gradients: the peak below is what one step adds on top of them
    measure(benchmark, run, group="linear_cross_entropy", case=f"{case} D{D} {str(dtype)[6:]}", impl=impl,
            passes="fwd+bwd", rounds=ROUNDS, flops=3 * 2.0 * N * D * V, peak_memory=True)


# ------------------------------------------------------------------------------------------------ mlm_loss
# BERT-base's MLM head on a batch of 8 x 128 tokens, 15% of them labelled.
MLM_B, MLM_L, MLM_D, MLM_V = 8, 128, 768, 30522


class _BertHeadTransform(torch.nn.Module):
    """transformers' BertPredictionHeadTransform: dense, GELU, LayerNorm."""

    def __init__(self, d):
        super().__init__()
        self.dense = torch.nn.Linear(d, d)
        self.norm = torch.nn.LayerNorm(d, eps=1e-12)

    def forward(self, x):
        return self.norm(F.gelu(self.dense(x)))


@pytest.mark.parametrize("impl", ["ptm", "eager"])
def test_mlm_loss(benchmark, impl):
    torch.manual_seed(0)
    transform = _BertHeadTransform(MLM_D).to(DEVICE)
    w = (torch.randn(MLM_V, MLM_D, device=DEVICE) * 0.02).requires_grad_(True)
    b = torch.zeros(MLM_V, device=DEVICE, requires_grad=True)
    hidden = torch.randn(MLM_B, MLM_L, MLM_D, device=DEVICE, requires_grad=True)
    labels = _labels(MLM_B * MLM_L, MLM_V, ignored=0.85, seed=1).view(MLM_B, MLM_L)

    def eager():  # as transformers' BertForMaskedLM: the head on every token
        logits = F.linear(transform(hidden), w, b)
        return F.cross_entropy(logits.view(-1, MLM_V), labels.view(-1), ignore_index=IGNORE)

    fn = {"ptm": lambda: pk.mlm_loss(hidden, labels, transform, w, b, ignore_index=IGNORE), "eager": eager}[impl]
    check_close(fn(), eager(), f"mlm_loss {impl}")
    params = [hidden, w, b, *transform.parameters()]
    measure(benchmark, fwd_bwd(fn, params, [torch.ones((), device=DEVICE)]), group="mlm_loss",
            case=f"bert-base {MLM_B}x{MLM_L} 15%", impl=impl, passes="fwd+bwd", rounds=ROUNDS)
