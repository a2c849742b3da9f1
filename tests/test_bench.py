"""Smoke tests of the benchmark harness (no timing assertions)."""

import json
import math

import torch

from convnn import bench


def test_quick_suite_measures_in_fresh_processes_and_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "results.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\nintro\n")
    argv = ["--suite", "quick", "--filter", "quick 2x8x8x8", "--repeats", "2"]
    assert bench.main([*argv, "--out", str(out), "--markdown", str(md), "smoke"]) == 0

    data = json.loads(out.read_text())
    assert data["hardware"]["torch"] and data["hardware"]["cores"] >= 1
    assert data["command"].startswith("convnn bench")
    roles = {r["role"]: r for r in data["results"]}
    assert set(roles) == {"ours", "dense", "conv"}
    for r in roles.values():
        assert r["status"] == "ok", r
        assert r["total_ms"] > 0 and r["fwd_ms"] > 0 and r["bwd_ms"] > 0
        assert r["repeats"] == 2
        assert math.isfinite(r["peak_mib"]) and r["peak_mib"] >= 0
        assert r["baseline_mib"] > 0  # the worker's resident set before the case
    vs = {r["vs"]: r for r in data["ratios"]}
    assert set(vs) == {"dense", "conv"}
    assert math.isclose(vs["dense"]["time"], roles["ours"]["total_ms"] / roles["dense"]["total_ms"])

    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nintro") and "ours / dense" in text
    # Writing the section again replaces it rather than appending a second copy.
    bench.write_markdown(md, "smoke", "new body\n")
    assert md.read_text().count("<!-- bench:smoke:begin -->") == 1
    assert "new body" in md.read_text() and "ours / dense" not in md.read_text()


def test_attention_baselines_measure_in_process():
    for case in (
        bench.Case("s", "K=3", "kvt", "kvt", (1, 16, 8), dict(K=3), heads=2),
        bench.Case("s", "", "sdpa", "sdpa", (1, 16, 8), heads=2),
        bench.Case("s", "all K=3", "ours", "attention", (1, 16, 8), dict(K=3), heads=2),
    ):
        r = bench.measure(case, repeats=1)
        assert r["status"] == "ok" and r["total_ms"] > 0 and r["peak_mib"] >= 0


def test_oversized_cases_are_skipped_and_targets_judged(tmp_path):
    dense = [c for c in bench.build_cases("sweep") if c.role == "dense"]
    assert max(c.est_bytes for c in dense) > 16e9  # 256 x 256: skipped, not run

    def row(scope, role, total, peak, config="cosine all K=9"):
        return dict(
            scope=scope, config=config, role=role, kind="convnn2d", options=dict(K=9),
            status="ok", fwd_ms=total / 2, bwd_ms=total / 2, total_ms=total, peak_mib=peak,
        )  # fmt: skip

    results = [
        row(bench.TARGET_SCOPE, "ours", 100.0, 50.0),
        row(bench.TARGET_SCOPE, "dense", 200.0, 1000.0),
        row(bench.MEMCHECK_SCOPE, "ours", 10.0, 60.0),
        row(bench.sweep_scope(192), "ours", 10.0, 130.0),
        row(bench.sweep_scope(256), "ours", 10.0, 230.0),
    ]
    verdicts = {
        t["target"].split(":")[0] + t["target"][-12:]: t for t in bench.targets(results, "cpu")
    }
    assert [t["verdict"] for t in verdicts.values()] == ["met", "met", "met", "met"]
    results[0]["total_ms"] = 150.0  # 1.33x: not fast enough
    assert bench.targets(results, "cpu")[0]["verdict"] == "not met"
    assert bench.targets(results, "cuda")[0]["verdict"] == "n/a"


def test_every_case_runs_its_primer_step():
    """The small warm-up input of every case is valid for its options (a window of 49 tokens
    of a 1 x 197 row needs a row primer, not an 8 x 8 map)."""
    for case in bench.build_cases("full"):
        module, x, _ = bench.build_case(case, "cpu", torch.float32, bench.primer_shape(case))
        with torch.no_grad():
            module(x)
