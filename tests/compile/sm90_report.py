"""`make sm90-report`: what ptxas makes of every kernel config the launchers choose on sm_90 (H100 / H200).

    python -m tests.compile.sm90_report [--out benchmarks/results/sm90-static.md] [--families a,b]

Compiles every family of the tests/compile harness (the real launchers, patched to answer as an H100; see
triton_sm90.py) and every csrc/cuda/*.cu kernel, reads the cubins (sm90_artefacts) and writes one markdown
table row per distinct compiled kernel config, beside the Triton tutorial's fused attention compiled the same
way. No GPU is needed and nothing is timed: registers, spills, shared memory and the instruction mix are what
decides whether a kernel can run near the hardware's rate, not proof that it does.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

from . import sm90_artefacts as A
from . import sm90_records as R

FAMILIES = ["attention-bf16", "attention-fp16", "attention-fp32", "relative_attention-bf16",
            "relative_attention-fp16", "relative_attention-fp32", "norms", "activations", "rope", "losses"]
OUT = R.REPO / "benchmarks" / "results" / "sm90-static.md"

# The Triton tutorial's fused attention (python/tutorials/06-fused-attention.py, triton-lang/triton commit
# 003da478d84f5bb0f51b3988cf0ea0bbe60282b7), its kernels compiled once on this kind of machine through the
# same harness (CompilingKernel, GPUTarget("cuda", 90, 32), triton 3.7.1 and its ptxas), fp16 (the only
# 16-bit type its kernels use), Z = 4, H = 32, N_CTX = 1024. The host TensorDescriptor path (_attn_fwd_tma)
# is the one the tutorial takes on Hopper; its autotuner's pick is unknown without a GPU, so several of its
# configs are listed. Its code is not vendored here: only these figures are kept.
# The _attn_fwd_tma loop figures were counted again (same compiles, same other figures) once sm90_artefacts
# stopped counting the out-of-line mbarrier-wait retries of TMA loads as loop bodies (1412 -> 724 at D = 64
# causal, 2099 -> 494 at D = 128 causal 128 x 128: its diagonal stage, one tile, is straight-line code).
# (kernel, config, warps, stages, registers, spill stores, spill loads, shared, MMA, TMA, loop / all SASS)
TUTORIAL_COMMIT = "003da478d84f5bb0f51b3988cf0ea0bbe60282b7"
TUTORIAL = [
    ("_attn_fwd_tma", "D=64 none 128x64", 4, 3, 187, 0, 0, 65592, "wgmma(f16)", "UTMALDG x7", 518, 1368),
    ("_attn_fwd_tma", "D=64 causal 128x64", 4, 3, 208, 0, 0, 66560, "wgmma(f16)", "UTMALDG x13", 1235, 2288),
    ("_attn_fwd_tma", "D=64 none 128x64", 8, 3, 107, 0, 0, 65592, "wgmma(f16)", "UTMALDG x7", 308, 896),
    ("_attn_fwd_tma", "D=64 causal 128x64", 8, 3, 107, 0, 0, 66560, "wgmma(f16)", "UTMALDG x13", 724, 1496),
    ("_attn_fwd (block pointers)", "D=64 causal 128x64", 4, 3, 250, 0, 0, 65536, "wgmma(f16)", "no", 870, 1896),
    ("_attn_fwd (block pointers)", "D=64 causal 128x64", 8, 3, 116, 0, 0, 65536, "wgmma(f16)", "no", 474, 1088),
    ("_attn_bwd", "D=64 causal 32/128/128/32", 4, 5, 255, 56, 56, 74752, "wgmma(f16)", "no", 1090, 2392),
    ("_attn_fwd_tma", "D=128 none 128x64", 8, 3, 138, 0, 0, 131128, "wgmma(f16)", "UTMALDG x7", 339, 1120),
    ("_attn_fwd_tma", "D=128 causal 128x64", 8, 3, 140, 0, 0, 132096, "wgmma(f16)", "UTMALDG x13", 784, 1768),
    ("_attn_fwd_tma", "D=128 none 128x128", 8, 2, 187, 0, 0, 163872, "wgmma(f16)", "UTMALDG x5", 492, 1208),
    ("_attn_fwd_tma", "D=128 causal 128x128", 8, 2, 190, 0, 0, 164864, "wgmma(f16)", "UTMALDG x7", 494, 2056),
    ("_attn_fwd_tma", "D=128 none 128x128", 8, 3, 187, 0, 0, 229432, "wgmma(f16)", "UTMALDG x7", 492, 1272),
    ("_attn_fwd_tma", "D=128 causal 128x128", 8, 3, 190, 0, 0, 230400, "wgmma(f16)", "UTMALDG x11", 494, 2192),
    ("_attn_fwd (block pointers)", "D=128 causal 128x64", 8, 3, 175, 0, 0, 131072, "wgmma(f16)", "no", 540, 1464),
    ("_attn_fwd (block pointers)", "D=128 causal 128x128", 8, 2, 218, 0, 0, 163840, "wgmma(f16)", "no", 884, 1792),
    ("_attn_fwd (block pointers)", "D=128 causal 128x128", 8, 3, 218, 0, 0, 229376, "wgmma(f16)", "no", 884, 1904),
    ("_attn_bwd", "D=128 causal 32/128/128/32", 4, 5, 255, 1944, 1924, 148480, "wgmma(f16)", "no", 2153, 4888),
]

HEADER = ("| kernel | config | warps | stages | block sizes | registers | spill bytes (st/ld) | shared | "
          "occupancy (warps/SM) | MMA | TMA | SASS step / loop / all | cases |")
RULE = "|" + "---|" * (HEADER.count("|") - 1)


def _config(rec: dict) -> str:
    """The launch's constexprs other than block sizes and warps/stages: flags that are on, other values."""
    cfg = rec.get("config") or {}
    parts = [k if v is True else f"{k}={v}" for k, v in cfg.items()
             if not k.startswith(("BLOCK", "num_")) and v not in (False, None)]
    return " ".join(parts) or "-"


def _blocks(rec: dict) -> str:
    cfg = rec.get("config") or {}
    return " ".join(f"{k}={v}" for k, v in cfg.items() if k.startswith("BLOCK") and isinstance(v, int)) or "-"


def _spills(rec: dict) -> str:
    st, ld = rec.get("spill_store_bytes", "?"), rec.get("spill_load_bytes", "?")
    if st == ld == 0:
        return "0"
    inner = rec.get("inner_loop_spill_bytes")
    return f"**{st} / {ld}**" + ("" if inner is None else f" (innermost loop {inner})")


def triton_rows(records: list) -> list:
    """One row per distinct (kernel, constexprs, warps, stages) the launchers compiled and its figures, with its
    cases: one config compiles to different code for different mask parts (None arguments, not in the config
    column), so a case is merged into a row only where its figures are the row's."""
    rows = {}
    figures = ("regs", "spill_store_bytes", "spill_load_bytes", "inner_loop_spill_bytes", "shared", "mma", "tma",
               "inner_loop_instructions", "loop_instructions", "sass_instructions")
    for r in R.launched(records):
        key = (r["kernel"], _config(r), _blocks(r), r["num_warps"], r["num_stages"], *(r.get(f) for f in figures))
        if key in rows:
            rows[key]["cases"].append(r["case"])
            continue
        rows[key] = dict(rec=r, cases=[r["case"]])
    return list(rows.values())


def _row(rec: dict, cases: list) -> str:
    where = cases[0] + (f" (+{len(cases) - 1})" if len(cases) > 1 else "")
    return (f"| {rec['kernel']} | {_config(rec)} | {rec['num_warps']} | {rec['num_stages']} | {_blocks(rec)} | "
            f"{rec.get('regs', '?')} | {_spills(rec)} | {rec['shared']} | "
            f"{A.occupancy_warps(rec.get('regs', 255), rec['shared'], rec['num_warps'])} | {rec.get('mma', '?')} | "
            f"{rec.get('tma', '?')} | {rec.get('inner_loop_instructions', '?')} / "
            f"{rec.get('loop_instructions', '?')} / {rec.get('sass_instructions', '?')} | "
            f"{where} |")


def dropout_pairs(records: list) -> list:
    """(record with dropout, its twin without) for every launched compile that has a twin."""
    twins = {}
    for r in records:
        if r.get("status") == "dropout_twin":
            twins.setdefault((r["case"], r["kernel"]), []).append(r)
    pairs = []
    for r in R.launched(records):
        twin_list = twins.get((r["case"], r["kernel"]))
        if not twin_list:
            continue
        on = {k: v for k, v in r["config"].items() if "DROPOUT" not in k}
        for t in twin_list:
            if {k: v for k, v in t["config"].items() if "DROPOUT" not in k} == on:
                pairs.append((r, t))
                break
    return pairs


def loop_ratio(on: dict, off: dict) -> float:
    """SASS instructions inside loops, dropout on / off (the whole kernel when it has no loop)."""
    a = on["loop_instructions"] or on["sass_instructions"]
    b = off["loop_instructions"] or off["sass_instructions"]
    return a / b


def _beside_tutorial(triton_results: dict) -> list:
    """Our 16-bit causal attention forwards next to the tutorial's TMA forward at the same tile and warps."""
    lines = ["## Attention forward beside the tutorial (causal, same tile and warps)", "",
             "| kernel | dtype | D | tile | warps | stages | registers | spill bytes | shared | occupancy | MMA | "
             "TMA | SASS loop |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    n = len(lines)
    for fam in ("attention-bf16", "attention-fp16"):
        for r in R.launched(triton_results.get(fam, {}).get("records", [])):
            if not (r["case"].startswith("attention_fwd") and r["case"].endswith(" causal")):
                continue
            cfg = r["config"]
            D, tile = cfg.get("BLOCK_D"), f"{cfg.get('BLOCK_M')}x{cfg.get('BLOCK_N')}"
            lines.append(f"| {r['kernel']} | {fam.split('-')[1]} | {D} | {tile} | {r['num_warps']} | "
                         f"{r['num_stages']} | {r['regs']} | {_spills(r)} | {r['shared']} | "
                         f"{A.occupancy_warps(r['regs'], r['shared'], r['num_warps'])} | {r['mma']} | {r['tma']} | "
                         f"{r['loop_instructions']} |")
            for k, c, w, st, regs, s_st, s_ld, sh, mma, tma, loop, _ in TUTORIAL:
                if k == "_attn_fwd_tma" and c == f"D={D} causal {tile}" and w == r["num_warps"]:
                    spill = "0" if s_st == s_ld == 0 else f"**{s_st} / {s_ld}**"
                    lines.append(f"| tutorial {k} | fp16 | {D} | {tile} | {w} | {st} | {regs} | {spill} | {sh} | "
                                 f"{A.occupancy_warps(regs, sh, w)} | {mma} | {tma} | {loop} |")
    return lines + [""] if len(lines) > n else []


def tool_versions() -> str:
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    try:
        ptx_v = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except OSError:
        ptx_v = "?"
    nvcc = R.find_nvcc()
    try:
        nvcc_v = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except (OSError, TypeError):
        nvcc_v = "not found"
    return f"triton {triton.__version__} (ptxas: {ptx_v}); nvcc: {nvcc_v}"


def _commit() -> str:
    """HEAD, and whether the sources compiled differ from it (the report itself aside)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=R.REPO).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD") or "?"
        changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
                   if not line.endswith("benchmarks/results/sm90-static.md")]
    except OSError:
        return "?"
    return head + (" + uncommitted changes" if changed else "")


def render(triton_results: dict, cuda: list) -> str:
    out = ["# sm_90 static report: registers, spills, shared memory, MMA, TMA per compiled kernel", "",
           f"Generated by `make sm90-report` (tests/compile/sm90_report.py) at commit {_commit()}, "
           f"{datetime.date.today().isoformat()}; {tool_versions()}. No GPU: every figure is read from the "
           "sm_90a cubin / PTX / SASS (`cuobjdump -res-usage`, `cuobjdump -sass`). Nothing here is a timing.", "",
           "- **spill bytes**: bytes of the local-memory stores / loads (STL / LDL) in the SASS, what `ptxas -v` "
           "reports as spill stores / loads (checked equal on the CUDA kernels); in brackets the bytes of those "
           "instructions that lie in an innermost loop (a kernel's per-tile step: they run once per step, the "
           "others once per program or per outer-loop trip).",
           "- **occupancy**: resident warps per SM from registers (allocated per warp in units of 256), shared "
           "memory (228 KB per SM, 1 KB reserved per block) and warps (64 per SM, 32 blocks) under sm_90's limits.",
           "- **MMA**: HGMMA in the SASS = wgmma, HMMA = mma.sync, with the operand type (f16 when unsuffixed).",
           "- **TMA**: UTMALDG in the SASS (count); `PTX only` = cp.async.bulk.tensor in the PTX but not the SASS.",
           "- **SASS step / loop / all**: instructions inside the innermost loops (one trip each: an attention "
           "kernel's key or row step) / inside loops (spans of backward branches) / in the whole kernel. The "
           "tutorial's rows give loop / all.",
           "- **cases**: the harness case (tests/compile/triton_sm90.py) that first compiled the row (+ how many "
           "more compiled the same config to the same figures). Only configs the launchers keep on an H100 are "
           "listed (those they stepped down from for want of shared memory are not).", ""]
    all_recs = [r for res in triton_results.values() for r in res["records"]]
    launched = R.launched(all_recs)
    pairs = dropout_pairs(all_recs)
    out += ["## Summary", "",
            f"- Triton: {len(launched)} launched compiles, {len(triton_rows(all_recs))} rows (distinct configs and "
            "figures).",
            "- Spills (launched compiles that spill; largest stores / loads): " + "; ".join(
                f"{fam} {len(sp)} ({max(r['spill_store_bytes'] for r in sp)} / "
                f"{max(r['spill_load_bytes'] for r in sp)} B)" if sp else f"{fam} none"
                for fam, sp in ((fam, [r for r in R.launched(res["records"]) if r.get("spill_store_bytes")
                                       or r.get("spill_load_bytes")]) for fam, res in triton_results.items())) + ".",
            "- Spills in an innermost loop (launched compiles; bytes of their STL / LDL there): " + "; ".join(
                f"{fam} {len(sp)} (up to {max(r['inner_loop_spill_bytes'] for r in sp)} B)" if sp else f"{fam} none"
                for fam, sp in ((fam, [r for r in R.launched(res["records"]) if r.get("inner_loop_spill_bytes")])
                                for fam, res in triton_results.items())) + ".",
            f"- CUDA: {len(cuda)} kernels, {sum(1 for c in cuda if c['spill_store_bytes'])} spill.",
            "- MMA of the attention forwards (`attention_fwd` cases): " + "; ".join(
                f"{kind}: {', '.join(sorted(mmas))}" for kind, mmas in (
                    ("prefill", {r["mma"] for r in launched if r["case"].startswith("attention_fwd")
                                 and "decode" not in r["case"] and r.get("mma") != "none"}),
                    ("decode (16-row tiles)", {r["mma"] for r in launched if r["case"].startswith("attention_fwd")
                                               and "decode" in r["case"] and r.get("mma") != "none"})))
            + ". Relative attention (16-bit): " + ", ".join(sorted(
                {r["mma"] for r in launched if r["kernel"].startswith("_rel") and "fp32" not in r["case"]}))
            + ". TMA (UTMALDG) in any Triton kernel: " + ("yes" if any(r.get("utmaldg") for r in launched)
                                                          else "no") + ".",
            "- Dropout (SASS loop instructions with / without dropout, same config): "
            + (f"{min(loop_ratio(a, b) for a, b in pairs):.2f}x to {max(loop_ratio(a, b) for a, b in pairs):.2f}x "
               f"over {len(pairs)} kernels (target: <= 1.5x)." if pairs else "no pair compiled."), ""]
    out += _beside_tutorial(triton_results)
    for fam, res in triton_results.items():
        rows = triton_rows(res["records"])
        ver = next((r.get("triton") for r in res["records"] if "triton" in r), "?")
        out += [f"## Triton: {fam}", "", f"{len(rows)} rows (harness exit {res['rc']}, triton {ver}).", "",
                HEADER, RULE]
        out += [_row(x["rec"], x["cases"]) for x in rows]
        out.append("")
    if pairs:
        out += ["## Dropout: the same launch compiled with dropout off", "",
                "| kernel | case | SASS loop on / off | ratio | all on / off | IMAD on / off | LOP3 on / off |",
                "|---|---|---|---|---|---|---|"]
        for on, off in pairs:
            oc, fc = on.get("opcodes", {}), off.get("opcodes", {})
            out.append(f"| {on['kernel']} | {on['case']} | {on['loop_instructions']} / {off['loop_instructions']} | "
                       f"{loop_ratio(on, off):.2f} | {on['sass_instructions']} / {off['sass_instructions']} | "
                       f"{oc.get('IMAD', 0)} / {fc.get('IMAD', 0)} | {oc.get('LOP3', 0)} / {fc.get('LOP3', 0)} |")
        out.append("")
    out += ["## CUDA kernels (csrc/cuda, nvcc -O2 for sm_90a)", "",
            "Block sizes are chosen at run time; occupancy is given for 256-thread blocks (8 warps).", "",
            "| source | kernel | registers | spill bytes (st/ld) | stack | static shared | occupancy (warps/SM) |",
            "|---|---|---|---|---|---|---|"]
    for c in cuda:
        out.append(f"| {c['source']} | `{c['kernel']}` | {c['regs']} | {_spills(c)} | {c['stack']} | "
                   f"{c['static_shared']} | {A.occupancy_warps(c['regs'], c['static_shared'], 8)} |")
    out += ["", f"## The Triton tutorial's fused attention, compiled the same way (commit {TUTORIAL_COMMIT[:10]})",
            "", "Figures kept as data in tests/compile/sm90_report.py (fp16; our attention rows above).", "",
            "| kernel | config | warps | stages | registers | spill bytes (st/ld) | shared | occupancy (warps/SM) | "
            "MMA | TMA | SASS loop / all |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, cfg, w, s, regs, st, ld, sh, mma, tma, loop, total in TUTORIAL:
        spill = "0" if st == ld == 0 else f"**{st} / {ld}**"
        out.append(f"| {k} | {cfg} | {w} | {s} | {regs} | {spill} | {sh} | {A.occupancy_warps(regs, sh, w)} | {mma} | "
                   f"{tma} | {loop} / {total} |")
    out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--families", default=",".join(FAMILIES))
    args = ap.parse_args(argv)
    results = R.run_families(args.families.split(","))
    cuda = [c for src in sorted(R.CUDA_DIR.glob("*.cu")) for c in R.cuda_records(src)]
    Path(args.out).write_text(render(results, cuda))
    failed = {f: r["rc"] for f, r in results.items() if r["rc"] != 0}
    print(f"wrote {args.out}" + (f"; harness failures: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
