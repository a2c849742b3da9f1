"""``convnn bench``: time and peak memory of ConvNN layers against their dense and PyTorch twins.

Every case builds one module with a fixed seed, warms it up and times forward, backward and
forward+backward (median of several repeats) on a training step with gradients for the input
and the parameters. Peak memory is measured above a baseline taken after the module, the input
and the output gradient exist:

- CPU: each case runs in a fresh ``python -m convnn.bench --case <json>`` process; the peak
  resident set (VmHWM, reset just before the case, so imports do not count; ``ru_maxrss`` where
  /proc cannot be reset) minus the resident set right before the case;
- CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the case.

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

The package: :mod:`.cases` (what is measured, no torch), :mod:`.measurement` (one case, here or
in a fresh process), :mod:`.reporting` (ratios, targets, tables), :mod:`.command` (the command).
Names load on first use.
"""

from typing import TYPE_CHECKING

from ..utils import lazy_exports

__all__ = [
    "MEMCHECK_SCOPE",
    "SUITES",
    "TARGET_SCOPE",
    "Case",
    "add_arguments",
    "build_case",
    "build_cases",
    "hardware",
    "main",
    "measure",
    "primer_shape",
    "ratios",
    "report",
    "run",
    "run_isolated",
    "sweep_scope",
    "targets",
    "write_markdown",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            ("MEMCHECK_SCOPE", "SUITES", "TARGET_SCOPE", "Case", "build_cases", "sweep_scope"),
            ".cases",
        ),
        **dict.fromkeys(("build_case", "measure", "primer_shape", "run_isolated"), ".measurement"),
        **dict.fromkeys(
            ("hardware", "ratios", "report", "targets", "write_markdown"), ".reporting"
        ),
        **dict.fromkeys(("add_arguments", "main", "run"), ".command"),
    },
)

if TYPE_CHECKING:
    from .cases import MEMCHECK_SCOPE, SUITES, TARGET_SCOPE, Case, build_cases, sweep_scope
    from .command import add_arguments, main, run
    from .measurement import build_case, measure, primer_shape, run_isolated
    from .reporting import hardware, ratios, report, targets, write_markdown
