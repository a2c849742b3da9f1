"""One configuration trained with several seeds, and what the seeds agree on (mean +- std)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .config import Config, ConfigError
from .distributed import DistInfo, broadcast_object, init_distributed, say
from .metrics import format_mean_std, mean_std
from .rundir import RunDir, default_run_name
from .runner import run_training

__all__ = ["SEEDS_FILE", "seed_summary", "train_seeds"]

SEEDS_FILE = "seeds.json"


def seed_summary(base: str, summaries: list[dict]) -> dict:
    """The mean +- std (sample std) over seeds of a configuration's results."""
    out: dict = {"name": base, "seeds": [s["seed"] for s in summaries]}
    for key in ("test_acc", "best_val_acc", "test_acc5", "train_img_per_s"):
        values = [s[key] for s in summaries if s.get(key) is not None]
        if values:
            mean, std = mean_std(values)
            out[key] = {"mean": mean, "std": std, "n": len(values)}
    out["runs"] = [s["run"] for s in summaries]
    return out


def train_seeds(
    cfg: Config, seeds: list[int], *, resume: str | None = None, dist_info: DistInfo | None = None
) -> list[dict]:
    """One run per seed (``<name>-seed<k>``), then a mean +- std line over the seeds, also
    written as ``seeds.json`` into every seed's run directory."""
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
            summary = json.loads(done.read_text())
            if summary.get("status", "finished") == "finished":
                summaries.append(summary)
                say(dist_info, f"seed {seed}: already finished ({done})")
                continue
        summaries.append(run_training(run_cfg, resume=resume, dist_info=dist_info))
    if len(summaries) > 1:
        test = format_mean_std([s["test_acc"] for s in summaries])
        val = format_mean_std([s["best_val_acc"] or float("nan") for s in summaries])
        say(
            dist_info,
            f"{base}: test acc {test} %, best val acc {val} % over seeds {seeds} (mean +- std)",
        )
    if dist_info.is_main:
        result = seed_summary(base, summaries)
        for s in summaries:
            RunDir(Path(cfg.output.dir) / s["run"]).write_json(SEEDS_FILE, result)
    return summaries
