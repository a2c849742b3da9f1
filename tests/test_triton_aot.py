"""GPU-ready without a GPU: every configuration the Triton backend can launch (its table)
compiles ahead of time for sm_80 and sm_90, fits the target's registers and shared memory
with no spills, and runs its matrix products on tensor cores.

The compiler runs in a subprocess (the tests' process interprets the kernels instead), all
configurations at once on every core; Triton's cache makes a second session take seconds.
``CONVNN_AOT_ARCHS=80,86,89,90`` checks other archs too (the dispatcher trusts only
``triton.ARCHS``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from convnn.backends import triton as tb  # noqa: E402

ARCHS = [int(a) for a in os.environ.get("CONVNN_AOT_ARCHS", "").split(",") if a] or list(tb.ARCHS)


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> dict:
    """The JSON of one run of ``python -m convnn.backends.triton_aot``."""
    out = tmp_path_factory.mktemp("aot") / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "convnn.backends.triton_aot", "--json", str(out), "--arch"]
    proc = subprocess.run(
        cmd + [str(a) for a in ARCHS], env=env, capture_output=True, text=True, timeout=1200
    )
    if not out.is_file():
        pytest.fail(f"the AOT compile did not run:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def records(compiled) -> dict:
    return {(r["launch"], r["arch"]): r for r in compiled["records"]}


def test_the_jit_would_compile_exactly_these_variants(compiled):
    """Given the arguments the backend actually passes (every table entry reached), Triton's
    JIT specialises each launch as the AOT compile did: no other variant can be launched."""
    assert compiled["specialisation_errors"] == []


def test_every_table_entry_is_compiled_for_every_arch(records):
    assert set(records) == {(launch.describe(), a) for launch in tb.table() for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("launch", tb.table(), ids=lambda launch: launch.describe())
def test_kernel_fits_without_spills_on_tensor_cores(records, launch, arch):
    record = records[(launch.describe(), arch)]
    assert record["errors"] == []
    assert record["stack"] == 0 and record["local"] == 0  # no spills
    assert record["reg"] * record["threads"] <= 65536 and record["reg"] <= 255
    if launch.has_matmul:
        assert record["mma"], "matrix products without tensor cores"
