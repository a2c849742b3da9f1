"""Shared settings and fixtures of the tests.

The "tiny run" settings live here once (``tiny``); ``convnn`` runs the command in this
process, ``convnn_process`` in a fresh one; ``trained`` holds small finished runs that several
test files read (never write: copy a run before changing it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Triton kernels run on the CPU through the interpreter in CI; it must be set before
# triton decorates any kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).parents[1]

# Few steps, one thread, no progress bar: seconds per run on the embedded digits.
QUICK = [
    "data.batch_size=32",
    "train.max_steps_per_epoch=3",
    "train.num_threads=1",
    "output.progress=false",
]


@dataclass(frozen=True)
class Tiny:
    """``--set`` values of tiny runs on the embedded digits (8x8 grey, 10 classes)."""

    # small_cnn at width 8 (~4,000 parameters): the CNN of most training tests.
    cnn: tuple[str, ...] = ("model.name=small_cnn", "model.layer_kwargs.width=8", *QUICK)
    # ResNet-18 at 8 px: a real zoo CNN with many ConvNN layers (maps from 8x8 down to 1x1).
    resnet: tuple[str, ...] = ("model.name=resnet18", "model.img_size=8", *QUICK)
    # A one-block ViT of 3,850 parameters: checkpoints of a few tens of kB.
    vit: tuple[str, ...] = (
        "model.name=vit_tiny",
        "model.layer=attention",
        "model.img_size=8",
        "model.patch_size=4",
        "model.layer_kwargs.embed_dim=16",
        "model.layer_kwargs.depth=1",
        "model.layer_kwargs.num_heads=2",
        *QUICK,
    )


TINY = Tiny()


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    return TINY


@dataclass
class Result:
    """What one ``convnn`` command did: exit status and output."""

    code: int
    out: str
    err: str

    def __iter__(self):  # code, out, err = convnn(...)
        return iter((self.code, self.out, self.err))

    def error_line(self, *needles: str) -> str:
        """Assert the command failed with one line ``convnn: error: ...`` holding every
        needle; returns the line."""
        lines = self.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("convnn: error: "), self.err
        assert "Traceback" not in self.err
        for needle in needles:
            assert needle in lines[0], lines[0]
        return lines[0]


@pytest.fixture
def convnn(capsys):
    """``convnn(*argv)``: run the command in this process; returns a :class:`Result`."""
    from convnn import cli

    def run(*argv: str) -> Result:
        code = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


def run_process(args: list[str], env: dict | None = None, timeout: int = 300) -> Result:
    """The ``convnn`` command (or ``python -c`` code, when args start with ``-c``) in a fresh
    process with one thread."""
    cmd = [sys.executable, *(args if args[0] == "-c" else ["-m", "convnn.cli", *args])]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def convnn_process():
    """``convnn_process(args, env=None, timeout=300)``: the command in a fresh process."""
    return run_process


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Finished tiny runs, by name: ``cnn`` (small_cnn, 2 epochs, conv), ``convnn`` (the same
    with ConvNN layers) and ``vit`` (the one-block ViT, 3 epochs). Read-only."""
    from convnn import cli

    out = tmp_path_factory.mktemp("trained")
    runs = {
        "cnn": [*TINY.cnn, "train.epochs=2"],
        "convnn": [*TINY.cnn, "train.epochs=2", "model.layer=convnn"],
        "vit": [*TINY.vit, "train.epochs=3", "train.max_steps_per_epoch=2"],
    }
    for name, settings in runs.items():
        argv = ["train", "--set", *settings, "--out-dir", str(out), "--name", name]
        assert cli.main(argv) == 0, name
    return {name: out / name for name in runs}
