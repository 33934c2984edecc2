"""The generate table of benchmarks/results/generate/README.md from one or more pytest-benchmark JSONs of
`pytest benchmarks/test_models_decoders.py -k generate --benchmark-json=F`.

    python -m benchmarks.generate_table run1.json [run2.json ...]

Each cell is the median over the runs of each run's median; the brackets hold the fastest and slowest round of
all runs. transformers is the faster of its eager and sdpa attention (by that median). The range column is
(transformers' fastest round / ours slowest) to (transformers' slowest / ours fastest): where it straddles
1.00x, the runs could not tell the two apart.
"""

from __future__ import annotations

import json
import re
import statistics
import sys

CASE = re.compile(r"test_decoder_generate\[(\w+)-(ptm-compiled|ptm|eager|sdpa)-b(\d+)-(\w+)\]")


def table(paths) -> str:
    medians, rounds = {}, {}
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        for bench in run["benchmarks"]:
            m = CASE.match(bench["name"])
            if m:
                medians.setdefault(m.groups(), []).append(bench["stats"]["median"] * 1e3)
                rounds.setdefault(m.groups(), []).extend(t * 1e3 for t in bench["stats"]["data"])

    def ms(key):
        return statistics.median(medians[key])

    def span(key):
        return min(rounds[key]), max(rounds[key])

    lines = ["| model | batch | phase | ptm ms | ptm compiled ms | transformers ms (impl) | speed-up (compiled) "
             "| range |", "|---|---|---|---|---|---|---|---|"]
    for model in sorted({k[0] for k in medians}):
        for batch in sorted({k[2] for k in medians}, key=int):
            for phase in ("prefill", "generate"):
                ours, compiled = (model, "ptm", batch, phase), (model, "ptm-compiled", batch, phase)
                impl = min(("eager", "sdpa"), key=lambda i: ms((model, i, batch, phase)))
                hf = (model, impl, batch, phase)
                low, high = span(hf)[0] / span(ours)[1], span(hf)[1] / span(ours)[0]
                lines.append(f"| {model} | b{batch} | {phase} | {ms(ours):.1f} [{span(ours)[0]:.1f}-"
                             f"{span(ours)[1]:.1f}] | {ms(compiled):.1f} | {ms(hf):.1f} [{span(hf)[0]:.1f}-"
                             f"{span(hf)[1]:.1f}] ({impl}) | {ms(hf) / ms(ours):.2f}x ({ms(hf) / ms(compiled):.2f}x)"
                             f" | {low:.2f}-{high:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
