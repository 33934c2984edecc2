"""Before/after over interleaved pytest-benchmark runs: per row, the min of the runs' medians; spread = max/min
across a tree's runs. Usage: python compare_runs.py before1.json,before2.json,... after1.json,after2.json,..."""
import json
import statistics
import sys

def load(p):
    return {b["fullname"].split("::")[-1]: b["stats"]["median"] for b in json.load(open(p))["benchmarks"]}
bef = [load(p) for p in sys.argv[1].split(",")]
aft = [load(p) for p in sys.argv[2].split(",")]
keys = sorted(set.intersection(*map(set, bef + aft)))
rows = []
for k in keys:
    if "ptm" not in k: continue
    b, a = min(d[k] for d in bef), min(d[k] for d in aft)
    sb = max(d[k] for d in bef) / b; sa = max(d[k] for d in aft) / a
    rows.append((a / b, k, b * 1e6, a * 1e6, sb, sa))
rs = [r[0] for r in rows]
print(f"{len(rows)} ptm rows. after/before (min of the medians): geomean {statistics.geometric_mean(rs):.3f}, "
      f"median {statistics.median(rs):.3f}, best {min(rs):.3f}, worst {max(rs):.3f}; rows > 1.05: {sum(r > 1.05 for r in rs)}")
print("| row | before µs | after µs | after/before | run spread before / after |\n|---|---|---|---|---|")
for r, k, b, a, sb, sa in sorted(rows, reverse=True):
    print(f"| {k} | {b:.0f} | {a:.0f} | {r:.3f} | {sb:.2f} / {sa:.2f} |")
