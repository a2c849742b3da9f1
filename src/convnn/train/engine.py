"""Building blocks of a training run: model, optimizer, schedule, loss and the epoch loops.

Randomness is a function of (seed, epoch, rank) only: the data order comes from the loader's
``set_epoch``, augmentation from a generator seeded per epoch, and model randomness (dropout,
random ConvNN candidates) from the global torch RNG re-seeded at the start of every epoch.
A run resumed from any checkpoint therefore replays bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import Config, ConfigError, OptimConfig, ScheduleConfig
from .distributed import DistInfo, all_reduce_sum
from .metrics import Meter, correct_count

__all__ = [
    "EpochState",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "check_model_config",
    "count_params",
    "derive_seed",
    "evaluate",
    "loss_sum",
    "lr_factor",
    "model_identity",
    "set_schedule_step",
    "setup_torch",
    "to_device",
    "train_one_epoch",
]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def setup_torch(cfg: Config) -> None:
    """Thread count and determinism switches (process-wide)."""
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_identity(cfg: Config, spec: Any) -> dict[str, Any]:
    """What a checkpoint must agree on to be loaded into this run's model."""
    return {
        "name": cfg.model.name,
        "layer": cfg.model.layer,
        "num_classes": int(spec.num_classes),
        "in_chans": int(spec.in_chans),
    }


def _model_kwargs(cfg: Config) -> dict[str, Any]:
    kwargs = dict(cfg.model.layer_kwargs)
    if cfg.model.patch_size is not None:
        kwargs["patch_size"] = cfg.model.patch_size
    return kwargs


def build_model(cfg: Config, spec: Any) -> torch.nn.Module:
    """The configured model for a dataset ``spec`` (num_classes, in_chans, img_size)."""
    from .zoo import create

    return create(
        cfg.model.name,
        num_classes=int(spec.num_classes),
        in_chans=int(spec.in_chans),
        img_size=int(cfg.model.img_size or spec.img_size),
        layer=cfg.model.layer,
        **_model_kwargs(cfg),
    )


def check_model_config(cfg: Config) -> None:
    """Build the configured model on the meta device (no memory, no data), so that a bad
    ``model.layer_kwargs`` option or value is a :class:`ConfigError` before any heavy setup.

    The dataset's class count and channels come from its catalogue entry (an image folder's
    classes are not known before it is read; any count builds the same layers)."""
    from convnn.data.catalog import DATASETS

    from .zoo import create

    info = DATASETS[cfg.data.dataset]
    try:
        with torch.device("meta"):
            create(
                cfg.model.name,
                num_classes=info.num_classes or 2,
                in_chans=info.in_chans,
                img_size=int(cfg.model.img_size or info.img_size),
                layer=cfg.model.layer,
                **_model_kwargs(cfg),
            )
    except (ValueError, TypeError) as e:
        text = " ".join(str(e).split())
        raise ConfigError(
            f"model {cfg.model.name} with layer {cfg.model.layer} and layer_kwargs "
            f"{cfg.model.layer_kwargs} cannot be built: {text}"
        ) from None
    except (RuntimeError, NotImplementedError):
        pass  # an operation the meta device lacks: the real build checks the options


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    """AdamW or SGD at ``lr`` (default ``cfg.lr``; a run passes :func:`effective_lr`); by
    default biases and norm weights (1-d tensors) get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if cfg.decay_norm_and_bias or p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    name, lr = cfg.name.lower(), cfg.lr if lr is None else lr
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ConfigError(f"optim.name {cfg.name!r} is not supported; choose adamw or sgd")


def lr_factor(step: int, cfg: ScheduleConfig, base_lr: float, steps_per_epoch: int, epochs: int):
    """The learning-rate multiplier at optimizer step ``step`` (linear warm-up, then decay)."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / warmup
    name = cfg.name.lower()
    if name == "constant":
        return 1.0
    if name == "step":
        return cfg.gamma ** (step // max(1, cfg.step_epochs * steps_per_epoch))
    if name == "cosine":
        floor = cfg.min_lr / base_lr if base_lr else 0.0
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    raise ConfigError(f"sched.name {cfg.name!r} is not supported; choose cosine, step or constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following :func:`lr_factor`. ``sched.min_lr`` is in the units of
    ``optim.lr``: when the learning rate is scaled to the batch (:func:`effective_lr`), so is
    its floor."""
    base = cfg.optim.lr
    lr_factor(0, cfg.sched, base, steps_per_epoch, cfg.train.epochs)  # validate name
    fn = lambda step: lr_factor(step, cfg.sched, base, steps_per_epoch, cfg.train.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def set_schedule_step(optimizer: torch.optim.Optimizer, scheduler: Any, step: int) -> None:
    """Put a LambdaLR at optimizer step ``step``: every group's lr is its base lr times the
    schedule's factor there (what ``scheduler.step()`` would have set)."""
    scheduler.last_epoch = step
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def loss_sum(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Summed cross entropy; ``targets`` are class indices or soft (B, classes) targets."""
    logits = logits.float()
    if targets.ndim == 2:
        return -(targets * F.log_softmax(logits, dim=1)).sum()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="sum")


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def _progress(total: int, desc: str, enabled: bool):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


@dataclass
class EpochState:
    """Everything needed to continue an epoch from its ``step`` (checkpointed mid-epoch)."""

    epoch: int
    step: int = 0  # optimizer steps done in this epoch
    meter: Meter = field(default_factory=Meter)
    seconds: float = 0.0  # training time spent in this epoch so far


def seed_epoch(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Re-seed model randomness (all devices) for ``epoch``; returns the augmentation generator."""
    torch.manual_seed(derive_seed("model", seed, epoch, rank))
    return torch.Generator().manual_seed(derive_seed("augment", seed, epoch, rank))


def rng_state(gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "augment": gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], gen: torch.Generator, device: torch.device):
    torch.set_rng_state(state["torch"])
    gen.set_state(state["augment"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """A batch on ``device``, in channels-last layout when asked and 4-D."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_one_epoch(
    *,
    model: torch.nn.Module,
    loader: Any,
    augment: Callable,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: Config,
    dist_info: DistInfo,
    state: EpochState,
    generator: torch.Generator,
    steps: int,
    ema: Any = None,
    on_step: Callable[[EpochState], None] | None = None,
) -> EpochState:
    """Train for ``steps`` optimizer steps of one epoch, starting at ``state.step``.

    Each step adds up the gradients of ``train.accum_steps`` batches (their mean over all the
    images of the step), clips them if asked, steps the optimizer and the schedule, and updates
    ``ema`` (an ``AveragedModel``) when given; ``on_step`` runs after every step. A loss that is
    not finite raises ``FloatingPointError``.
    """
    device, tc = dist_info.device, cfg.train
    accum = tc.accum_steps
    model.train()
    loader.set_epoch(state.epoch)
    show = cfg.output.progress and dist_info.is_main
    bar = _progress(steps, f"epoch {state.epoch + 1}/{tc.epochs}", show)
    if bar is not None:
        bar.update(state.step)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tick = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        step, micro = divmod(i, accum)
        if step >= steps:
            break
        if step < state.step:  # already done before the checkpoint we resumed from
            continue
        if micro == 0:
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_correct, step_count = 0.0, 0, 0
        x = to_device(x, device, tc.channels_last)
        y = y.to(device, non_blocking=True)
        x, targets = augment(x, y, train=True, generator=generator)
        last = micro == accum - 1
        # DDP averages gradients over processes once per step, on the last batch.
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with _autocast(device, tc.amp):
                logits = model(x)
            loss = loss_sum(logits, targets, tc.label_smoothing)
            # Every process holds an equal share of the global batch, so DDP's average of the
            # per-process means is the mean over all the images of the step.
            (loss / (x.shape[0] * accum)).backward()
        step_loss += float(loss.detach())
        step_correct += correct_count(logits.detach(), y)
        step_count += y.shape[0]
        if not last:
            continue
        if not math.isfinite(step_loss):
            raise FloatingPointError(
                f"training loss is {step_loss} at epoch {state.epoch + 1} step {step + 1}; "
                "lower optim.lr (or set optim.lr_batch_size to scale it to the batch) or set "
                "train.grad_clip"
            )
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(getattr(model, "module", model))
        state.meter.update(step_loss, step_correct, step_count)
        state.step = step + 1
        now = time.perf_counter()
        state.seconds += now - tick
        tick = now
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{state.meter.avg_loss:.4f}",
                acc=f"{state.meter.acc:.4f}",
                img_s=f"{state.meter.count * dist_info.world_size / max(state.seconds, 1e-9):.0f}",
            )
        if on_step is not None:
            on_step(state)
            tick = time.perf_counter()  # checkpoint writes do not count as training time
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return state


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    augment: Callable,
    dist_info: DistInfo,
    *,
    num_samples: int,
    amp: bool = False,
    channels_last: bool = False,
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy and throughput over a whole split (summed over all
    processes).

    ``loader`` is unshuffled and, when distributed, sharded like ``DistributedSampler``: rank r
    sees samples r, r + W, ... padded with repeats, so each rank counts only its first
    ceil((num_samples - r) / W) samples and every sample is counted exactly once.
    """
    device = dist_info.device
    model.eval()
    meter, top5 = Meter(), 0
    left = -(-(num_samples - dist_info.rank) // dist_info.world_size)
    start = time.perf_counter()
    for x, y in loader:
        x, y = x[:left], y[:left]
        left -= x.shape[0]
        if x.shape[0] == 0:
            break
        x = to_device(x, device, channels_last)
        y = y.to(device, non_blocking=True)
        x, targets = augment(x, y, train=False)
        with _autocast(device, amp):
            logits = model(x)
        meter.update(float(loss_sum(logits, targets, 0.0)), correct_count(logits, y), y.shape[0])
        top5 += correct_count(logits, y, k=5)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    *sums, top5 = all_reduce_sum([*meter.state(), top5], device)
    total = Meter(*sums)
    return {
        "loss": total.avg_loss,
        "acc": total.acc,
        "acc5": top5 / total.count if total.count else float("nan"),
        "count": int(total.count),
        "seconds": seconds,
        "img_per_s": total.count / seconds if seconds > 0 else float("nan"),
    }
