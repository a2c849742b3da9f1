"""A whole training run: epochs, checkpoints, model selection, the final test.

:class:`Run` trains one configuration into its run directory (:mod:`convnn.train.rundir`
says where that is and what it holds). Only rank 0 writes. Model selection uses the
validation split, never the test set. ``callbacks`` run after every optimizer step with the
run and the epoch's state: the tests use one to kill the process mid-epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import torch

from .checkpoint import (
    CheckpointError,
    check_metadata,
    load_checkpoint,
    load_weights,
    restore_ema,
    restore_training_state,
    save_checkpoint,
)
from .config import (
    Config,
    ConfigError,
    config_to_dict,
    effective_batch_size,
    effective_lr,
    validate_config,
)
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    say,
)
from .engine import (
    EpochState,
    build_model,
    build_optimizer,
    build_scheduler,
    check_model_config,
    count_params,
    derive_seed,
    evaluate,
    model_identity,
    rng_state,
    seed_epoch,
    set_rng_state,
    set_schedule_step,
    setup_torch,
    train_one_epoch,
)
from .health import epoch_warnings
from .metrics import Meter
from .rundir import (
    BEST,
    CHECKPOINT,
    RunDir,
    config_changes,
    format_changes,
    refused_changes,
    resolve_run_dir,
)

__all__ = ["BEST", "CHECKPOINT", "Run", "StepCallback", "run_training"]

StepCallback = Callable[["Run", EpochState], None]
PLOT_EVERY_S = 30.0  # curves.png is redrawn at most this often during a run


class _HistoryRequired(TypedDict):
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    epoch_time_s: float
    img_per_s: float


class HistoryRow(_HistoryRequired, total=False):
    """One row of metrics.csv (columns added later are optional, so older runs resume)."""

    val_acc5: float


class Best(TypedDict):
    epoch: int
    val_acc: float
    val_loss: float


class _TrainStateRequired(TypedDict):
    epoch: int  # epochs finished
    step_in_epoch: int  # optimizer steps done in the next epoch (mid-epoch checkpoint)
    global_step: int
    meter: tuple[float, float, float]
    epoch_seconds: float
    history: list[HistoryRow]
    best: Best | None
    config: dict[str, Any]


class TrainState(_TrainStateRequired, total=False):
    """The ``state`` a run's checkpoint.safetensors holds (see :meth:`Run._state`)."""

    steps_per_epoch: int  # optimizer steps of a whole epoch


class Run:
    """State and outputs of one training run (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        dist_info: DistInfo,
        resume: str | None,
        *,
        callbacks: Sequence[StepCallback] = (),
    ) -> None:
        self.cfg, self.dist = validate_config(cfg), dist_info
        self.callbacks = list(callbacks)
        self.warnings: list[str] = []
        self._plotted = time.monotonic()  # when curves.png was last drawn (or the run began)
        run_dir, ckpt = self._settle_run_dir(resume)
        self.dir = run_dir.path
        self.files = run_dir
        check_model_config(cfg)  # a bad layer option is an error before the data is read
        setup_torch(cfg)
        self._setup_data()
        self._setup_model()
        self.history: list[dict] = []
        self.best: dict | None = None
        self.start_epoch = 0
        self.partial: EpochState | None = None  # a mid-epoch checkpoint to continue
        self.rng: dict[str, torch.Tensor] = {}
        if ckpt is not None:
            self._resume(ckpt)
        elif resume is not None:
            say(dist_info, f"--resume: no checkpoint in {self.dir} yet; starting a new run there")
        self._wrap_model()

    # ------------------------------------------------------------------------------ setup
    def _settle_run_dir(self, resume: str | None) -> tuple[RunDir, Path | None]:
        """Where the run goes (and whether it resumes), settled by rank 0 before any heavy
        setup; a problem with it is raised on every rank, so none waits for the others."""
        where: Any = None
        if self.dist.is_main:
            try:
                where = resolve_run_dir(self.cfg, resume)
            except ValueError as e:
                where = e
        where = broadcast_object(where)
        if isinstance(where, ValueError):
            raise where
        path, ckpt = where
        return RunDir(path), ckpt

    def _setup_data(self) -> None:
        from convnn.data import BatchAugment, load_dataset, make_loader

        cfg, dc, tc, world = self.cfg, self.cfg.data, self.cfg.train, self.dist.world_size
        for key, value in (
            ("data.batch_size", dc.batch_size),
            ("data.eval_batch_size", dc.eval_batch_size or dc.batch_size),
        ):
            if value % world:
                raise ConfigError(
                    f"{key}={value} is the global batch and must divide evenly over {world} processes"
                )
        self.train_ds, val_ds, self.test_ds, self.spec = load_dataset(
            dc.dataset, dc.data_dir, img_size=cfg.model.img_size, val_size=dc.val_size, seed=0
        )
        self.val_ds = val_ds if val_ds is not None and len(val_ds) > 0 else None

        def loader(ds, batch, train):
            return make_loader(
                ds,
                batch // world,
                shuffle=train,
                seed=tc.seed,
                drop_last=train and dc.drop_last,
                num_workers=dc.num_workers,
                distributed=self.dist.enabled,
            )

        eval_batch = dc.eval_batch_size or dc.batch_size
        self.train_loader = loader(self.train_ds, dc.batch_size, True)
        self.val_loader = loader(self.val_ds, eval_batch, False) if self.val_ds else None
        self.test_loader = loader(self.test_ds, eval_batch, False)
        self.steps = len(self.train_loader) // tc.accum_steps  # optimizer steps per epoch
        if tc.max_steps_per_epoch > 0:
            self.steps = min(self.steps, tc.max_steps_per_epoch)
        if self.steps == 0:
            raise ConfigError(
                f"data.batch_size={dc.batch_size} x train.accum_steps={tc.accum_steps} is more "
                f"than the {len(self.train_ds)} training images; lower them or set "
                "data.drop_last=false"
            )
        self.augment = BatchAugment(
            self.spec,
            crop_padding=dc.crop_padding,
            flip=dc.flip,
            mixup=dc.mixup,
            cutmix=dc.cutmix,
            label_smoothing=tc.label_smoothing if dc.mixup > 0 or dc.cutmix > 0 else 0.0,
            normalize=dc.normalize,
            random_resized_crop=dc.rrc_scale if dc.random_resized_crop else None,
            randaugment=dc.randaugment,
            random_erasing=dc.random_erasing,
        )

    def _setup_model(self) -> None:
        cfg, tc = self.cfg, self.cfg.train
        torch.manual_seed(derive_seed("init", tc.seed))
        model = build_model(cfg, self.spec).to(self.dist.device)
        if tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.dist.enabled and tc.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.identity = model_identity(cfg, self.spec)
        self.params = count_params(model)
        self.lr = effective_lr(cfg)
        self.optimizer = build_optimizer(model, cfg.optim, self.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps)
        self.ema = None
        if tc.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(
                model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True
            )

    def _wrap_model(self) -> None:
        """The modules that train and evaluate: DDP and torch.compile wrappers, EMA weights."""
        self.train_model: torch.nn.Module = self.model
        if self.dist.enabled:
            device = self.dist.device
            ids = [device.index] if device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # With a moving average, the averaged weights are the ones evaluated, selected and saved.
        self.eval_source: torch.nn.Module = self.ema.module if self.ema else self.model
        self.eval_model = self.eval_source
        if self.cfg.train.compile:
            self.train_model = torch.compile(self.train_model)
            self.eval_model = torch.compile(self.eval_source)

    @property
    def global_step(self) -> int:
        """Optimizer steps taken since the run began."""
        return self.scheduler.last_epoch

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
        changes = config_changes(st["config"], config_to_dict(self.cfg))
        refused = refused_changes(changes)
        saved_steps = st.get("steps_per_epoch", self.steps)
        if st["step_in_epoch"] and saved_steps != self.steps:
            refused.append(
                f"the optimizer steps per epoch: {saved_steps} -> {self.steps} (data.batch_size, "
                "train.accum_steps, train.max_steps_per_epoch or data.drop_last) while the "
                "checkpoint stops mid-epoch; resume from an epoch-end checkpoint to change them"
            )
        if refused:
            raise ConfigError(
                f"cannot resume {str(path)!r} with these changes: {'; '.join(refused)}; "
                "start a new run (another output.name) instead"
            )
        load_weights(path, self.model, self.identity, tensors, meta)
        self.rng = restore_training_state(tensors, meta, self.optimizer, self.scheduler)
        if st["step_in_epoch"] and not {"torch", "augment"} <= set(self.rng):
            raise CheckpointError(
                f"checkpoint {str(path)!r} stops mid-epoch but holds no RNG state to continue "
                "it; use another checkpoint"
            )
        if self.ema is not None and not restore_ema(path, tensors, self.ema):
            say(self.dist, "train.ema_decay: the moving average starts from the resumed weights")
        # The schedule continues from the step reached; at an epoch boundary the step is
        # counted in this run's steps per epoch, so a changed batch size keeps the schedule.
        step = st["global_step"] if st["step_in_epoch"] else st["epoch"] * self.steps
        set_schedule_step(self.optimizer, self.scheduler, step)
        if changes:
            say(self.dist, "resuming with changed settings (applied): " + format_changes(changes))
        self.history, self.best = st["history"], st["best"]
        self.start_epoch = st["epoch"]
        if st["step_in_epoch"]:
            self.partial = EpochState(
                epoch=st["epoch"],
                step=st["step_in_epoch"],
                meter=Meter(*st["meter"]) if self.dist.is_main else Meter(),
                seconds=st["epoch_seconds"],
            )
        where = f"epoch {self.start_epoch}" + (
            f" + {self.partial.step} steps" if self.partial else ""
        )
        say(self.dist, f"resumed {path} at {where}")

    # ------------------------------------------------------------------------ checkpoints
    def _state(self, epoch: int, partial: EpochState | None) -> dict:
        return {
            "epoch": epoch,
            "step_in_epoch": partial.step if partial else 0,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps,
            "meter": partial.meter.state() if partial else [0.0, 0.0, 0.0],
            "epoch_seconds": partial.seconds if partial else 0.0,
            "history": self.history,
            "best": self.best,
            "config": config_to_dict(self.cfg),
        }

    def _save(self, epoch: int, partial: EpochState | None = None, rng: dict | None = None):
        if self.dist.is_main:
            save_checkpoint(
                self.files.checkpoint,
                self.model,
                identity=self.identity,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                rng=rng,
                state=self._state(epoch, partial),
                ema=self.ema,
            )

    def _on_step(self, es: EpochState, gen: torch.Generator) -> None:
        every = self.cfg.train.checkpoint_every_steps
        if every > 0 and es.step % every == 0 and es.step < self.steps:
            # Keep the epoch's running sums on rank 0 only, so their sum stays right on resume.
            es.meter = Meter(*all_reduce_sum(es.meter.state(), self.dist.device))
            if not self.dist.is_main:
                es.meter = Meter()
            self._save(es.epoch, es, rng_state(gen, self.dist.device))
        for callback in self.callbacks:
            callback(self, es)

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
            channels_last=self.cfg.train.channels_last,
        )

    def _epoch(self, epoch: int) -> dict:
        cfg, dist_info = self.cfg, self.dist
        gen = seed_epoch(cfg.train.seed, epoch, dist_info.rank)
        es = EpochState(epoch)
        if self.partial is not None and self.partial.epoch == epoch:
            es, self.partial = self.partial, None
            set_rng_state(self.rng, gen, dist_info.device)
        start = time.perf_counter() - es.seconds
        lr = self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](epoch * self.steps)
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
            ema=self.ema,
            on_step=lambda s: self._on_step(s, gen),
        )
        train = Meter(*all_reduce_sum(es.meter.state(), dist_info.device))
        val = self._eval("val") if self.val_loader is not None else None
        nan = float("nan")
        return {
            "epoch": epoch + 1,
            "train_loss": train.avg_loss,
            "train_acc": train.acc,
            "val_loss": val["loss"] if val else nan,
            "val_acc": val["acc"] if val else nan,
            "val_acc5": val["acc5"] if val else nan,
            "lr": lr,  # at the epoch's first step
            "epoch_time_s": time.perf_counter() - start,
            "img_per_s": train.count / es.seconds if es.seconds > 0 else nan,
        }

    def _is_best(self, row: dict) -> bool:
        if self.val_loader is None or self.best is None:
            return True  # without a validation split the last epoch is selected
        if row["val_acc"] != self.best["val_acc"]:
            return row["val_acc"] > self.best["val_acc"]
        return row["val_loss"] < self.best["val_loss"]

    def _write_history(self, final: bool) -> None:
        """metrics.csv every epoch; curves.png at the end and at most every PLOT_EVERY_S
        seconds before (a plot costs seconds: too much for the short epochs of small runs)."""
        now = time.monotonic()
        plot = final or now - self._plotted >= PLOT_EVERY_S
        self.files.write_history(self.history, self._title(), plot=plot)
        if plot:
            self._plotted = now

    def _title(self) -> str:
        cfg = self.cfg
        return (
            f"{self.dir.name}: {cfg.model.name} {cfg.model.layer} on {cfg.data.dataset} "
            f"(seed {cfg.train.seed})"
        )

    def _warn(self, lines: list[str]) -> None:
        for line in lines:
            self.warnings.append(line)
            say(self.dist, f"WARNING: {line}")

    def fit(self) -> dict:
        cfg, dist_info = self.cfg, self.dist
        if dist_info.is_main:
            self.files.prepare(cfg)
            self._write_history(final=True)
        scaled = ""
        if cfg.optim.lr_batch_size is not None:
            scaled = (
                f", lr {self.lr:.4g} = {cfg.optim.lr:g} x {effective_batch_size(cfg)} / "
                f"{cfg.optim.lr_batch_size} (optim.lr scaled linearly to the batch)"
            )
        say(
            dist_info,
            f"run {self.dir}: {cfg.model.name}/{cfg.model.layer} on {cfg.data.dataset}, "
            f"{self.params:,} params, {self.steps} steps/epoch, {dist_info.world_size} process(es) "
            f"on {dist_info.device}{scaled}",
        )
        for row in self.history:  # a resumed run keeps its earlier warnings
            self.warnings += epoch_warnings(row, self.spec.num_classes)
        for epoch in range(self.start_epoch, cfg.train.epochs):
            try:
                row = self._epoch(epoch)
            except FloatingPointError as e:
                self._warn([f"epoch {epoch + 1}: {e}"])
                if dist_info.is_main:
                    self.files.write_json("summary.json", self._summary(None, None, "diverged"))
                raise
            self.history.append(row)
            if self._is_best(row):
                self.best = {k: row[k] for k in ("epoch", "val_acc", "val_loss")}
                if dist_info.is_main:
                    save_checkpoint(
                        self.files.best,
                        self.eval_source,
                        identity=self.identity,
                        state={"epoch": epoch + 1, "config": config_to_dict(cfg)},
                    )
            self._save(epoch + 1)
            if dist_info.is_main:
                self.files.keep_history(epoch + 1, cfg.output.keep_checkpoints)
                self._write_history(final=epoch + 1 == cfg.train.epochs)
            say(dist_info, _epoch_line(row, cfg.train.epochs))
            self._warn(epoch_warnings(row, self.spec.num_classes))
        barrier()
        return self.finish()

    def _summary(self, test: dict | None, last: dict | None, status: str) -> dict:
        cfg, best = self.cfg, self.best
        rates = [r["img_per_s"] for r in self.history if math.isfinite(r["img_per_s"])]
        summary = {
            "run": self.dir.name,
            "status": status,
            "model": cfg.model.name,
            "layer": cfg.model.layer,
            "dataset": cfg.data.dataset,
            "seed": cfg.train.seed,
            "params": self.params,
            "epochs": len(self.history),
            "selection": "val" if self.val_loader is not None else "last",
            "best_epoch": best["epoch"] if best else None,
            "best_val_acc": best["val_acc"] if best else None,
            "test_acc": test["acc"] if test else None,
            "test_acc5": test["acc5"] if test else None,
            "test_loss": test["loss"] if test else None,
            "test_acc_last": last["acc"] if last else None,
            "ema": cfg.train.ema_decay or None,
            "lr": self.lr,
            "train_img_per_s": sum(rates) / len(rates) if rates else None,
            "eval_img_per_s": test["img_per_s"] if test else None,
            "train_time_s": sum(r["epoch_time_s"] for r in self.history),
            "world_size": self.dist.world_size,
            "device": str(self.dist.device),
            "warnings": self.warnings,
        }
        return {k: (None if v != v else v) for k, v in summary.items()}  # NaN -> null

    def finish(self) -> dict:
        last = self._eval("test")
        if self.best is not None:
            load_weights(self.files.best, self.eval_source, self.identity)
        test = self._eval("test")
        summary = self._summary(test, last, "finished")
        if self.dist.is_main:
            self.files.write_json("summary.json", summary)
        say(
            self.dist,
            f"test acc {test['acc']:.4f} (best val epoch {summary['best_epoch']}), "
            f"last-epoch test acc {last['acc']:.4f}; {self.params:,} params; "
            f"{summary['train_img_per_s'] or 0:.0f} img/s train; outputs in {self.dir}",
        )
        if self.warnings:
            say(
                self.dist,
                f"WARNING: {len(self.warnings)} warning(s) in this run (see above and "
                f"summary.json); its accuracy may not mean what it seems",
            )
        return summary


def _epoch_line(row: dict, epochs: int) -> str:
    return (
        f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
        f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  lr {row['lr']:.2e}"
        f"  {row['epoch_time_s']:.1f}s  {row['img_per_s']:.0f} img/s"
    )


def run_training(
    cfg: Config,
    *,
    resume: str | None = None,
    dist_info: DistInfo | None = None,
    callbacks: Sequence[StepCallback] = (),
) -> dict:
    """Train (or continue) one run and return its summary (see :class:`Run`)."""
    dist_info = dist_info or init_distributed(cfg.train.device)
    return Run(cfg, dist_info, resume, callbacks=callbacks).fit()
