"""``convnn train``: train (or continue) a run from a YAML recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_run_arguments, keys_epilog, parse_seeds, run_overrides

DESCRIPTION = (
    "Train a model. Recipes live in configs/; every key can be overridden with --set. "
    "`torchrun --nproc_per_node=N --no-python convnn train ...` (or `torchrun "
    "--nproc_per_node=N -m convnn.cli train ...`) trains the same run with "
    "DistributedDataParallel (data.batch_size is the global batch; only rank 0 writes)."
)


def epilog() -> str:
    return keys_epilog()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument(
        "--seeds",
        type=parse_seeds,
        metavar="0,1,2",
        help="train one run per seed (run name suffixed -seed<k>), report mean +- std and "
        "write it to seeds.json in each run directory",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="RUN_DIR|CHECKPOINT",
        help="continue a run from its last checkpoint; without a path, the run named by "
        "output.name (else the newest run of this model/layer/dataset), or a new run when "
        "there is none yet (so a job script can always pass --resume). Changed settings are "
        "applied (learning rate, schedule, epochs, ...); changes to the model, dataset, "
        "validation split, optimizer kind or seed are refused",
    )


def resolve_config(args: argparse.Namespace):
    """The recipe (or, resuming a given run without -c, the run's own config.yaml) with the
    overrides, checked: every value and the model's options, before anything heavy."""
    from convnn.train.config import load_config
    from convnn.train.engine import check_model_config

    base = args.config
    resume = getattr(args, "resume", None)
    if base is None and resume not in (None, "auto"):
        run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
        if (run_dir / "config.yaml").exists():
            base = run_dir / "config.yaml"
    cfg = load_config(base, run_overrides(args))
    check_model_config(cfg)
    return cfg


def run(args: argparse.Namespace) -> int:
    import yaml

    from convnn.train.config import config_to_dict
    from convnn.train.distributed import cleanup, init_distributed
    from convnn.train.runner import run_training
    from convnn.train.seeds import train_seeds

    cfg = resolve_config(args)
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
