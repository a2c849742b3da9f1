"""Tests of the benchmark harness: no timing assertions; the scheduling and the ratio
statistics are driven by fake timers."""

import json
import math
import statistics

import pytest
import torch

from convnn import bench
from convnn.bench.measurement import CaseError
from convnn.bench.rounds import MIN_ROUNDS, NOISY_SPREAD


def test_quick_suite_measures_in_fresh_processes_and_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "results.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\nintro\n")
    argv = ["--suite", "quick", "--filter", "quick 2x8x8x8", "--rounds", "3"]
    assert bench.main([*argv, "--out", str(out), "--markdown", str(md), "smoke"]) == 0

    data = json.loads(out.read_text())
    assert data["hardware"]["torch"] and data["hardware"]["cores"] >= 1
    assert data["command"].startswith("convnn bench")
    assert data["threads"] == data["hardware"]["torch_threads"] == 1  # the CPU default
    roles = {r["role"]: r for r in data["results"]}
    assert set(roles) == {"ours", "dense", "conv"}
    for r in roles.values():
        assert r["status"] == "ok", r
        assert r["total_ms"] > 0 and r["fwd_ms"] > 0 and r["bwd_ms"] > 0
        assert r["rounds"] == 3 and len(r["rounds_ms"]) == 3
        assert math.isfinite(r["peak_mib"]) and r["peak_mib"] >= 0
        assert r["baseline_mib"] > 0  # the worker's resident set after the build
        assert r["load_before"] >= 0 and r["load_after"] >= 0
    vs = {r["vs"]: r for r in data["ratios"]}
    assert set(vs) == {"dense", "conv"}
    per_round = [
        sum(a) / sum(b) for a, b in zip(roles["ours"]["rounds_ms"], roles["dense"]["rounds_ms"])
    ]
    assert math.isclose(vs["dense"]["time"], statistics.median(per_round))
    assert (vs["dense"]["time_min"], vs["dense"]["time_max"]) == (min(per_round), max(per_round))

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
        r = bench.measure(case, rounds=1)
        assert r["status"] == "ok" and r["total_ms"] > 0 and r["peak_mib"] >= 0
        assert r["rounds"] == 1 and len(r["rounds_ms"]) == 1


def test_oversized_cases_are_skipped_and_targets_judged(tmp_path):
    dense = [c for c in bench.build_cases("sweep") if c.role == "dense"]
    assert max(c.est_bytes for c in dense) > 16e9  # 256 x 256: skipped, not run

    def row(scope, role, total, peak, config="cosine all K=9", rounds=5):
        return dict(
            scope=scope, config=config, role=role, kind="convnn2d", options=dict(K=9),
            status="ok", fwd_ms=total / 2, bwd_ms=total / 2, total_ms=total, peak_mib=peak,
            rounds_ms=[[total / 2, total / 2]] * rounds, group=config,
        )  # fmt: skip

    results = [
        row(bench.TARGET_SCOPE, "ours", 60.0, 50.0),  # 3.3x faster than dense
        row(bench.TARGET_SCOPE, "dense", 200.0, 1000.0),
        row(bench.MEMCHECK_SCOPE, "ours", 10.0, 60.0),
        row(bench.sweep_scope(192), "ours", 10.0, 130.0),
        row(bench.sweep_scope(256), "ours", 10.0, 230.0),
    ]
    verdicts = {
        t["target"].split(":")[0] + t["target"][-12:]: t for t in bench.targets(results, "cpu")
    }
    assert [t["verdict"] for t in verdicts.values()] == ["met", "met", "met", "met"]
    results[0]["rounds_ms"] = [[37.5, 37.5]] * 5  # 2.67x: not fast enough (the bar: 3x)
    assert bench.targets(results, "cpu")[0]["verdict"] == "not met"
    assert bench.targets(results, "cuda")[0]["verdict"] == "n/a"
    # 2x faster in the median, but the rounds spread 2-8x: no verdict, and the report says why.
    results[0]["rounds_ms"] = [[50.0, 50.0], [25.0, 25.0], [50.0, 50.0], [50.0, 50.0], [12.5, 12.5]]
    target = bench.targets(results, "cpu")[0]
    assert (
        target["verdict"] == "noisy: no verdict"
        and "2.00-8.00x over 5 rounds" in target["measured"]
    )
    # too few rounds: the same
    for r in results[:2]:
        r["rounds_ms"] = r["rounds_ms"][:2]
    results[0]["rounds_ms"] = [[50.0, 50.0]] * 2
    assert bench.targets(results, "cpu")[0]["verdict"] == "noisy: no verdict"
    data = dict(
        command="convnn bench", date="today", device="cpu", dtype="float32", wall_s=1.0,
        hardware=dict(torch="x"), results=results, ratios=bench.ratios(results),
        targets=bench.targets(results, "cpu"), rounds=2, reps=1, threads=1,
    )  # fmt: skip
    assert "noisy: 0.50-0.50 (2 rounds)" in bench.report(data)


class FakeMachine:
    """A machine whose speed changes over time: each call costs ``work`` x the slowdown of the
    moment (another process starting halfway through, say). Records the call order."""

    def __init__(self, slowdown):
        self.slowdown, self.calls = slowdown, []

    def runner(self, name, work, spikes=None):
        def run():
            self.calls.append(name)
            spike = (spikes or {}).get(sum(c == name for c in self.calls) - 1, 1.0)
            return work * self.slowdown(len(self.calls) - 1) * spike

        return run


def test_rounds_alternate_the_implementations_in_a_rotated_order():
    machine = FakeMachine(lambda i: 1.0)
    runners = {k: machine.runner(k, 1.0) for k in ("ours", "dense", "conv")}
    times = bench.interleave(runners, 3)
    assert machine.calls == [
        "ours",
        "dense",
        "conv",
        "dense",
        "conv",
        "ours",
        "conv",
        "ours",
        "dense",
    ]
    assert all(len(v) == 3 for v in times.values())
    with pytest.raises(ValueError, match="rounds"):
        bench.interleave(runners, 0)


def test_a_load_that_comes_and_goes_cancels_in_the_per_round_ratios():
    # 6 calls quiet, then 50x slower: the second half of the run shares the machine.
    slow = lambda i: 1.0 if i < 6 else 50.0  # noqa: E731
    machine = FakeMachine(slow)
    times = bench.interleave(
        dict(ours=machine.runner("ours", 10.0), sdpa=machine.runner("sdpa", 20.0)), 6
    )
    stats = bench.ratio_stats(times["ours"], times["sdpa"])
    assert stats["median"] == 0.5 and stats["min"] == stats["max"] == 0.5 and not stats["noisy"]
    # Timing one after the other (all of ours' repeats, then all of the baseline's) on the
    # same machine makes the nonsense ratio the interleaving avoids.
    machine = FakeMachine(slow)
    ours, sdpa = machine.runner("ours", 10.0), machine.runner("sdpa", 20.0)
    a, b = [ours() for _ in range(6)], [sdpa() for _ in range(6)]
    assert statistics.median(a) / statistics.median(b) == 0.01


def test_a_spike_in_one_round_of_one_case_moves_the_range_not_the_median():
    machine = FakeMachine(lambda i: 1.0)
    runners = dict(
        ours=machine.runner("ours", 10.0, spikes={2: 30.0}), dense=machine.runner("dense", 20.0)
    )
    times = bench.interleave(runners, 5)
    stats = bench.ratio_stats(times["ours"], times["dense"])
    assert stats["median"] == 0.5 and stats["max"] == 15.0 and stats["rounds"] == 5
    assert stats["noisy"]  # the range spreads 30x: flagged, never a confident number
    assert bench.format_ratio(stats) == "noisy: 0.50-15.00 (5 rounds)"
    quiet = bench.ratio_stats([10.0, 11.0, 9.0], [20.0, 20.0, 20.0])
    assert bench.format_ratio(quiet) == "0.50 (0.45-0.55)" and not quiet["noisy"]
    assert bench.ratio_stats([10.0] * (MIN_ROUNDS - 1), [20.0] * (MIN_ROUNDS - 1))["noisy"]
    edge = bench.ratio_stats([1.0, NOISY_SPREAD, 1.5], [1.0, 1.0, 1.0])
    assert not edge["noisy"]  # exactly the documented spread is still a number
    assert bench.ratio_stats([None, 1.0], [1.0, None]) is None  # no round with both


def test_a_failing_runner_leaves_the_later_rounds_and_is_reported():
    calls, errors = [], {}

    def broken():
        calls.append("broken")
        if len(calls) > 1:
            raise RuntimeError("out of memory")
        return 1.0

    times = bench.interleave(dict(ok=lambda: 1.0, broken=broken), 4, on_error=errors.__setitem__)
    assert times["ok"] == [1.0] * 4 and times["broken"] == [1.0, None, None, None]
    assert list(errors) == ["broken"] and len(calls) == 2


def test_comparisons_time_each_config_with_the_baselines_of_its_ratios():
    groups = bench.comparisons(bench.build_cases("full"))
    for config, members in groups:
        assert len({c.scope for c in members}) == 1
        ours = [c for c in members if c.role == "ours"]
        assert len(ours) <= 1 and all(c.config == config for c in ours)
    vit = [m for cfg, m in groups if m[0].scope.startswith("vit-ti 8x") and cfg == "all K=16"][0]
    assert sorted((c.role, c.config) for c in vit) == [
        ("dense", "all K=16"), ("kvt", "K=16"), ("ours", "all K=16"), ("sdpa", ""),
    ]  # fmt: skip
    names = [c.name for _, m in groups for c in m if c.role in ("ours", "dense")]
    assert sorted(names) == sorted(
        c.name for c in bench.build_cases("full") if c.role in ("ours", "dense")
    )


def test_every_case_runs_its_primer_step():
    """The small warm-up input of every case is valid for its options (a window of 49 tokens
    of a 1 x 197 row needs a row primer, not an 8 x 8 map)."""
    for case in bench.build_cases("full"):
        module, x, _ = bench.build_case(case, "cpu", torch.float32, bench.primer_shape(case))
        with torch.no_grad():
            module(x)


def test_an_isolated_case_that_cannot_be_built_reports_why():
    case = bench.Case("s", "", "conv", "no-such-kind", (1, 4, 8, 8))
    with pytest.raises(CaseError) as info:
        bench.Isolated(case, "cpu", "float32", reps=1, threads=1, timeout_s=300)
    assert info.value.result["status"] == "error"
    assert "unknown case kind 'no-such-kind'" in info.value.result["reason"]


def _cpu_floor():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_floor.py"
    spec = importlib.util.spec_from_file_location("cpu_floor", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cpu_floor", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return path, module


def test_cpu_floor_quick_prints_every_ratio_of_the_issue():
    """benchmarks/cpu_floor.py --quick: every ratio measured in one run at tiny shapes (a smoke
    test of the cases; no time is checked, and no bar is judged at these shapes)."""
    import subprocess
    import sys

    path, cpu_floor = _cpu_floor()
    names = [r.name for ratios in cpu_floor.RATIOS.values() for r in ratios]
    assert set(cpu_floor.RATIOS) == set(cpu_floor.GROUPS)
    for needed in ("headline/dense", "headline/gemm_floor", "vit_tiny_kvt/attention"):
        assert needed in names
    proc = subprocess.run(
        [sys.executable, str(path), "--quick", "--rounds", "3"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.split("| ratio | median (range) | bar | verdict |")[1]
    for name in names:
        assert f"| {name} (" in table, name
    assert " met |" not in table  # tiny shapes: no verdict
    assert table.count("quick shapes: no verdict") == sum(
        r.bar is not None for r in sum(cpu_floor.RATIOS.values(), [])
    )
    listed = subprocess.run(
        [sys.executable, str(path), "--list", "--only", "conv3x3"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert listed.stdout.strip() == "window_conv: window7x7/conv3x3"


def test_native_topk_benchmark_runs_its_three_ways_to_the_same_outputs():
    """benchmarks/native_topk.py --quick: blocks ranked natively and by torch ops give the same
    positions, and the step ranked natively, by the torch path and by a free top-K the same
    outputs (it exits non-zero otherwise). No time is checked."""
    import subprocess
    import sys
    from pathlib import Path

    from convnn import native

    if native._rank is None:
        pytest.skip(native.status())
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "native_topk.py"
    proc = subprocess.run(
        [sys.executable, str(path), "--quick", "--rounds", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the same outputs" in proc.stdout and "against the GEMM floor" in proc.stdout
    assert "one pass (the library)" in proc.stdout
    blocks = [line for line in proc.stdout.splitlines() if line.startswith("top-K of ")]
    assert len(blocks) == 2  # the blocks, ranked the same both ways


def test_the_load_spinner_stops_when_the_benchmark_is_killed(tmp_path):
    """The load group's spinning process must not outlive a benchmark killed from outside
    (a timeout): an orphan would load the machine for every later test and run."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    path, _ = _cpu_floor()
    script = tmp_path / "die.py"
    script.write_text(
        f"import os, sys\nsys.path.insert(0, {str(path.parent)!r})\nimport cpu_floor\n"
        "with cpu_floor._threads(1, True) as spinner:\n"
        "    print(spinner.pid, flush=True)\n"
        "    os._exit(0)  # no cleanup, as under SIGKILL\n"
    )
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True) as p:
        pid = int(p.stdout.readline())
        p.wait(timeout=120)
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + 30
    while status.exists() and "\tZ" not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = status.exists() and "\tZ" not in status.read_text()
    if alive:
        import os
        import signal

        os.kill(pid, signal.SIGKILL)
    assert not alive, "the spinner outlived the benchmark"
