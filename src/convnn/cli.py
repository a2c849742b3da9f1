"""The ``convnn`` console command.

Subcommands are entries of :data:`COMMANDS`; add one with :func:`register` (a name, a help line,
a function that adds arguments to its parser and a function that runs it)::

    def _hello_args(p: argparse.ArgumentParser) -> None: ...
    def _hello(args: argparse.Namespace) -> int: ...
    register("hello", "print a greeting", _hello_args, _hello)

or, for a command living in its own module that defines ``add_arguments(parser)`` and
``run(args)``, one line: ``register_module("verify", "check the special cases", "convnn.verify")``.
Keep heavy imports inside the run function so ``convnn --help`` stays fast. Any ``ValueError``
(configuration, dataset, checkpoint problems) or ``OSError`` (a full disk, a missing
permission) is printed as one line ``convnn: error: ...`` and the command exits with status 2; set ``CONVNN_TRACEBACK=1`` to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "COMMANDS",
    "Command",
    "add_trained_model_arguments",
    "build_parser",
    "main",
    "register",
    "register_module",
]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str = ""


COMMANDS: list[Command] = []


def register(
    name: str,
    help: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
    description: str = "",
) -> None:
    """Add (or replace) the subcommand ``name``."""
    COMMANDS[:] = [c for c in COMMANDS if c.name != name]
    COMMANDS.append(Command(name, help, add_args, run, description or help))


def register_module(name: str, help: str, module: str) -> None:
    """Add the subcommand ``name`` implemented by ``module.add_arguments`` and ``module.run``.

    The module is imported only when the parser is built.
    """

    def add_args(p: argparse.ArgumentParser) -> None:
        import importlib

        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)

    register(name, help, add_args, lambda args: args._run(args))


# ---------------------------------------------------------------------------------- shared


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="extend",
        nargs="+",
        default=[],
        help="override config keys, e.g. --set optim.lr=3e-4 model.layer_kwargs.K=9 "
        "(values are YAML; unknown keys are an error listing the valid ones)",
    )


def _keys_epilog() -> str:
    from convnn.train.config import Config, config_to_dict

    lines = ["config keys (defaults):"]
    for section, values in config_to_dict(Config()).items():
        items = ", ".join(f"{k}={v}" for k, v in values.items())
        lines.append(f"  {section}: {items}")
    return "\n".join(lines)


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("no seeds given")
    return seeds


# ----------------------------------------------------------------------------------- train


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="YAML", help="recipe file (see configs/)")
    _add_set(p)
    p.add_argument(
        "--seeds",
        type=_parse_seeds,
        metavar="0,1,2",
        help="train one run per seed (run name suffixed -seed<k>) and report mean +- std",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="RUN_DIR|CHECKPOINT",
        help="continue a run from its last checkpoint; without a path, the run named by "
        "output.name (else the newest run of this model/layer/dataset), or a new run when "
        "there is none yet (so a job script can always pass --resume)",
    )
    p.add_argument("--name", help="run directory name (same as --set output.name=...)")
    p.add_argument("--out-dir", help="parent of run directories (same as --set output.dir=...)")
    p.add_argument("--epochs", type=int, help="same as --set train.epochs=...")
    p.add_argument("--data-dir", help="dataset folder (same as --set data.data_dir=...)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (same as --set train.device=...)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _resolve_train_config(args: argparse.Namespace):
    from pathlib import Path

    from convnn.train.config import load_config

    overrides = list(args.overrides)
    for key, value in (
        ("output.name", args.name),
        ("output.dir", args.out_dir),
        ("train.epochs", args.epochs),
        ("data.data_dir", args.data_dir),
        ("train.device", args.device),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    base = args.config
    resume = getattr(args, "resume", None)
    if base is None and resume not in (None, "auto"):
        # Resuming a given run: its own config is the base.
        run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
        if (run_dir / "config.yaml").exists():
            base = run_dir / "config.yaml"
    return load_config(base, overrides)


def _train(args: argparse.Namespace) -> int:
    import yaml

    from convnn.train.config import config_to_dict
    from convnn.train.distributed import cleanup, init_distributed
    from convnn.train.runner import run_training, train_seeds

    cfg = _resolve_train_config(args)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    dist_info = init_distributed(cfg.train.device)
    try:
        if args.seeds:
            train_seeds(cfg, args.seeds, resume=args.resume, dist_info=dist_info)
        else:
            run_training(cfg, resume=args.resume, dist_info=dist_info)
    finally:
        cleanup()
    return 0


# ------------------------------------------------------------------------------------ eval


def add_trained_model_arguments(p: argparse.ArgumentParser) -> None:
    """The run or checkpoint, config, overrides and split, as ``load_trained_model`` takes them."""
    p.add_argument(
        "path", metavar="RUN_DIR|CHECKPOINT", help="run directory (best weights) or .safetensors"
    )
    p.add_argument(
        "-c",
        "--config",
        metavar="YAML",
        help="config to build the model and data from "
        "(default: the run's config.yaml or the checkpoint's embedded config)",
    )
    _add_set(p)
    p.add_argument("--split", choices=("test", "val", "train"), default="test")


def _eval_args(p: argparse.ArgumentParser) -> None:
    add_trained_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _eval(args: argparse.Namespace) -> int:
    import json

    from convnn.train.distributed import cleanup
    from convnn.train.runner import evaluate_path

    try:
        result = evaluate_path(
            args.path, config=args.config, overrides=args.overrides, split=args.split
        )
    finally:
        cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(
                f"{result['split']} acc {result['acc']:.4f}  loss {result['loss']:.4f}  "
                f"({result['count']} images, {result['img_per_s']:.0f} img/s)  {result['checkpoint']}"
            )
    return 0


# --------------------------------------------------------------------------------- compare


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    p.add_argument("--out", metavar="PNG", help="plot path (default: compare.png beside the runs)")


def _compare(args: argparse.Namespace) -> int:
    from convnn.train.report import compare_runs

    text, png = compare_runs(args.runs, args.out)
    print(text)
    if png is not None:
        print(f"plot: {png}")
    return 0


# ------------------------------------------------------------------------------------ demo


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out-dir", default="runs/demo", help="where the two runs go (default: %(default)s)"
    )
    _add_set(p)


def _demo(args: argparse.Namespace) -> int:
    from convnn.train.demo import run_demo

    run_demo(args.out_dir, args.overrides)
    return 0


register(
    "train",
    "train a model from a YAML recipe",
    _train_args,
    _train,
    "Train a model. Recipes live in configs/; every key can be overridden with --set. "
    "`torchrun --nproc_per_node=N --no-python convnn train ...` (or `torchrun "
    "--nproc_per_node=N -m convnn.cli train ...`) trains the same run with "
    "DistributedDataParallel (data.batch_size is the global batch; only rank 0 writes).",
)
register("eval", "evaluate a run or checkpoint on the test split", _eval_args, _eval)
register("compare", "side-by-side table and plot of run directories", _compare_args, _compare)
register(
    "demo",
    "train a ConvNN branching network and its conv baseline on digits, then compare",
    _demo_args,
    _demo,
)


register_module(
    "verify", "check each special case against the PyTorch module it recovers", "convnn.verify"
)
register_module(
    "bench",
    "time and peak memory of the layers against conv, SDPA and the dense formulation",
    "convnn.bench",
)
register_module(
    "inspect",
    "which neighbours each ConvNN layer of a trained run picks (table and plot)",
    "convnn.inspect",
)


def build_parser() -> argparse.ArgumentParser:
    from convnn import __version__

    parser = argparse.ArgumentParser(
        prog="convnn",
        description="Convolutional Nearest Neighbors: train, evaluate and compare models.",
    )
    parser.add_argument("--version", action="version", version=f"convnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        epilog = _keys_epilog() if cmd.name in ("train", "demo") else None
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(_run=cmd.run)
        cmd.add_args(p)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    except BaseException:
        if not _joined_process_group():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if _joined_process_group():
        # A rank of a torchrun job: leave without interpreter finalization, which can abort
        # with SIGABRT after the work is done (see convnn.train.distributed.exit_now).
        sys.modules["convnn.train.distributed"].exit_now(code)
    return code


def _joined_process_group() -> bool:
    mod = sys.modules.get(
        "convnn.train.distributed"
    )  # never imported by a command that cannot join
    return mod is not None and mod.joined_process_group()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # output piped into a reader that stopped early, e.g. `| head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush stays quiet
        return 0
    except (ValueError, FloatingPointError, OSError) as exc:  # OSError: disk full, permissions
        if os.environ.get("CONVNN_TRACEBACK"):
            raise
        print(f"convnn: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convnn: interrupted; continue a training run with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
