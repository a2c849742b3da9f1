"""``convnn bench``: time and peak memory of ConvNN layers against their dense and PyTorch twins.

Every case builds one module with a fixed seed and warms it up on a training step with
gradients for the input and the parameters. Cases are timed in *comparisons*: a ConvNN config
of one scope with the baselines it is compared with (:func:`.cases.comparisons`). Within a
comparison every case takes one timed step (``--reps`` steps) per round, in an order rotated
each round, for ``--rounds`` rounds (:func:`.rounds.interleave`); a case's time is the median
of its rounds and a ratio the median of its per-round ratios, with their range, flagged
*noisy* (and judged against no target) when too few or too spread (:mod:`.rounds`). So a
burst of other work on the machine hits both sides of a ratio in the same round instead of
making it up. The thread count is fixed (``--threads``, 1 on the CPU by default) and the load
average is recorded before and after each comparison. Peak memory is measured above a
baseline taken after the module, the input and the output gradient exist:

- CPU: each case runs in a fresh ``python -m convnn.bench --case <json>`` process of its own
  that stays up between the rounds; the peak resident set (VmHWM, reset after the build, so
  imports do not count; ``ru_maxrss`` where /proc cannot be reset) minus the resident set
  after the build;
- CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before each step.

Implementations ("roles") of one comparison share a size (``scope``) and a configuration:
``ours`` is the default (auto) backend, ``dense`` the same module under the ``reference``
backend (the dense formulation), ``chunked``/``triton`` those backends forced (on CUDA),
``conv`` an ``nn.Conv2d`` 3x3, ``sdpa`` attention through ``scaled_dot_product_attention``
and ``kvt`` dense-mask top-K attention (full score matrix, top-K, -inf elsewhere). Dense cases
whose score matrix would exceed ``--dense-budget-gb`` are skipped with their estimate.

``convnn bench --suite full --out results.json --markdown BENCHMARKS.md`` prints the per-case
rows, the ratio table (ours / dense, ours / conv, ours / SDPA, ours / KVT from the same run)
and the target verdicts, writes everything with the hardware to JSON and updates the section
of BENCHMARKS.md for the device.

The package: :mod:`.cases` (what is measured, no torch), :mod:`.rounds` (interleaved rounds
and ratio statistics, no torch), :mod:`.measurement` (a case here or in a fresh process),
:mod:`.reporting` (ratios, targets, tables), :mod:`.command` (the command).
Names load on first use.
"""

from typing import TYPE_CHECKING

from ..utils import lazy_exports

__all__ = [
    "MEMCHECK_SCOPE",
    "SUITES",
    "TARGET_SCOPE",
    "Case",
    "InProcess",
    "Isolated",
    "Session",
    "add_arguments",
    "build_case",
    "build_cases",
    "comparisons",
    "format_ratio",
    "hardware",
    "interleave",
    "main",
    "measure",
    "primer_shape",
    "ratio_stats",
    "ratios",
    "report",
    "run",
    "sweep_scope",
    "targets",
    "write_markdown",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            (
                "MEMCHECK_SCOPE",
                "SUITES",
                "TARGET_SCOPE",
                "Case",
                "build_cases",
                "comparisons",
                "sweep_scope",
            ),
            ".cases",
        ),
        **dict.fromkeys(("format_ratio", "interleave", "ratio_stats"), ".rounds"),
        **dict.fromkeys(
            ("InProcess", "Isolated", "Session", "build_case", "measure", "primer_shape"),
            ".measurement",
        ),
        **dict.fromkeys(
            ("hardware", "ratios", "report", "targets", "write_markdown"), ".reporting"
        ),
        **dict.fromkeys(("add_arguments", "main", "run"), ".command"),
    },
)

if TYPE_CHECKING:
    from .cases import (
        MEMCHECK_SCOPE,
        SUITES,
        TARGET_SCOPE,
        Case,
        build_cases,
        comparisons,
        sweep_scope,
    )
    from .command import add_arguments, main, run
    from .measurement import InProcess, Isolated, Session, build_case, measure, primer_shape
    from .reporting import hardware, ratios, report, targets, write_markdown
    from .rounds import format_ratio, interleave, ratio_stats
