"""Turn a pytest-benchmark JSON into ratios against the baseline measured in the same run.

    python -m benchmarks.report benchmarks/results/last-run.json [more.json ...] [--out benchmarks/results]

Several JSONs (e.g. the op and model halves of a time-boxed GPU run) are merged; a missing or unreadable one
(a run cut off by its time limit writes none) is reported and skipped.

Writes <out>/<device>.json (device, versions, commit, date, one row per case) and <out>/<device>.md, and
prints the table. Speedup = baseline time / ptm time (> 1 means ptm-kernels is faster).
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
    """One row per (group, case, passes): each implementation's time and ratios against the baselines."""
    times = defaultdict(dict)
    info = {}
    for b in bench_json["benchmarks"]:
        e = b["extra_info"]
        key = (e["group"], e["case"], e["passes"])
        times[key][e["impl"]] = b["stats"]["median"] / max(1, e.get("inner", 1))
        info[key, e["impl"]] = e
    copy = next((t["copy"] for k, t in times.items() if k[0] == "copy"), None)
    rows = []
    for key, by_impl in sorted(times.items()):
        group, case, passes = key
        if group == "copy":
            continue
        row = {"op": group, "case": case, "passes": passes,
               "time_ms": {k: round(v * 1e3, 4) for k, v in by_impl.items()}}
        ours = by_impl.get("ptm")
        if ours:
            for base in by_impl:
                if base != "ptm":
                    row[f"speedup_vs_{base}"] = round(by_impl[base] / ours, 3)
            e = info[key, "ptm"]
            if e.get("bytes") and passes == "fwd":
                row["GB_per_s"] = round(e["bytes"] / ours / 1e9, 1)
                if copy:
                    row["fraction_of_copy_bw"] = round(e["bytes"] / ours / (2 * 256 * 1024 * 1024 / copy), 3)
            if e.get("flops"):
                row["TFLOP_per_s"] = round(e["flops"] / ours / 1e12, 2)
        rows.append(row)
    return rows


def table(rows: list) -> str:
    bases = sorted({k[len("speedup_vs_"):] for r in rows for k in r if k.startswith("speedup_vs_")})
    extra = [c for c in ("GB_per_s", "fraction_of_copy_bw", "TFLOP_per_s") if any(c in r for r in rows)]
    head = ["op", "case", "pass", "ptm ms"] + [f"vs {b}" for b in bases] + extra
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], r["case"], r["passes"], str(r["time_ms"].get("ptm", "-"))]
        cells += [f"{r[f'speedup_vs_{b}']:.2f}x" if f"speedup_vs_{b}" in r else "-" for b in bases]
        cells += [str(r.get(c, "-")) for c in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    text = (f"# Benchmarks on {device}\n\ncommit {result['commit']}, {result['date']}, {result['versions']}\n\n"
            f"Speedup = baseline time / ptm-kernels time, measured in the same run (> 1: ptm-kernels faster).\n\n"
            + table(rows) + "\n")
    with open(os.path.join(args.out, f"{slug}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
