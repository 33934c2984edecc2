"""sm90_liveness (live registers per SASS instruction, the tool behind the spill analysis in sm90-static.md) on a
kernel at the register limit: the relative dq kernel at D = 128 with every mask + dropout (255 registers, spills)."""

from __future__ import annotations

import pytest

from . import sm90_liveness as L
from . import sm90_records as R
from .test_triton_compile import SKIP_REASON

CASE = "relative_attention_bwd bf16 D=128 band seg+klen+vseg+dense dropout"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]
needs_nvcc = pytest.mark.skipif(R.find_nvcc() is None, reason="nvcc not found (not on PATH, nor $CUDA_HOME/bin/nvcc)")


@pytest.fixture(scope="module")
def dq_kernel(tmp_path_factory):
    """(harness record, PTX path) of the case's dq kernel, compiled for sm_90 with its artefacts dumped."""
    dump = tmp_path_factory.mktemp("sm90_dump")
    res = R.run_harness(["relative_attention-bf16", CASE.split(" ", 1)[1]], str(tmp_path_factory.mktemp("cache")),
                        PTM_SM90_DUMP=str(dump))
    dq = [r for r in R.launched(res["records"]) if r["case"] == CASE and r["kernel"] == "_rel_bwd_dq_kernel"]
    ptx = sorted(dump.glob("*_rel_bwd_dq_kernel_*.ptx"))
    assert dq and ptx, f"no dq compile of {CASE!r} dumped (harness exit {res['rc']}):\n{res['stderr'][-2000:]}"
    return dq[-1], ptx[-1]


@needs_nvcc
def test_life_ranges_of_a_kernel_at_the_register_limit(dq_kernel):
    record, ptx = dq_kernel
    assert record["regs"] == 255, "the case no longer reaches the register limit: pick one that does"
    instrs, labels, branches = L.parse(L.life_ranges(ptx))
    assert len(instrs) > 1000, f"{len(instrs)} instructions read"
    # the 64-key span loop and the 16-key step loop inside it, each with most of the registers live at its head
    heads = L.loops(instrs, labels, branches)
    assert sum(n > 150 for _, _, n in heads) >= 2, heads
    peak = max(instrs, key=lambda x: x.live)
    # a kernel that spills at 255 registers keeps nearly all of them live at its peak; none past the 254 read
    assert 230 <= peak.live <= 254, peak
    groups = L.live_at(instrs, peak.addr)
    assert sum(len(regs) for regs in groups.values()) == peak.live
    assert (0, "?") not in groups, "a live register without a writer before it"
