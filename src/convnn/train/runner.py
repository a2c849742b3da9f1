"""A whole training run: run directory, epochs, checkpoints, model selection, final test.

Run directory (``<output.dir>/<output.name or model-layer-dataset-timestamp>``)::

    config.yaml              resolved configuration
    metrics.csv              one row per epoch (see METRIC_COLUMNS)
    curves.png               learning curves
    checkpoint.safetensors   last state (weights, optimizer, scheduler, RNG, history)
    best.safetensors         weights of the epoch with the best validation accuracy
    summary.json             test accuracy of the best-validation weights, params, throughput

Only rank 0 writes. Model selection uses the validation split, never the test set.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch

from .checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    check_metadata,
    load_checkpoint,
    load_weights,
    restore_training_state,
    save_checkpoint,
)
from .config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    validate_config,
)
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, init_distributed
from .engine import (
    EpochState,
    build_model,
    build_optimizer,
    build_scheduler,
    count_params,
    derive_seed,
    evaluate,
    lr_factor,
    model_identity,
    rng_state,
    seed_epoch,
    set_rng_state,
    train_one_epoch,
)
from .metrics import METRIC_COLUMNS, Meter, format_mean_std, write_metrics_csv

__all__ = [
    "BEST",
    "CHECKPOINT",
    "TrainedModel",
    "evaluate_path",
    "load_trained_model",
    "resolve_run_dir",
    "run_training",
    "train_seeds",
]

CHECKPOINT = "checkpoint.safetensors"
BEST = "best.safetensors"
# Fault injection for tests: the process SIGKILLs itself after this many optimizer steps.
KILL_ENV = "CONVNN_KILL_AT_STEP"


HistoryRow = TypedDict(
    "HistoryRow", {c: int if c == "epoch" else float for c in METRIC_COLUMNS}
)  # one row of metrics.csv


class Best(TypedDict):
    epoch: int
    val_acc: float
    val_loss: float


class TrainState(TypedDict):
    """The ``state`` a run's checkpoint.safetensors holds (see :meth:`Run._state`)."""

    epoch: int  # epochs finished
    step_in_epoch: int  # optimizer steps done in the next epoch (mid-epoch checkpoint)
    global_step: int
    meter: tuple[float, float, float]
    epoch_seconds: float
    history: list[HistoryRow]
    best: Best | None
    config: dict[str, Any]


def _say(dist_info: DistInfo, *args: Any) -> None:
    if dist_info.is_main:
        print(*args, flush=True)


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


def default_run_name(cfg: Config) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.model.name}-{cfg.model.layer}-{cfg.data.dataset}-{stamp}"


def _check_folder(path: Path, what: str) -> None:
    """``path`` is a folder or can be made one: the nearest existing part of it is a folder."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                which = "is a file" if part == path else f"lies inside the file {str(part)!r}"
                raise ConfigError(
                    f"{what} must be a folder (created when missing), got {str(path)!r}, "
                    f"which {which}"
                )
            return


def _new_run_dir(cfg: Config) -> Path:
    out = Path(cfg.output.dir)
    run_dir = out / (cfg.output.name or default_run_name(cfg))
    if not cfg.output.name:
        n = 1
        while run_dir.exists():
            run_dir = out / f"{default_run_name(cfg)}-{n}"
            n += 1
    return run_dir


def _latest_run(cfg: Config) -> Path | None:
    """The run ``--resume`` without a path continues: the one named by ``output.name``, else
    the newest ``model-layer-dataset-*`` run under ``output.dir``; None when there is none."""
    out = Path(cfg.output.dir)
    if cfg.output.name:
        return out / cfg.output.name if (out / cfg.output.name).exists() else None
    prefix = f"{cfg.model.name}-{cfg.model.layer}-{cfg.data.dataset}-"
    found = sorted(
        (p for p in out.glob(prefix + "*") if (p / "config.yaml").exists()),
        key=lambda p: p.stat().st_mtime,
    )
    return found[-1] if found else None


def resolve_run_dir(cfg: Config, resume: str | None) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from or None).

    ``resume``: None (new run), ``"auto"`` (the run named by ``output.name``, else the newest
    ``model-layer-dataset-*`` run under ``output.dir``; a new run when there is none, so that a
    job script can always pass ``--resume``) or a run directory / checkpoint file, which must
    exist.
    """
    if resume not in (None, "auto"):
        path = Path(resume)
        if path.is_file():
            return path.parent, path
        if not path.is_dir():
            raise CheckpointError(
                f"--resume expects a run directory or checkpoint, got {resume!r}, which does "
                "not exist; pass --resume without a path to continue the latest run"
            )
        run_dir = path
    else:
        _check_folder(Path(cfg.output.dir), "output.dir (--out-dir)")
        run_dir = _latest_run(cfg) if resume == "auto" else None
        if run_dir is None:
            run_dir = _new_run_dir(cfg)
            if (run_dir / CHECKPOINT).exists():
                raise ConfigError(
                    f"run directory {str(run_dir)!r} already holds a checkpoint; pass --resume "
                    "to continue it, or set output.name to start a new run"
                )
    _check_folder(run_dir, "the run directory (output.dir/output.name)")
    ckpt = run_dir / CHECKPOINT
    return run_dir, (ckpt if ckpt.exists() else None)  # None: new, or killed before a checkpoint


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "layer_kwargs":
            changes += _config_changes(a, b, f"{prefix}{key}.")
        elif a != b and not (prefix + key).startswith("output."):
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


class Run:
    """State and outputs of one training run (see the module docstring)."""

    def __init__(self, cfg: Config, dist_info: DistInfo, resume: str | None) -> None:
        from convnn.data import BatchAugment, load_dataset, make_loader

        self.cfg, self.dist = validate_config(cfg), dist_info
        dc, tc, world = cfg.data, cfg.train, dist_info.world_size
        # Where the run goes (and whether it resumes) is settled before any heavy setup, by
        # rank 0; a problem with it is raised on every rank, so none waits for the others.
        where: Any = None
        if dist_info.is_main:
            try:
                where = resolve_run_dir(cfg, resume)
            except ValueError as e:
                where = e
        where = broadcast_object(where)
        if isinstance(where, ValueError):
            raise where
        run_dir, ckpt = where
        setup_torch(cfg)
        for key, value in (
            ("data.batch_size", dc.batch_size),
            ("data.eval_batch_size", dc.eval_batch_size or dc.batch_size),
        ):
            if value % world:
                raise ConfigError(
                    f"{key}={value} is the global batch and must divide evenly over {world} processes"
                )
        self.train_ds, self.val_ds, self.test_ds, self.spec = load_dataset(
            dc.dataset, dc.data_dir, img_size=cfg.model.img_size, val_size=dc.val_size, seed=0
        )
        has_val = self.val_ds is not None and len(self.val_ds) > 0
        self.val_ds = self.val_ds if has_val else None

        def loader(ds, batch, train):
            return make_loader(
                ds,
                batch // world,
                shuffle=train,
                seed=tc.seed,
                drop_last=train and dc.drop_last,
                num_workers=dc.num_workers,
                distributed=dist_info.enabled,
            )

        eval_batch = dc.eval_batch_size or dc.batch_size
        self.train_loader = loader(self.train_ds, dc.batch_size, True)
        self.val_loader = loader(self.val_ds, eval_batch, False) if has_val else None
        self.test_loader = loader(self.test_ds, eval_batch, False)
        self.steps = len(self.train_loader)
        if tc.max_steps_per_epoch > 0:
            self.steps = min(self.steps, tc.max_steps_per_epoch)
        if self.steps == 0:
            raise ConfigError(
                f"data.batch_size={dc.batch_size} is larger than the {len(self.train_ds)} "
                "training images; lower it or set data.drop_last=false"
            )
        mixing = dc.mixup > 0 or dc.cutmix > 0
        self.augment = BatchAugment(
            self.spec,
            crop_padding=dc.crop_padding,
            flip=dc.flip,
            mixup=dc.mixup,
            cutmix=dc.cutmix,
            label_smoothing=tc.label_smoothing if mixing else 0.0,
            normalize=dc.normalize,
        )

        torch.manual_seed(derive_seed("init", tc.seed))
        self.model = build_model(cfg, self.spec).to(dist_info.device)
        if dist_info.enabled and tc.sync_bn:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.identity = model_identity(cfg, self.spec)
        self.params = count_params(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps)

        self.dir: Path = run_dir
        self.history: list[dict] = []
        self.best: dict | None = None
        self.start_epoch = 0
        self.partial: EpochState | None = None  # a mid-epoch checkpoint to continue
        self.rng: dict[str, torch.Tensor] = {}
        if ckpt is not None:
            self._resume(ckpt)
        elif resume is not None:
            _say(dist_info, f"--resume: no checkpoint in {run_dir} yet; starting a new run there")

        self.train_model: torch.nn.Module = self.model
        if dist_info.enabled:
            ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.eval_model: torch.nn.Module = self.model
        if tc.compile:
            self.train_model = torch.compile(self.train_model)
            self.eval_model = torch.compile(self.model)

    # ----------------------------------------------------------------------------- resume
    def _resume(self, path: Path) -> None:
        tensors, meta = load_checkpoint(path)
        st = check_metadata(path, meta["state"], TrainState, "state")
        if st["epoch"] < 0 or len(st["history"]) != st["epoch"] or st["step_in_epoch"] < 0:
            raise CheckpointError(
                f"checkpoint {str(path)!r} has invalid metadata: state.epoch "
                f"{st['epoch']}, state.step_in_epoch {st['step_in_epoch']} and "
                f"{len(st['history'])} history rows disagree; use another checkpoint"
            )
        load_weights(path, self.model, self.identity, tensors, meta)
        self.rng = restore_training_state(tensors, meta, self.optimizer, self.scheduler)
        if st["step_in_epoch"] and not {"torch", "augment"} <= set(self.rng):
            raise CheckpointError(
                f"checkpoint {str(path)!r} stops mid-epoch but holds no RNG state to continue "
                "it; use another checkpoint"
            )
        changes = _config_changes(st["config"], config_to_dict(self.cfg))
        if changes:
            _say(self.dist, "resuming with changed settings: " + "; ".join(changes))
        self.history, self.best = st["history"], st["best"]
        self.start_epoch = st["epoch"]
        if st.get("step_in_epoch", 0):
            self.partial = EpochState(
                epoch=st["epoch"],
                step=st["step_in_epoch"],
                meter=Meter(*st["meter"]) if self.dist.is_main else Meter(),
                seconds=st["epoch_seconds"],
            )
        where = f"epoch {self.start_epoch}" + (
            f" + {self.partial.step} steps" if self.partial else ""
        )
        _say(self.dist, f"resumed {path} at {where}")

    # ------------------------------------------------------------------------ checkpoints
    def _state(self, epoch: int, partial: EpochState | None) -> dict:
        return {
            "epoch": epoch,
            "step_in_epoch": partial.step if partial else 0,
            "global_step": self.scheduler.last_epoch,
            "meter": partial.meter.state() if partial else [0.0, 0.0, 0.0],
            "epoch_seconds": partial.seconds if partial else 0.0,
            "history": self.history,
            "best": self.best,
            "config": config_to_dict(self.cfg),
        }

    def _save(self, epoch: int, partial: EpochState | None = None, rng: dict | None = None):
        if self.dist.is_main:
            save_checkpoint(
                self.dir / CHECKPOINT,
                self.model,
                identity=self.identity,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                rng=rng,
                state=self._state(epoch, partial),
            )

    def _on_step(self, es: EpochState, gen: torch.Generator) -> None:
        every = self.cfg.train.checkpoint_every_steps
        if every > 0 and es.step % every == 0 and es.step < self.steps:
            # Keep the epoch's running sums on rank 0 only, so their sum stays right on resume.
            es.meter = Meter(*all_reduce_sum(es.meter.state(), self.dist.device))
            if not self.dist.is_main:
                es.meter = Meter()
            self._save(es.epoch, es, rng_state(gen, self.dist.device))
        if os.environ.get(KILL_ENV) == str(self.scheduler.last_epoch):
            os.kill(os.getpid(), signal.SIGKILL)

    def _write_outputs(self) -> None:
        write_metrics_csv(self.dir / "metrics.csv", self.history)
        if not self.history:
            return
        try:
            from convnn.viz.curves import plot_curves

            plot_curves(self.history, self.dir / "curves.png", title=self.dir.name)
        except ImportError:  # matplotlib is optional
            pass

    # ---------------------------------------------------------------------------- epochs
    def _eval(self, split: str) -> dict[str, float]:
        ds, loader = {
            "val": (self.val_ds, self.val_loader),
            "test": (self.test_ds, self.test_loader),
        }[split]
        return evaluate(
            self.eval_model,
            loader,
            self.augment,
            self.dist,
            num_samples=len(ds),
            amp=self.cfg.train.amp,
        )

    def _epoch(self, epoch: int) -> dict:
        cfg, dist_info = self.cfg, self.dist
        gen = seed_epoch(cfg.train.seed, epoch, dist_info.rank)
        es = EpochState(epoch)
        if self.partial is not None and self.partial.epoch == epoch:
            es, self.partial = self.partial, None
            set_rng_state(self.rng, gen, dist_info.device)
        start = time.perf_counter() - es.seconds
        lr = self.optimizer.param_groups[0]["initial_lr"] * lr_factor(
            epoch * self.steps, cfg.sched, cfg.optim.lr, self.steps, cfg.train.epochs
        )
        train_one_epoch(
            model=self.train_model,
            loader=self.train_loader,
            augment=self.augment,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            cfg=cfg,
            dist_info=dist_info,
            state=es,
            generator=gen,
            steps=self.steps,
            on_step=lambda s: self._on_step(s, gen),
        )
        train = Meter(*all_reduce_sum(es.meter.state(), dist_info.device))
        val = self._eval("val") if self.val_loader is not None else None
        return {
            "epoch": epoch + 1,
            "train_loss": train.avg_loss,
            "train_acc": train.acc,
            "val_loss": val["loss"] if val else float("nan"),
            "val_acc": val["acc"] if val else float("nan"),
            "lr": lr,  # at the epoch's first step
            "epoch_time_s": time.perf_counter() - start,
            "img_per_s": train.count / es.seconds if es.seconds > 0 else float("nan"),
        }

    def _is_best(self, row: dict) -> bool:
        if self.val_loader is None or self.best is None:
            return True  # without a validation split the last epoch is selected
        if row["val_acc"] != self.best["val_acc"]:
            return row["val_acc"] > self.best["val_acc"]
        return row["val_loss"] < self.best["val_loss"]

    def fit(self) -> dict:
        cfg, dist_info = self.cfg, self.dist
        if dist_info.is_main:
            os.makedirs(self.dir, exist_ok=True)
            for stale in self.dir.glob(".*.tmp*"):  # left by a process killed mid-write
                stale.unlink(missing_ok=True)
            save_config(cfg, self.dir / "config.yaml")
            self._write_outputs()
        _say(
            dist_info,
            f"run {self.dir}: {cfg.model.name}/{cfg.model.layer} on {cfg.data.dataset}, "
            f"{self.params:,} params, {self.steps} steps/epoch, {dist_info.world_size} process(es) "
            f"on {dist_info.device}",
        )
        for epoch in range(self.start_epoch, cfg.train.epochs):
            row = self._epoch(epoch)
            self.history.append(row)
            if self._is_best(row):
                self.best = {k: row[k] for k in ("epoch", "val_acc", "val_loss")}
                if dist_info.is_main:
                    save_checkpoint(
                        self.dir / BEST,
                        self.model,
                        identity=self.identity,
                        state={"epoch": epoch + 1, "config": config_to_dict(cfg)},
                    )
            self._save(epoch + 1)
            if dist_info.is_main:
                self._write_outputs()
            _say(dist_info, _epoch_line(row, cfg.train.epochs))
        barrier()
        return self.finish()

    def finish(self) -> dict:
        last = self._eval("test")
        if self.best is not None:
            load_weights(self.dir / BEST, self.model, self.identity)
        test = self._eval("test")
        rates = [r["img_per_s"] for r in self.history if r["img_per_s"] == r["img_per_s"]]
        cfg = self.cfg
        summary = {
            "run": self.dir.name,
            "model": cfg.model.name,
            "layer": cfg.model.layer,
            "dataset": cfg.data.dataset,
            "seed": cfg.train.seed,
            "params": self.params,
            "epochs": len(self.history),
            "selection": "val" if self.val_loader is not None else "last",
            "best_epoch": self.best["epoch"] if self.best else None,
            "best_val_acc": self.best["val_acc"] if self.best else None,
            "test_acc": test["acc"],
            "test_loss": test["loss"],
            "test_acc_last": last["acc"],
            "train_img_per_s": sum(rates) / len(rates) if rates else None,
            "eval_img_per_s": test["img_per_s"],
            "train_time_s": sum(r["epoch_time_s"] for r in self.history),
            "world_size": self.dist.world_size,
            "device": str(self.dist.device),
        }
        summary = {k: (None if v != v else v) for k, v in summary.items()}  # NaN -> null
        if self.dist.is_main:
            text = json.dumps(summary, indent=2) + "\n"
            atomic_write_bytes(self.dir / "summary.json", text.encode())
        _say(
            self.dist,
            f"test acc {test['acc']:.4f} (best val epoch {summary['best_epoch']}), "
            f"last-epoch test acc {last['acc']:.4f}; {self.params:,} params; "
            f"{summary['train_img_per_s'] or 0:.0f} img/s train; outputs in {self.dir}",
        )
        return summary


def _epoch_line(row: dict, epochs: int) -> str:
    return (
        f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
        f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  lr {row['lr']:.2e}"
        f"  {row['epoch_time_s']:.1f}s  {row['img_per_s']:.0f} img/s"
    )


def run_training(
    cfg: Config, *, resume: str | None = None, dist_info: DistInfo | None = None
) -> dict:
    """Train (or continue) one run and return its summary (see :class:`Run`)."""
    dist_info = dist_info or init_distributed(cfg.train.device)
    return Run(cfg, dist_info, resume).fit()


def train_seeds(
    cfg: Config, seeds: list[int], *, resume: str | None = None, dist_info: DistInfo | None = None
) -> list[dict]:
    """One run per seed (``<name>-seed<k>``), then a mean +- std line over the seeds."""
    dist_info = dist_info or init_distributed(cfg.train.device)
    base = cfg.output.name or broadcast_object(default_run_name(cfg))
    if resume not in (None, "auto") or (resume and not cfg.output.name):
        raise ConfigError(
            "with --seeds, resume by name: pass --resume --name NAME (runs are NAME-seed<k>)"
        )
    summaries = []
    for seed in seeds:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.train.seed = seed
        run_cfg.output.name = f"{base}-seed{seed}"
        done = Path(run_cfg.output.dir) / run_cfg.output.name / "summary.json"
        if resume is not None and done.exists():
            summaries.append(json.loads(done.read_text()))
            _say(dist_info, f"seed {seed}: already finished ({done})")
            continue
        summaries.append(run_training(run_cfg, resume=resume, dist_info=dist_info))
    if len(summaries) > 1:
        test = format_mean_std([s["test_acc"] for s in summaries])
        val = format_mean_std([s["best_val_acc"] or float("nan") for s in summaries])
        _say(
            dist_info,
            f"{base}: test acc {test} %, best val acc {val} % over seeds {seeds} (mean +- std)",
        )
    return summaries


@dataclass
class TrainedModel:
    """A run's model with verified weights, on its device, and one split of its dataset."""

    cfg: Config
    spec: Any
    model: torch.nn.Module
    dataset: Any
    checkpoint: Path
    meta: dict
    dist_info: DistInfo


def load_trained_model(
    path: str | os.PathLike,
    *,
    config: str | None = None,
    overrides: list[str] = (),
    split: str = "test",
) -> TrainedModel:
    """Load a run directory (its best weights) or a checkpoint file and its ``split``.

    The config is ``config`` when given, else the run's config.yaml, else the one embedded in
    the checkpoint; ``overrides`` apply on top.
    """
    from convnn.data import load_dataset

    p = Path(path)
    if p.is_dir():
        ckpt = p / BEST if (p / BEST).exists() else p / CHECKPOINT
        if not ckpt.exists():
            raise CheckpointError(f"no checkpoint in {str(p)!r}; train the run first")
    else:
        ckpt = p
    tensors, meta = load_checkpoint(ckpt)  # verified before anything in it is used
    if config is not None:
        cfg = load_config(config, overrides)
    elif p.is_dir() and (p / "config.yaml").exists():
        cfg = load_config(p / "config.yaml", overrides)
    else:
        saved = check_metadata(
            ckpt, meta["state"].get("config"), dict[str, Any] | None, "state.config"
        )
        if saved is None:
            raise CheckpointError(f"checkpoint {str(ckpt)!r} carries no config; pass --config")
        try:
            cfg = config_from_dict(saved)
        except ConfigError as e:
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r} carries an invalid config ({e}); pass --config"
            ) from None
        cfg = validate_config(apply_overrides(cfg, list(overrides)))
    dist_info = init_distributed(cfg.train.device)
    setup_torch(cfg)
    train, val, test, spec = load_dataset(
        cfg.data.dataset, cfg.data.data_dir, img_size=cfg.model.img_size, val_size=cfg.data.val_size
    )
    ds = {"test": test, "val": val, "train": train}[split]
    if ds is None or len(ds) == 0:
        raise ConfigError(f"the {split} split of {cfg.data.dataset} is empty")
    model = build_model(cfg, spec).to(dist_info.device)
    load_weights(ckpt, model, model_identity(cfg, spec), tensors, meta)
    return TrainedModel(cfg, spec, model, ds, ckpt, meta, dist_info)


def evaluate_path(
    path: str,
    *,
    config: str | None = None,
    overrides: list[str] = (),
    split: str = "test",
) -> dict:
    """Evaluate a run directory (its best weights) or a checkpoint file on ``split``."""
    from convnn.data import BatchAugment, make_loader

    run = load_trained_model(path, config=config, overrides=overrides, split=split)
    cfg, dist_info = run.cfg, run.dist_info
    batch = cfg.data.eval_batch_size or cfg.data.batch_size
    loader = make_loader(
        run.dataset, batch // dist_info.world_size, shuffle=False, distributed=dist_info.enabled
    )
    augment = BatchAugment(run.spec, normalize=cfg.data.normalize)
    result = evaluate(
        run.model, loader, augment, dist_info, num_samples=len(run.dataset), amp=cfg.train.amp
    )
    return {
        "checkpoint": str(run.checkpoint),
        "epoch": run.meta["state"].get("epoch"),
        "split": split,
        **result,
    }
