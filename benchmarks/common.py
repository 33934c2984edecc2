"""Shared benchmark machinery: device, shapes, timing with proper synchronisation, result records.

Every benchmark test times one implementation of one case. Records carry (group, case, impl, pass) so
benchmarks/report.py can turn medians into ratios against the baseline measured in the same run.
"""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
DTYPES = [torch.bfloat16] if GPU else [torch.float32, torch.bfloat16]

# (name, tokens, hidden): BERT-base, GPT-2 small, LLaMA-7B; fewer tokens on a 2-core CPU.
ROW_CASES = (
    [("bert-base", 8 * 512, 768), ("gpt2", 8 * 1024, 768), ("llama-7b", 8 * 2048, 4096)]
    if GPU else
    [("bert-base", 8 * 512, 768), ("gpt2", 4 * 1024, 768), ("llama-7b", 1024, 4096)]
)


def sync():
    if GPU:
        torch.cuda.synchronize()


def _inner_iterations(fn) -> int:
    """Repeat fast GPU calls inside one timed round so launch/sync overhead does not dominate."""
    if not GPU:
        return 1
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end)
    return max(1, min(200, int(2.0 / max(ms, 1e-3))))


def measure(benchmark, fn, *, group: str, case: str, impl: str, passes: str, bytes_moved: int = 0,
            flops: float = 0.0, rounds: int = None, peak_memory: bool = False):
    """Time fn() with pytest-benchmark and record what report.py needs; with peak_memory, also the peak memory
    one call of fn adds on top of what is already allocated (peak_mem_mb, see peak_memory_growth_mb)."""
    fn()  # warm-up (and compilation for torch.compile / Triton)
    sync()
    inner = _inner_iterations(fn)

    def timed():
        for _ in range(inner):
            fn()
        sync()

    if rounds is None:
        rounds = 30 if GPU else 8
    benchmark.extra_info.update(dict(group=group, case=case, impl=impl, passes=passes, inner=inner,
                                     bytes=bytes_moved, flops=flops, device=str(DEVICE)))
    benchmark.group = f"{group} {case} {passes}"
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    if peak_memory:  # after the timing: a profiled call leaves later calls a few percent slower on a CPU
        benchmark.extra_info["peak_mem_mb"] = round(peak_memory_growth_mb(fn), 1)


def fwd_bwd(fn, inputs, grads):
    """A callable running fn forward then backward with the given output gradients."""
    def run():
        for t in inputs:
            t.grad = None
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, grads[: len(outs)])
    return run


def check_close(ours, theirs, name, rtol=2e-2, atol=2e-2):
    """Validate before timing: a fast wrong kernel is not a result."""
    ours = ours if isinstance(ours, tuple) else (ours,)
    theirs = theirs if isinstance(theirs, tuple) else (theirs,)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def liger():
    """Liger-Kernel's ops when its wheel is installed and a GPU is present, else None."""
    if not GPU:
        return None
    try:
        import liger_kernel.ops as ops  # noqa: F401
        from liger_kernel.transformers import functional

        return functional
    except Exception:
        return None


# ------------------------------------------------------------------------------------------ model benchmarks


def twin_models(hf_class, make_config, ours, impl: str, perturbed=("norm",)):
    """The model of `impl` and a transformers-eager reference on the same weights (the validation reference),
    both on DEVICE. impl "ptm..." is `ours.from_hf(reference)`; "eager" / "sdpa" another `hf_class` with that
    attention implementation. Norm weights start at 1 and biases at 0: the reference's parameters whose names
    contain one of `perturbed` are moved a little, so that a wrong weight mapping shows."""
    torch.manual_seed(0)
    reference = hf_class(make_config())
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if any(part in n for part in perturbed):
                p.add_(0.1 * torch.randn_like(p))
    if impl.startswith("ptm"):
        model = ours.from_hf(reference)
    else:
        model = hf_class(make_config())
        model.load_state_dict(reference.state_dict())
        model.set_attn_implementation(impl)
    return model.to(DEVICE), reference.to(DEVICE)


def random_ids(B: int, L: int, low: int, high: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (B, L), generator=g).to(DEVICE)


def train_step(params, loss):
    """One training step as the model benchmarks time it: loss().backward(), then an AdamW step."""
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
    return step


def peak_memory_growth_mb(fn) -> float:
    """The peak of the memory allocated during one call of fn, above what was allocated before it, in MiB.

    GPU: the caching allocator's peak. CPU: torch's CPU allocator has no peak counter, and the resident set
    is no substitute (glibc keeps freed blocks mapped), so the call runs once more under the profiler with
    memory events, which carry the allocator's running total: the peak is the highest total minus the total
    before the call. Parameters, their gradients and optimizer state allocated before the call do not count;
    what the call creates does (activations, logits, temporaries inside the kernels)."""
    if GPU:
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []  # (time, bytes allocated (+) or freed (-), allocator's total after it)
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation:
            fields = event.typed[1]
            allocations.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
    if not allocations:
        return 0.0
    allocations.sort(key=lambda a: a[0])
    before = allocations[0][2] - allocations[0][1]
    return (max(total for _, _, total in allocations) - before) / 2**20


def record_tokens_per_s(benchmark, tokens: int):
    """After measure: `tokens` per median time of one call, in extra_info (tokens_per_s); nothing when timing
    is off (--benchmark-disable: no statistics)."""
    if benchmark.stats is None:
        return
    median = benchmark.stats.stats.median / benchmark.extra_info["inner"]
    benchmark.extra_info["tokens_per_s"] = round(tokens / median, 1)
