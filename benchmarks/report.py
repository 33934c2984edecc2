"""Turn pytest-benchmark JSONs into per-family tables of ratios against baselines measured in the same run.

    python -m benchmarks.report benchmarks/results/last-run.json [more.json ...] [--out benchmarks/results]

Several JSONs (e.g. the op and model halves of a time-boxed GPU run) are merged; a missing or unreadable one
(a run cut off by its time limit writes none) is reported and skipped.

Writes <out>/<device>.json (device, versions, commit, date, one row per case), <out>/<device>.md (one table per
family, each with a legend saying what every column and baseline is) and, where matplotlib is installed,
<out>/<device>-<family>.png (one bar chart per family: speedup against each baseline, with its range).
Speedup = baseline time / ptm-kernels time (> 1 means ptm-kernels is faster). The range beside a speedup is
(baseline's fastest round / ours slowest) to (baseline's slowest / ours fastest): if it straddles 1.00x, the
run could not tell the two apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
from collections import defaultdict

import torch

# Families: which benchmark groups share a table, and what each implementation ("impl") means there.
# A group belongs to the first family whose pattern matches its name.
FAMILIES = [
    ("norms", r"^(add_)?(rms|layer)_norm$", "RMSNorm / LayerNorm, with and without the fused residual add"),
    ("activations", r"^(gelu|gelu_tanh|bias_gelu|silu|swiglu|geglu)$", "GELU and gated activations"),
    ("rope", r"^rope$", "rotary embedding of q and k in one call"),
    ("losses", r"cross_entropy|mlm_loss", "cross-entropy and the fused linear + cross-entropy"),
    ("attention", r"^attention$", "fused attention with structured masks"),
    ("relative-attention", r"^(relative|two_stream)_attention$", "Transformer-XL / XLNet relative attention"),
    ("hf-patched", r"^hf-", "transformers models patched in place by ptm_kernels.hf.apply"),
    ("models", r".", "the project's own models (ptm_kernels.models) against transformers' classes"),
]

LEGEND = {
    "norms": {"eager": "the same math in plain PyTorch ops (torch.nn.functional / HF-style RMSNorm), eager",
              "compiled": "the eager code under torch.compile (default mode)",
              "liger": "Liger-Kernel's op (GPU only)"},
    "activations": {"eager": "plain PyTorch (F.gelu / F.silu and a multiply), eager",
                    "compiled": "the eager code under torch.compile (default mode)",
                    "liger": "Liger-Kernel's op (GPU only)"},
    "rope": {"eager": "HF's rotate_half formula on q and k, eager",
             "compiled": "the eager code under torch.compile"},
    "losses": {"eager": "F.cross_entropy (after hidden @ W.T for the linear variant), eager",
               "compiled": "the eager code under torch.compile",
               "liger": "Liger-Kernel's op (GPU only)"},
    "attention": {"eager": "softmax(QK^T * scale + mask) V in plain PyTorch",
                  "sdpa": "torch's scaled_dot_product_attention with the mask as a dense tensor",
                  "sdpa-causal": "torch's SDPA with is_causal=True (no mask tensor)",
                  "sdpa-gqa": "decode rows: torch's SDPA with enable_gqa=True, no mask (every cached key visible)",
                  "flex": "torch's FlexAttention (compiled block mask)"},
    "relative-attention": {"eager": "the Transformer-XL / XLNet formula in plain PyTorch (HF's rel_shift)",
                           "two-calls": "our relative_attention called once per stream"},
    "hf-patched": {"sdpa": "the same transformers model, unpatched, attn_implementation=\"sdpa\"",
                   "eager": "the same transformers model, unpatched, attn_implementation=\"eager\""},
    "models": {"eager": "transformers' class, attn_implementation=\"eager\", same weights",
               "sdpa": "transformers' class, attn_implementation=\"sdpa\", same weights",
               "ptm-unpad": "our model with unpad=True (packed tokens); < 1x means unpadding is faster",
               "ptm-checkpoint": "our Reformer with checkpoint_layers=True (layers recomputed in the backward, "
                                 "as transformers' reversible layers); < 1x means recomputing is faster"},
}

COLUMNS = ("`ptm ms`: median time of one call of ptm-kernels' implementation, [fastest, slowest] round. "
           "`vs X`: X's median time / ours (> 1: ours faster), (range over rounds). "
           "`pass`: fwd = forward only; fwd+bwd = forward and backward; train-step = forward, backward and an "
           "AdamW step; decode-bN / generate-bN = token generation at batch N. "
           "`GB/s`: bytes read and written / time. `peak MB`: peak memory growth of the timed call "
           "(GPU: allocator peak; CPU: resident-set peak), ours and the first baseline.")


def _family(group: str) -> str:
    return next(name for name, pattern, _ in FAMILIES if re.search(pattern, group))


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _slug(name: str) -> str:
    base = "gpu" if torch.cuda.is_available() else "cpu"
    return base + "-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _commit() -> str:
    if os.environ.get("PTM_KERNELS_COMMIT"):  # a copied working tree without .git (the GPU machine)
        return os.environ["PTM_KERNELS_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def _versions() -> dict:
    v = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:
        v["triton"] = None
    return v


def rows_from(bench_json: dict) -> list:
    """One row per (group, case, passes): each implementation's median/min/max time and ratios."""
    stats = defaultdict(dict)
    info = {}
    for b in bench_json["benchmarks"]:
        e = b["extra_info"]
        key = (e["group"], e["case"], e["passes"])
        inner = max(1, e.get("inner", 1))
        s = b["stats"]
        stats[key][e["impl"]] = {k: s.get(k, s["median"]) / inner for k in ("median", "min", "max")}
        info[key, e["impl"]] = e
    copy = next((t["copy"]["median"] for k, t in stats.items() if k[0] == "copy"), None)
    rows = []
    for key, by_impl in sorted(stats.items()):
        group, case, passes = key
        if group == "copy":
            continue
        row = {"op": group, "family": _family(group), "case": case, "passes": passes,
               "time_ms": {k: round(v["median"] * 1e3, 4) for k, v in by_impl.items()},
               "time_ms_min": {k: round(v["min"] * 1e3, 4) for k, v in by_impl.items()},
               "time_ms_max": {k: round(v["max"] * 1e3, 4) for k, v in by_impl.items()}}
        peak = {k: info[key, k]["peak_mem_mb"] for k in by_impl if "peak_mem_mb" in info[key, k]}
        if peak:
            row["peak_mem_mb"] = peak
        ours = by_impl.get("ptm")
        if ours:
            for base, t in by_impl.items():
                if base != "ptm":
                    row[f"speedup_vs_{base}"] = round(t["median"] / ours["median"], 3)
                    row[f"speedup_range_vs_{base}"] = [round(t["min"] / ours["max"], 3),
                                                       round(t["max"] / ours["min"], 3)]
            e = info[key, "ptm"]
            if e.get("bytes") and passes == "fwd":
                row["GB_per_s"] = round(e["bytes"] / ours["median"] / 1e9, 1)
                if copy:
                    row["fraction_of_copy_bw"] = round(e["bytes"] / ours["median"] / (2 * 256 * 1024 * 1024 / copy), 3)
            if e.get("flops"):
                row["TFLOP_per_s"] = round(e["flops"] / ours["median"] / 1e12, 2)
        rows.append(row)
    return rows


def _bases(rows: list) -> list:
    return sorted({k[len("speedup_vs_"):] for r in rows for k in r if k.startswith("speedup_vs_")})


def table(rows: list) -> str:
    bases = _bases(rows)
    extra = [c for c in ("GB_per_s", "fraction_of_copy_bw", "TFLOP_per_s") if any(c in r for r in rows)]
    has_peak = any("peak_mem_mb" in r for r in rows)
    head = ["op", "case", "pass", "ptm ms [min, max]"] + [f"vs {b} (range)" for b in bases] + extra
    head += ["peak MB (ptm / baselines)"] if has_peak else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r["time_ms"]
        ours = (f"{t['ptm']:.4g} [{r['time_ms_min']['ptm']:.4g}, {r['time_ms_max']['ptm']:.4g}]"
                if "ptm" in t else "-")
        cells = [r["op"], r["case"], r["passes"], ours]
        for b in bases:
            if f"speedup_vs_{b}" in r:
                lo, hi = r[f"speedup_range_vs_{b}"]
                cells.append(f"**{r[f'speedup_vs_{b}']:.2f}x** ({lo:.2f}-{hi:.2f})")
            else:
                cells.append("-")
        cells += [str(r.get(c, "-")) for c in extra]
        if has_peak:
            peak = r.get("peak_mem_mb", {})
            cells.append(" / ".join(f"{k} {v:.0f}" for k, v in sorted(peak.items(), key=lambda kv: kv[0] != "ptm"))
                         or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _legend(family: str, rows: list) -> str:
    meanings = LEGEND.get(family, {})
    lines = [f"- `vs {b}`: {meanings.get(b, b)}" for b in _bases(rows)]
    return "\n".join(lines)


def plot(family: str, rows: list, path: str) -> bool:
    """A horizontal bar chart of the speedups of one family, with the range as error bars. False without
    matplotlib (e.g. a GPU machine with no package registry)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bases = _bases(rows)
    labels = [f"{r['op']} {r['case']} {r['passes']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) * max(1, len(bases)) + 1.5))
    height = 0.8 / max(1, len(bases))
    for i, b in enumerate(bases):
        ys, xs, lo, hi = [], [], [], []
        for j, r in enumerate(rows):
            if f"speedup_vs_{b}" in r:
                s = r[f"speedup_vs_{b}"]
                a, c = r[f"speedup_range_vs_{b}"]
                ys.append(j + i * height)
                xs.append(s)
                lo.append(max(0.0, s - a))
                hi.append(max(0.0, c - s))
        ax.barh(ys, xs, height=height, xerr=[lo, hi], label=f"vs {b}", capsize=2)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))], labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup = baseline time / ptm-kernels time (log scale; > 1: ptm-kernels faster)")
    ax.set_title(f"{family}: median of rounds, bars = range")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def markdown(result: dict, slug: str, plotted: set) -> str:
    out = [f"# Benchmarks on {result['device']}\n",
           f"commit {result['commit']}, {result['date']}, {result['versions']}\n",
           "Every ratio compares two implementations measured in the same run on the same inputs, after "
           "checking that both give the same result.\n", COLUMNS + "\n"]
    by_family = defaultdict(list)
    for r in result["rows"]:
        by_family[r["family"]].append(r)
    for name, _, what in FAMILIES:
        rows = by_family.get(name)
        if not rows:
            continue
        out.append(f"## {name}: {what}\n")
        out.append(_legend(name, rows) + "\n")
        if name in plotted:
            out.append(f"![{name}]({slug}-{name}.png)\n")
        out.append(table(rows) + "\n")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_json", nargs="+")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    merged = {"benchmarks": []}
    for path in args.bench_json:
        try:
            with open(path) as f:
                merged["benchmarks"] += json.load(f)["benchmarks"]
        except (OSError, ValueError, KeyError) as e:
            print(f"skipping {path}: {e}")
    if not merged["benchmarks"]:
        raise SystemExit("no benchmark results to report")
    rows = rows_from(merged)
    device = _device_name()
    result = {"device": device, "versions": _versions(), "commit": _commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "threads": torch.get_num_threads(), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    slug = _slug(device)
    with open(os.path.join(args.out, f"{slug}.json"), "w") as f:
        json.dump(result, f, indent=1)
    plotted = set()
    for name, _, _ in FAMILIES:
        family_rows = [r for r in rows if r["family"] == name]
        if family_rows and plot(name, family_rows, os.path.join(args.out, f"{slug}-{name}.png")):
            plotted.add(name)
    if not plotted:
        print("matplotlib not installed: no plots")
    text = markdown(result, slug, plotted)
    with open(os.path.join(args.out, f"{slug}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
