"""Training configuration: a tree of dataclasses, YAML files and ``--set key=value`` overrides.

Every option has a default, so an empty YAML file is a valid recipe. Keys are dotted paths
(``optim.lr``, ``model.layer_kwargs.K``); an unknown key is a :class:`ConfigError` that lists
the valid ones.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "save_config",
    "valid_keys",
]


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


@dataclass
class ModelConfig:
    name: str = "resnet18"  # vgg11/13/16/19, resnet18/34/50, vit_tiny/small/base
    layer: str = "conv"  # conv|convnn|branching (CNNs); attention|convnn_attention|kvt|... (ViT)
    img_size: int | None = None  # None: the dataset's native size
    patch_size: int | None = None  # ViT only; None: the model's default
    layer_kwargs: dict[str, Any] = field(default_factory=dict)  # K, ratio, metric, candidates, ...


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits|cifar10|cifar100|imagefolder
    data_dir: str | None = None
    val_size: float = 0.1  # fraction of the training set held out for model selection
    batch_size: int = 128  # global batch (split evenly over distributed processes)
    eval_batch_size: int | None = None  # None: same as batch_size
    num_workers: int = 0
    drop_last: bool = True  # drop the last incomplete training batch
    crop_padding: int = 0  # random-crop augmentation padding in pixels (0: off)
    flip: bool = False  # random horizontal flips
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    normalize: bool = True  # subtract the dataset mean, divide by the std


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw|sgd
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    eps: float = 1e-8  # adamw only
    decay_norm_and_bias: bool = False  # apply weight decay to biases and norm weights too


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine|step|constant; stepped every optimizer step
    warmup_epochs: float = 0.0  # linear warm-up length (fractions allowed)
    warmup_start_factor: float = 0.01  # lr multiplier at the first warm-up step
    min_lr: float = 0.0  # cosine floor
    step_epochs: int = 30  # step schedule: decay every this many epochs
    gamma: float = 0.1  # step schedule: decay factor


@dataclass
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max global grad norm (0: off)
    amp: bool = False  # bf16 autocast
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto|cpu|cuda|cuda:N
    deterministic: bool = False  # deterministic algorithms (slower on GPU)
    num_threads: int = 0  # CPU threads per process (0: torch default)
    sync_bn: bool = False  # SyncBatchNorm under DistributedDataParallel
    checkpoint_every_steps: int = 0  # extra mid-epoch checkpoints (0: only at epoch ends)
    max_steps_per_epoch: int = 0  # cap on training steps per epoch (0: full epoch)


@dataclass
class OutputConfig:
    dir: str = "runs"  # parent folder of run directories
    name: str | None = None  # run directory name; None: model-layer-dataset-timestamp
    progress: bool = True  # progress bar (only on a terminal, only on rank 0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# Dict-valued fields accept any sub-key (they are passed through as keyword arguments).
_FREE_DICTS = {"model.layer_kwargs"}


def valid_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    """All dotted keys of the configuration tree, in declaration order."""
    cfg = Config() if cfg is None else cfg
    keys: list[str] = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            keys += valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown(key: str, valid: list[str]) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")


def _coerce(key: str, value: Any, default: Any, annotation: str) -> Any:
    """Check ``value`` against the field's declared type; ints are accepted where floats are."""
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"config key {key!r} may not be null (expected {annotation})")
    if "float" in annotation and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if "float" in annotation and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        except ValueError:
            pass
    expected: tuple[type, ...] = ()
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if annotation.startswith(name) or f"| {name}" in annotation:
            expected += (typ,)
    if annotation.startswith("list"):
        expected = (list, tuple)
    if annotation.startswith("dict"):
        expected = (dict,)
    ok = isinstance(value, expected) and not (
        isinstance(value, bool) and bool not in expected and int in expected
    )
    if expected and not ok:
        raise ConfigError(
            f"config key {key!r} expects {annotation}, got {value!r} ({type(value).__name__})"
        )
    return list(value) if isinstance(value, tuple) else value


def _merge(node: Any, data: dict, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping")
    by_name = {f.name: f for f in fields(node)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in by_name:
            raise _unknown(path, valid_keys())
        current = getattr(node, key)
        if is_dataclass(current):
            _merge(current, value if value is not None else {}, f"{path}.")
        else:
            annotation = str(by_name[key].type)
            setattr(node, key, _coerce(path, value, current, annotation))


def config_from_dict(data: dict | None) -> Config:
    """Build a :class:`Config` from a (possibly partial) nested mapping."""
    cfg = Config()
    _merge(cfg, data or {}, "")
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} not found") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}") from None
    cfg = config_from_dict(data)
    apply_overrides(cfg, overrides)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` strings in order (in place); returns ``cfg``."""
    valid = valid_keys()
    for text in overrides:
        key, value = parse_override(text)
        free = next((d for d in _FREE_DICTS if key.startswith(d + ".")), None)
        if free is not None:  # model.layer_kwargs.K=9
            section, _, attr = free.rpartition(".")
            getattr(getattr(cfg, section), attr)[key[len(free) + 1 :]] = value
            continue
        if key not in valid:
            raise _unknown(key, valid)
        node: Any = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        annotation = str(next(f.type for f in fields(node) if f.name == leaf))
        setattr(node, leaf, _coerce(key, value, getattr(node, leaf), annotation))
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    from .checkpoint import atomic_write_bytes

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write_bytes(path, text.encode("utf-8"))
