"""Arguments shared by several subcommands, and the help text that lists the config keys."""

from __future__ import annotations

import argparse
from typing import Any

from . import choices

__all__ = [
    "add_run_arguments",
    "add_set",
    "add_trained_model_arguments",
    "keys_epilog",
    "parse_seeds",
    "run_overrides",
]


def add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="extend",
        nargs="+",
        default=[],
        help="override config keys, e.g. --set optim.lr=3e-4 model.layer_kwargs.K=9 "
        "(values are YAML; unknown keys are an error listing the valid ones; the keys and "
        "their allowed values are listed below)",
    )


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("no seeds given")
    return seeds


# Shortcut options of the commands that train: (flag, config key, type, help).
SHORTCUTS = (
    ("--name", "output.name", str, "run directory name"),
    ("--out-dir", "output.dir", str, "parent of run directories"),
    ("--epochs", "train.epochs", int, "number of epochs"),
    ("--data-dir", "data.data_dir", str, "dataset folder"),
    ("--device", "train.device", str, "auto, cpu, cuda or cuda:N"),
)


def add_run_arguments(p: argparse.ArgumentParser, *, name_help: str | None = None) -> None:
    """-c/--config, --set and the shortcuts of common keys."""
    p.add_argument("-c", "--config", metavar="YAML", help="recipe file (see configs/)")
    add_set(p)
    for flag, key, kind, text in SHORTCUTS:
        if flag == "--name" and name_help:
            text = name_help
        p.add_argument(flag, type=kind, help=f"{text} (same as --set {key}=...)")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="check and print the resolved config, then exit",
    )


def run_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides followed by the shortcut options given."""
    overrides = list(args.overrides)
    for flag, key, _, _ in SHORTCUTS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides


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
    add_set(p)
    p.add_argument(
        "--split",
        choices=("test", "val", "train"),
        default="test",
        help="which split of the run's dataset to use: %(choices)s (default: %(default)s)",
    )


def _static_choices(key: str, cfg: Any) -> list[str] | None:
    """The allowed values of ``key`` (None: not a choice), without importing torch."""
    from convnn.data.catalog import list_datasets
    from convnn.train.config import RULES

    if key == "model.name":
        return choices.model_names()
    if key == "model.layer":
        return list(choices.MODEL_LAYERS.get(cfg.model.name, choices.layer_names()))
    if key == "data.dataset":
        return list_datasets()
    listed = RULES[key].choices
    return None if listed is None or callable(listed) else list(listed)


def keys_epilog(cfg: Any = None, title: str = "config keys (defaults)") -> str:
    """Every config key with its value in ``cfg`` (default: the defaults) and, for a key that
    takes one of a few names, the names it allows."""
    from convnn.train.config import Config, key_help, valid_keys

    cfg = cfg if cfg is not None else Config()
    lines = [f"{title}; allowed values in [...]:"]
    section = None
    for key in valid_keys():
        head, _, name = key.partition(".")
        node = getattr(cfg, head)
        value = getattr(node, name)
        if isinstance(value, tuple):
            value = list(value)
        if head != section:
            section = head
            lines.append(f"  {head}:")
        allowed = _static_choices(key, cfg)
        text = f"    {name}={value}  {key_help(key)}"
        if allowed is not None:
            text += f" [{' | '.join(allowed)}]"
        if key == "model.layer_kwargs":
            text += f" [{choices.LAYER_OPTIONS}]"
        lines.append(text)
    models = ", ".join(
        f"{m} ({'/'.join(choices.MODEL_LAYERS[m])})" for m in ("small_cnn", "resnet18", "vit_tiny")
    )
    lines.append(
        f"  layers by model: CNNs (small_cnn, resnet*, vgg*) take {', '.join(choices.CNN_LAYERS)}; "
        f"ViTs (vit_*) take {', '.join(choices.VIT_LAYERS)}; e.g. {models}"
    )
    return "\n".join(lines)
