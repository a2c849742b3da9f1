"""Training configuration: a tree of dataclasses, YAML files and ``--set key=value`` overrides.

Every option has a default, so an empty YAML file is a valid recipe. Keys are dotted paths
(``optim.lr``, ``model.layer_kwargs.K``); an unknown key is a :class:`ConfigError` that lists
the valid ones.

A value is checked twice, each time with a one-line :class:`ConfigError` that names the key,
what it accepts and what came:

- when it is set, against the field's declared type (``int``, ``float``, ``X | None``,
  ``tuple[float, float]``, ``dict[str, Any]``, ...; an int is accepted where a float is; see
  :mod:`convnn.train.typecheck`);
- once the whole configuration is resolved (:func:`validate_config`), against the key's entry
  in :data:`RULES` (a range, a set of choices, a pattern), so that a rule relating two keys
  sees both final values. Every key has an entry there; a new key needs one too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import yaml

from .typecheck import TypeMismatch, conform, describe_value

__all__ = [
    "RULES",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "Rule",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "save_config",
    "validate_config",
    "valid_keys",
]


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")


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
    val_size: int | float = 0.1  # held out for model selection: a fraction, or an image count
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
    betas: tuple[float, float] = (0.9, 0.999)  # adamw only
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


# ------------------------------------------------------------------------------------ types


class _Loader(yaml.SafeLoader):
    """YAML as in recipes and ``--set``, with YAML 1.2 floats: ``1e-4`` is a number, not the
    string PyYAML's YAML 1.1 rules make of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: Any) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


def _set(node: Any, name: str, key: str, value: Any) -> None:
    """Set field ``name`` of the dataclass ``node`` (dotted ``key``) after checking its type."""
    tp = typing.get_type_hints(type(node))[name]
    try:
        converted = conform(value, tp, key)
    except TypeMismatch as e:
        raise ConfigError(
            f"config key {e.where!r} must be {e.expected}, got {describe_value(e.value)}"
        ) from None
    setattr(node, name, converted)


# ------------------------------------------------------------------------------------ rules


@dataclass(frozen=True)
class Rule:
    """What a key accepts beyond its type: ``ok(value, cfg)``, and ``expected`` in words
    (a string, or a function of the config for rules that depend on another key)."""

    ok: Callable[[Any, Config], bool]
    expected: str | Callable[[Config], str]

    def describe(self, cfg: Config) -> str:
        return self.expected(cfg) if callable(self.expected) else self.expected


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: float) -> Rule:
    return Rule(lambda v, cfg: _finite(v) and v >= low, f">= {low}")


def above(low: float) -> Rule:
    return Rule(lambda v, cfg: _finite(v) and v > low, f"> {low}")


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Rule:
    def ok(v: Any, cfg: Config) -> bool:
        if not _finite(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    return Rule(ok, f"in {lo}{low}, {high}{hi}")


def one_of(choices: Sequence[str] | Callable[[Config], Sequence[str]]) -> Rule:
    def listed(cfg: Config) -> Sequence[str]:
        return choices(cfg) if callable(choices) else choices

    return Rule(lambda v, cfg: v in listed(cfg), lambda cfg: "one of " + ", ".join(listed(cfg)))


def matches(pattern: str, expected: str) -> Rule:
    return Rule(lambda v, cfg: re.fullmatch(pattern, v) is not None, expected)


def each(rule: Rule, what: str) -> Rule:
    """Every item of a list satisfies ``rule``; ``what`` names the list ('2 numbers')."""
    return Rule(
        lambda v, cfg: all(rule.ok(x, cfg) for x in v),
        lambda cfg: f"{what} each {rule.describe(cfg)}",
    )


ANY = Rule(lambda v, cfg: True, "any value")  # the declared type says everything
NON_EMPTY = Rule(lambda v, cfg: v.strip() != "", "a non-empty string")


def _models(cfg: Config) -> list[str]:
    from convnn.models import list_models

    return list_models()


def _layers(cfg: Config) -> list[str]:
    from convnn.models import layer_choices

    return layer_choices(cfg.model.name)


def _datasets(cfg: Config) -> list[str]:
    from convnn.data import list_datasets

    return list_datasets()


RULES: dict[str, Rule] = {
    "model.name": one_of(_models),
    "model.layer": Rule(
        lambda v, cfg: v in _layers(cfg),
        lambda cfg: f"one of {', '.join(_layers(cfg))} (the layers of {cfg.model.name})",
    ),
    "model.img_size": at_least(1),
    "model.patch_size": at_least(1),
    "model.layer_kwargs": ANY,  # names checked by create_model, values by the layers
    "data.dataset": one_of(_datasets),
    "data.data_dir": NON_EMPTY,
    "data.val_size": Rule(
        lambda v, cfg: _finite(v) and (0 <= v < 1 if isinstance(v, float) else v >= 0),
        "a fraction in [0, 1) or an image count >= 0",
    ),
    "data.batch_size": at_least(1),
    "data.eval_batch_size": at_least(1),
    "data.num_workers": at_least(0),
    "data.drop_last": ANY,
    "data.crop_padding": at_least(0),
    "data.flip": ANY,
    "data.mixup": at_least(0),
    "data.cutmix": at_least(0),
    "data.normalize": ANY,
    "optim.name": one_of(OPTIMIZERS),
    "optim.lr": above(0),
    "optim.weight_decay": at_least(0),
    "optim.momentum": between(0, 1, high_open=True),
    "optim.nesterov": Rule(
        lambda v, cfg: not (v and cfg.optim.name == "sgd" and cfg.optim.momentum == 0),
        "false when optim.momentum is 0 (Nesterov needs momentum)",
    ),
    "optim.betas": each(between(0, 1, high_open=True), "2 numbers"),
    "optim.eps": above(0),
    "optim.decay_norm_and_bias": ANY,
    "sched.name": one_of(SCHEDULES),
    "sched.warmup_epochs": at_least(0),
    "sched.warmup_start_factor": between(0, 1),
    "sched.min_lr": Rule(
        lambda v, cfg: _finite(v) and 0 <= v <= cfg.optim.lr,
        lambda cfg: f"in [0, optim.lr] = [0, {cfg.optim.lr}]",
    ),
    "sched.step_epochs": at_least(1),
    "sched.gamma": between(0, 1, low_open=True),
    "train.epochs": at_least(1),
    "train.seed": between(0, 2**63 - 1),
    "train.label_smoothing": between(0, 1),
    "train.grad_clip": at_least(0),
    "train.amp": ANY,
    "train.compile": ANY,
    "train.device": matches(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"),
    "train.deterministic": ANY,
    "train.num_threads": at_least(0),
    "train.sync_bn": ANY,
    "train.checkpoint_every_steps": at_least(0),
    "train.max_steps_per_epoch": at_least(0),
    "output.dir": NON_EMPTY,
    "output.name": matches(
        r"(?!\.\.?$)[^/\\]+", "a folder name (not empty, '.' or '..', no '/' or '\\')"
    ),
    "output.progress": ANY,
}


def _leaves(cfg: Any, prefix: str = ""):
    """(dotted key, owning dataclass, field name) of every key, in declaration order."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", cfg, f.name


def validate_config(cfg: Config) -> Config:
    """Check every key's type and its rule in :data:`RULES`; the first violation is a
    :class:`ConfigError`. Returns ``cfg``."""
    for key, node, name in _leaves(cfg):
        _set(node, name, key, getattr(node, name))  # values assigned in code are checked too
    for key, node, name in _leaves(cfg):
        value, rule = getattr(node, name), RULES[key]
        if value is not None and not rule.ok(value, cfg):
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"config key {key!r} must be {rule.describe(cfg)}, got {shown!r}")
    return cfg


# ---------------------------------------------------------------------------- building


def valid_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    """All dotted keys of the configuration tree, in declaration order."""
    return [key for key, _, _ in _leaves(Config() if cfg is None else cfg, prefix)]


def _unknown(key: str, valid: list[str]) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")


def _merge(node: Any, data: dict, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(
            f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, "
            f"got {describe_value(data)}"
        )
    names = {f.name for f in fields(node)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise _unknown(path, valid_keys())
        current = getattr(node, key)
        if is_dataclass(current):
            _merge(current, value if value is not None else {}, f"{path}.")
        else:
            _set(node, key, path, value)


def config_from_dict(data: dict | None) -> Config:
    """Build a :class:`Config` from a (possibly partial) nested mapping (types checked; the
    rules are checked by :func:`validate_config`)."""
    cfg = Config()
    _merge(cfg, data or {}, "")
    return cfg


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Config) -> dict:
    """The configuration as plain YAML/JSON data (tuples as lists)."""
    return _plain(dataclasses.asdict(cfg))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe (or the defaults when ``path`` is None), apply ``key=value``
    overrides and validate the result."""
    data: dict = {}
    if path is not None:
        where = f"config file {os.fspath(path)!r}"
        try:
            with open(path, encoding="utf-8") as f:
                data = _yaml(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{where} not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{where} is a folder; expected a YAML recipe file") from None
        except OSError as e:
            raise ConfigError(f"{where} cannot be read ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where} is not UTF-8 text; expected a YAML recipe") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"{where} is not valid YAML{at}") from None
    cfg = config_from_dict(data)
    apply_overrides(cfg, overrides)
    return validate_config(cfg)


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=3e-4)")
    try:
        value = _yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` strings in order (in place; types checked); returns ``cfg``.

    Values are YAML, except that a key declared as text takes the text as written
    (``output.name=2024`` is the name "2024", not a type error)."""
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
        if isinstance(value, (bool, int, float)) and _takes_text(node, leaf):
            value = text.partition("=")[2].strip()  # --name 2024 names the run "2024"
        _set(node, leaf, key, value)
    return cfg


def _takes_text(node: Any, name: str) -> bool:
    try:
        conform("text", typing.get_type_hints(type(node))[name], name)
    except TypeMismatch:
        return False
    return True


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    from .checkpoint import atomic_write_bytes

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write_bytes(path, text.encode("utf-8"))
