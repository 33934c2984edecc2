"""Every Triton kernel compiles for sm_90 (H100 / H200) as the launchers would launch it on that GPU.

The CPU tests run the kernels under the Triton interpreter, which misses what fails only when Triton compiles
for a GPU (device code reading a plain Python global, an op or layout the NVIDIA backend rejects, ptxas
errors, shared memory beyond the device's limit). Triton compiles for an NVIDIA target without a GPU (ptxas
ships in the triton wheel), so this runs anywhere triton has its NVIDIA backend.

How: tests/compile/triton_sm90.py, in a subprocess per kernel family with TRITON_INTERPRET unset (Triton reads
it when a kernel is defined; tests/conftest.py sets it for this process), runs the real launchers on small
CPU tensors with their device helpers answering as an H100 (capability 9.0, 132 SMs, not interpreted). Each
kernel launch is intercepted, bound exactly as Triton's launcher binds it (signature, constexprs,
specialisation, num_warps / num_stages) and compiled for GPUTarget("cuda", 90, 32); a kernel needing more
shared memory than an H100 block may have (232448 bytes) raises OutOfResources, as loading it on the GPU
would, so launchers with a fallback (attention's config lists, relative attention's stages / band -> gather
ladder) step down as on the GPU. A case fails if a kernel does not compile, or no launch option fits.
Attention's config tables are tuned for sm_90, so there its first option must fit; relative attention's
documented ladder may step down (the rung it settles on is printed).

Covered (float32, float16, bfloat16 unless said):
- norms: RMSNorm / LayerNorm forward and backward, C = 1000 (one pass), 8192 (one pass, 16 warps),
  20000 (two-pass loop); every residual / weight / bias(round_normed) combination for bfloat16 (with a
  float32 weight when bias is set) and at C = 1000, none / all for the rest.
- activations: act_fwd / act_bwd for gelu, gelu_tanh, silu, with and without bias, tiles [2, 1024] and
  [128, 16]; glu_fwd / glu_bwd for each activation.
- rope: head dims 64 and 128, both layouts; inverse and partial rotary (pass-through) for bfloat16.
- losses: cross_entropy_fwd (with and without label smoothing / z-loss) and cross_entropy_bwd (in place or
  not), V = 1000 (one block) and 32000 (the loop over V).
- attention, head dims 64 and 128: forward and backward (preprocess, dK/dV, dQ) without mask (not float16),
  causal, and causal + window + key lengths + prefix + segments + dense mask + bias + Toeplitz + dropout +
  block map with bias / Toeplitz gradients; decoding (one query: split-K forward + combine); dropout mask.
- relative attention, head dims 64 and 128: forward and backward of the band path (causal; segments + key
  lengths + visibility segments + dense mask + dropout), the gather path (positions, causal + key lengths +
  prefix), and two streams (band | gather, segments + dense mask + dropout).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from . import sm90_records

HELPER = Path(__file__).with_name("triton_sm90.py")
FAMILIES = ["attention-bf16", "relative_attention-fp32", "relative_attention-bf16", "attention-fp32",
            "attention-fp16", "relative_attention-fp16", "norms", "activations", "rope", "losses"]  # longest first


def _nvidia_backend_reason():
    """None when Triton can compile for NVIDIA here, else why not."""
    try:
        import triton
        from triton.backends import backends
    except Exception as e:  # pragma: no cover - triton is a dependency of the Triton backend
        return f"triton not importable: {e}"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no NVIDIA backend (backends: {sorted(backends)})"
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(os.path.dirname(triton.__file__), "backends",
                                                                 "nvidia", "bin", "ptxas")
    if not os.access(ptxas, os.X_OK):
        return f"ptxas not found at {ptxas} (set TRITON_PTXAS_PATH)"
    return None


SKIP_REASON = _nvidia_backend_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]


def _run_family(family: str, cache_dir: str) -> dict:
    # shared with test_sm90_properties.py: each family is compiled once per pytest process
    return sm90_records.run_family(family, cache_dir)


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory):
    """Compile the selected families (-k), one subprocess per CPU at a time (each compile is single-threaded)."""
    selected = {item.callspec.params["family"] for item in request.session.items
                if item.module is sys.modules[__name__] and hasattr(item, "callspec")}
    families = [f for f in FAMILIES if f in selected] or FAMILIES
    cache = tmp_path_factory.mktemp("triton_cache")
    workers = max(1, min(len(families), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        futures = {f: pool.submit(_run_family, f, str(cache / f)) for f in families}
        return {f: fut.result() for f, fut in futures.items()}


def _fmt(rec: dict) -> str:
    cfg = {k: v for k, v in (rec.get("config") or {}).items() if v not in (False, None)}
    shared = f" shared={rec['shared']}" if rec.get("shared") is not None else ""
    return f"{rec['kernel']} {cfg}{shared}"


@pytest.mark.parametrize("family", FAMILIES)
def test_compiles_for_sm90(compiled, family):
    res = compiled[family]
    recs = res["records"]
    cases = [r for r in recs if "case" in r and "kernel" not in r]
    kernels = [r for r in recs if "kernel" in r]
    if res["rc"] != 0 or not cases:
        pytest.fail(f"{HELPER.name} {family} exited with {res['rc']} after {len(cases)} cases:\n"
                    f"{res['stderr'][-6000:]}", pytrace=False)
    failures, seen = [], set()
    for c in cases:
        if c["status"] == "ok":
            continue
        detail = []
        for k in kernels:
            if k["case"] == c["case"] and k["status"] != "ok":
                err = k.get("error") or k["status"]
                detail.append(f"  {_fmt(k)}: " + ("(the error above)" if (k["kernel"], err) in seen else err))
                seen.add((k["kernel"], err))
        failures.append(f"{c['case']}: {c['error']}\n" + "\n".join(detail))
    # where the launcher stepped down: print (relative attention's documented ladder) or fail (attention)
    for c in cases:
        mine = [k for k in kernels if k["case"] == c["case"]]
        oor = [k for k in mine if k["status"] == "out_of_resources"]
        if oor and c["status"] == "ok":
            used = [k for k in mine if k["status"] == "ok"]
            note = (f"{c['case']}: stepped down past {len(oor)} option(s) "
                    f"({'; '.join(_fmt(k) for k in oor)}) to {'; '.join(_fmt(k) for k in used)}")
            if family.startswith("attention"):
                failures.append(note + " -- attention's first config is meant to fit an sm_90 block")
            else:
                print(note)
    n_ok = sum(k["status"] == "ok" for k in kernels)
    print(f"{family}: {len(cases)} cases, {len(kernels)} compiles ({n_ok} fit), triton "
          f"{recs[0].get('triton') if recs else '?'}")
    if failures:
        pytest.fail(f"{len(failures)} of {len(cases)} {family} cases fail on sm_90 (triton "
                    f"{recs[0].get('triton')}):\n\n" + "\n\n".join(failures), pytrace=False)
