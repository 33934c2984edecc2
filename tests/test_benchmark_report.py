"""benchmarks/report.py: ratios, ranges and per-family tables from a pytest-benchmark JSON."""

import json

import pytest

from benchmarks import report


def _bench(group, case, impl, median, lo, hi, passes="fwd", **extra):
    return {"extra_info": dict(group=group, case=case, impl=impl, passes=passes, inner=1, **extra),
            "stats": {"median": median, "min": lo, "max": hi}}


def test_ratios_ranges_and_families(tmp_path):
    raw = {"benchmarks": [
        _bench("rms_norm", "llama", "ptm", 1.0, 0.9, 1.2),
        _bench("rms_norm", "llama", "eager", 3.0, 2.7, 3.6),
        _bench("attention", "L=64 causal", "ptm", 2.0, 2.0, 2.5),
        _bench("attention", "L=64 causal", "sdpa", 4.0, 3.0, 5.0),
        _bench("hf-llama-train", "4l", "ptm", 1.0, 1.0, 1.0, passes="train-step", peak_mem_mb=100.0),
        _bench("hf-llama-train", "4l", "sdpa", 1.5, 1.5, 1.5, passes="train-step", peak_mem_mb=250.0),
    ]}
    rows = {r["op"]: r for r in report.rows_from(raw)}
    norm = rows["rms_norm"]
    assert norm["family"] == "norms"
    assert norm["speedup_vs_eager"] == pytest.approx(3.0)
    assert norm["speedup_range_vs_eager"] == pytest.approx([2.7 / 1.2, 3.6 / 0.9], abs=1e-3)
    assert rows["attention"]["family"] == "attention"
    assert rows["hf-llama-train"]["family"] == "hf-patched"
    assert rows["hf-llama-train"]["peak_mem_mb"] == {"ptm": 100.0, "sdpa": 250.0}

    path = tmp_path / "raw.json"
    path.write_text(json.dumps(raw))
    report.main([str(path), "--out", str(tmp_path)])
    md = next(tmp_path.glob("*.md")).read_text()
    for heading in ("## norms", "## attention", "## hf-patched"):
        assert heading in md
    assert "`vs sdpa`: torch's scaled_dot_product_attention" in md  # the legend says what each baseline is
    assert "**3.00x** (2.25-4.00)" in md
