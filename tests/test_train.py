"""Training side: config, schedules, checkpoints, exact resume after kill -9, DDP equivalence."""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convnn.train import checkpoint as ck
from convnn.train.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    valid_keys,
)
from convnn.train.engine import build_scheduler, lr_factor, set_schedule_step
from convnn.train.metrics import format_mean_std, mean_std, read_metrics_csv, write_metrics_csv
from convnn.train.rundir import CHECKPOINT


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's weights (and their moving average, when the run keeps one)."""
    tensors, _ = ck.load_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema."))}


# ------------------------------------------------------------------------------- config


def test_config_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: vgg11, layer: branching}\noptim: {lr: 1e-4}\n")
    cfg = load_config(path, ["optim.lr=3e-4", "train.amp=true", "model.layer_kwargs.K=16"])
    assert cfg.model.name == "vgg11" and cfg.model.layer == "branching"
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.amp is True and cfg.model.layer_kwargs == {"K": 16}
    assert load_config(None).train.epochs == Config().train.epochs
    assert "optim.lr" in valid_keys() and "model.layer_kwargs" in valid_keys()


@pytest.mark.parametrize(
    "override",
    ["optim.lrr=1", "lr=1", "optim=1", "nope.x=1"],
)
def test_unknown_key_lists_valid_keys(override):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [override])
    msg = str(e.value)
    assert "\n" not in msg and "valid keys" in msg and "optim.lr" in msg


def test_config_type_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="train.epochs"):
        apply_overrides(Config(), ["train.epochs=ten"])
    with pytest.raises(ConfigError, match="unknown config key 'model.nam'"):
        config_from_dict({"model": {"nam": "x"}})
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Config(), ["optim.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        # "float" inside "list[float]" once let a bare number through as the list.
        ("optim.betas=5", "'optim.betas' must be a list of 2 numbers, got 5 (int)"),
        ("optim.betas=[0.9]", "'optim.betas' must be a list of 2 numbers, got [0.9] (1 item)"),
        ("optim.betas=[0.9, 0.99, 0.999]", "'optim.betas' must be a list of 2 numbers"),
        ("optim.betas=[0.9, x]", "'optim.betas[1]' must be a number, got 'x' (str)"),
        ("optim.lr=fast", "'optim.lr' must be a number, got 'fast' (str)"),
        ("optim.lr=true", "'optim.lr' must be a number, got True (bool)"),
        ("train.epochs=1.5", "'train.epochs' must be an integer, got 1.5 (float)"),
        ("train.amp=1", "'train.amp' must be true or false, got 1 (int)"),
        ("model.img_size=[8]", "'model.img_size' must be an integer or null"),
        ("model.layer_kwargs=5", "'model.layer_kwargs' must be a mapping"),
        ("model.layer_kwargs={1: 2}", "'model.layer_kwargs' must be a mapping"),
        ("output.name=[run]", "'output.name' must be a string or null, got ['run'] (1 item)"),
    ],
)
def test_config_types_are_checked_as_declared(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_types_convert_as_declared(tmp_path):
    cfg = load_config(None, ["optim.betas=[0.8, 0.9]", "optim.lr=1", "data.val_size=100"])
    assert cfg.optim.betas == (0.8, 0.9) and isinstance(cfg.optim.lr, float)
    # A count stays a count (it was widened to 100.0 and then refused as a fraction).
    assert cfg.data.val_size == 100 and isinstance(cfg.data.val_size, int)
    assert load_config(None, ["data.val_size=0.2"]).data.val_size == 0.2
    # YAML 1.2 floats: 1e-4 is a number in recipes and overrides, not a string.
    (tmp_path / "r.yaml").write_text("optim: {lr: 1e-4, weight_decay: 5E-2}\n")
    cfg = load_config(tmp_path / "r.yaml", ["sched.min_lr=1e-6"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.sched.min_lr) == (1e-4, 5e-2, 1e-6)
    assert load_config(None, ["output.name=1e5"]).output.name == "1e5"  # declared text
    assert load_config(None, ["output.name=2024"]).output.name == "2024"
    # Tuples are lists in the saved config, so a resumed run sees no change.
    assert config_to_dict(cfg)["optim"]["betas"] == [0.9, 0.999]


# An invalid value for every key whose rule says more than its type (the table is RULES).
INVALID = {
    "model.name": "resnet",
    "model.layer": "attention",  # a ViT layer for the default resnet18
    "model.img_size": 0,
    "model.patch_size": 0,
    "data.dataset": "mnist",
    "data.data_dir": "",
    "data.val_size": 1.0,
    "data.batch_size": 0,
    "data.eval_batch_size": 0,
    "data.num_workers": -1,
    "data.crop_padding": -1,
    "data.mixup": -0.5,
    "data.cutmix": float("inf"),
    "data.rrc_scale": [0.5, 0.2],
    "data.randaugment": 31,
    "data.random_erasing": 1.5,
    "optim.name": "adam",
    "optim.lr": 0,
    "optim.lr_batch_size": 0,
    "optim.weight_decay": -1,
    "optim.momentum": 1.0,
    "optim.nesterov": True,  # with optim.name=sgd and optim.momentum=0, see below
    "optim.betas": [0.9, 1.0],
    "optim.eps": 0,
    "sched.name": "linear",
    "sched.warmup_epochs": -1,
    "sched.warmup_start_factor": 1.5,
    "sched.min_lr": 1.0,  # above optim.lr
    "sched.step_epochs": 0,
    "sched.gamma": 0,
    "train.epochs": 0,
    "train.seed": -1,
    "train.label_smoothing": 2,
    "train.grad_clip": float("nan"),
    "train.device": "tpu",
    "train.num_threads": -2,
    "train.checkpoint_every_steps": -1,
    "train.max_steps_per_epoch": -1,
    "train.accum_steps": 0,
    "train.ema_decay": 1.0,
    "output.dir": " ",
    "output.name": "../elsewhere",
    "output.keep_checkpoints": -1,
}


def test_every_config_key_has_a_rule():
    from convnn.train.config import ANY, RULES

    assert list(RULES) == valid_keys()
    assert {k for k, rule in RULES.items() if rule is not ANY} == set(INVALID)


@pytest.mark.parametrize("key", sorted(INVALID))
def test_config_rules_refuse_invalid_values(key):
    from convnn.train.config import validate_config

    cfg = Config()
    if key == "optim.nesterov":
        cfg.optim.name, cfg.optim.momentum = "sgd", 0.0
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, INVALID[key])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert msg.startswith(f"config key {key!r} must be ") and ", got " in msg and "\n" not in msg
    setattr(getattr(Config(), section), name, getattr(Config(), section).__dict__[name])
    validate_config(Config())  # the defaults pass


def test_recipes_in_configs_load():
    recipes = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(recipes) >= 9
    for path in recipes:
        load_config(path)  # every key exists and has the right type


# ----------------------------------------------------------------------------- schedule


def test_warmup_cosine_and_step_schedules():
    cfg = config_from_dict({"sched": {"warmup_epochs": 1, "warmup_start_factor": 0.1}})
    cfg.train.epochs = 4
    f = [lr_factor(s, cfg.sched, 1.0, 10, 4) for s in range(40)]
    assert f[0] == pytest.approx(0.1) and f[5] == pytest.approx(0.55) and f[10] == 1.0
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01
    cfg.sched.name, cfg.sched.step_epochs, cfg.sched.warmup_epochs = "step", 2, 0
    assert [lr_factor(s, cfg.sched, 1.0, 10, 4) for s in (0, 19, 20, 39)] == pytest.approx(
        [1, 1, 0.1, 0.1]
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10)
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    cfg.sched.name = "linear"
    with pytest.raises(ConfigError, match="cosine, step or constant"):
        build_scheduler(opt, cfg, 10)


# --------------------------------------------------------------------------- checkpoints


def _toy(width: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.BatchNorm1d(width))


def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = _toy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = Config()
    sched = build_scheduler(opt, cfg, steps_per_epoch=5)
    for _ in range(3):
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
        sched.step()
    ident = {"name": "toy", "layer": "conv"}
    path = tmp_path / "c.safetensors"
    ck.save_checkpoint(
        path, model, identity=ident, optimizer=opt, scheduler=sched, state={"epoch": 3}
    )
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left

    model2 = _toy()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sched2 = build_scheduler(opt2, cfg, steps_per_epoch=5)
    tensors, meta = ck.load_checkpoint(path)
    ck.load_weights(path, model2, ident, tensors, meta)
    ck.restore_training_state(tensors, meta, opt2, sched2)
    set_schedule_step(opt2, sched2, sched2.last_epoch)  # the run's own lr at that step
    assert meta["state"] == {"epoch": 3}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key])


def test_checkpoint_errors_are_clear(tmp_path):
    from safetensors.torch import save_file

    model, ident = _toy(), {"name": "toy", "layer": "conv"}
    path = tmp_path / "c.safetensors"
    ck.save_checkpoint(path, model, identity=ident)
    blob = path.read_bytes()

    cases = {
        "truncated": blob[: len(blob) - 7],
        "tiny": blob[:5],
        "bitflip": blob[:-3] + bytes([blob[-3] ^ 0xFF]) + blob[-2:],
        "empty": b"",
    }
    for name, data in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(ck.CheckpointError, match="corrupt or truncated") as e:
            ck.load_weights(bad, _toy(), ident)
        assert "\n" not in str(e.value)
    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ck.CheckpointError, match="not a convnn checkpoint"):
        ck.load_checkpoint(tmp_path / "foreign.safetensors")
    with pytest.raises(ck.CheckpointError, match="different model"):
        ck.load_weights(path, _toy(), {"name": "other", "layer": "conv"})
    with pytest.raises(ck.CheckpointError, match="different model"):
        ck.load_weights(path, _toy(width=5), ident)
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.load_checkpoint(tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def tiny_run(trained) -> Path:
    """A finished 3-epoch run of the tiny ViT (checkpoint.safetensors, best.safetensors, ...)."""
    return trained["vit"]


def _flip(blob: bytes, bit: int) -> bytes:
    flipped = bytearray(blob)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


@pytest.mark.parametrize("name", [CHECKPOINT, "best.safetensors"])
def test_a_flipped_bit_anywhere_in_a_checkpoint_is_refused(tiny_run, monkeypatch, name):
    """Flipped bits all over the file: the length prefix, the header (tensor table, metadata
    JSON, digest) and the tensor bytes (every bit of the file with CONVNN_FLIP_ALL=1)."""
    path = tiny_run / name
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    data = range((8 + n) * 8, len(blob) * 8)
    if os.environ.get("CONVNN_FLIP_ALL"):
        bits = range(len(blob) * 8)
    else:  # every bit of the length and the digest field, one bit of every other header byte
        rng = random.Random(0)
        digest = blob.index(b'"convnn_sha256"')
        whole = {*range(8), *range(digest, digest + len(b'"convnn_sha256":"') + 65)}
        bits = [b * 8 + i for b in sorted(whole) for i in range(8)]
        bits += [b * 8 + rng.randrange(8) for b in range(8, 8 + n) if b not in whole]
        bits += [*rng.sample(data, 4096), *data[-64:]]
    current = {}
    monkeypatch.setattr(ck, "_read", lambda _: current["blob"])
    reasons: set[str] = set()
    for bit in bits:
        current["blob"] = _flip(blob, bit)
        with pytest.raises(ck.CheckpointError) as e:
            ck.load_checkpoint(path)
        msg = str(e.value)
        assert "\n" not in msg and "is corrupt or truncated (" in msg, (bit, msg)
        reasons.add(msg.split(" (")[1].split(")")[0])
    # The length prefix, the JSON structure, the digest field and the hashed bytes all tripped.
    assert {"checksum mismatch", "header is not valid JSON"} <= reasons, reasons
    assert any("header runs past" in r for r in reasons), reasons
    current["blob"] = blob
    assert ck.load_checkpoint(path)[1]["format"] == ck.FORMAT  # the unflipped file loads


def test_flipped_epoch_is_refused_not_resumed(tiny_run, tmp_path):
    # The issue's case: 3 -> 1 is one bit, and the tensor-only hash let the run resume "at
    # epoch 1", writing 5 rows of metrics for a 3-epoch run.
    blob = (tiny_run / CHECKPOINT).read_bytes()
    at = blob.index(b'\\"epoch\\": 3')
    flipped = blob.replace(b'\\"epoch\\": 3', b'\\"epoch\\": 1', 1)
    assert flipped == _flip(blob, (at + len(b'\\"epoch\\": 3') - 1) * 8 + 1)
    bad = tmp_path / CHECKPOINT
    bad.write_bytes(flipped)
    for read in (ck.load_checkpoint, ck.read_metadata):
        with pytest.raises(ck.CheckpointError, match="corrupt or truncated .checksum mismatch"):
            read(bad)


def _metadata_mutations(meta: dict) -> list[tuple[str, str]]:
    """(dotted path, 'missing' | 'wrong type') for every key the metadata holds; in lists,
    the first item stands for all."""
    found = []

    def walk(node, where):
        if isinstance(node, list) and node and isinstance(node[0], dict):
            walk(node[0], f"{where}[0]")
        if isinstance(node, dict):
            for key, value in node.items():
                path = f"{where}.{key}" if where else key
                found.extend([(path, "missing"), (path, "wrong type")])
                if path != "state.config":  # a partial or odd config is a config matter
                    walk(value, path)

    walk(meta, "")
    return found


def _mutate(meta: dict, path: str, how: str) -> None:
    import re

    *parents, leaf = re.findall(r"[^.\[\]]+", path)
    node = meta
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if how == "missing":
        del node[leaf]
    else:  # a string where anything else is expected, a number where a string is
        node[leaf] = 7 if isinstance(node[leaf], str) else "x"


def test_well_hashed_metadata_with_a_key_missing_or_mistyped_is_one_line(tiny_run, tmp_path):
    """A file with a valid digest but a key missing or of the wrong type (not written by this
    version) is refused with one line on resume and on eval, or, where the key is optional,
    resumes and trains on."""
    import shutil

    from convnn.train.distributed import DistInfo
    from convnn.train.loading import evaluate_path
    from convnn.train.runner import Run

    tensors, meta = ck.load_checkpoint(tiny_run / CHECKPOINT)
    cases = _metadata_mutations(meta)
    assert len(cases) > 100 and ("state.epoch", "missing") in cases
    cfg = load_config(tiny_run / "config.yaml", ["train.epochs=4"])
    refused = 0
    for i, (path, how) in enumerate(cases):
        run_dir = tmp_path / f"m{i}"
        run_dir.mkdir()
        shutil.copy(tiny_run / "best.safetensors", run_dir)
        mutated = json.loads(json.dumps(meta))
        _mutate(mutated, path, how)
        ck.write_checkpoint(run_dir / CHECKPOINT, tensors, mutated)
        try:
            run = Run(cfg, DistInfo(), resume=str(run_dir / CHECKPOINT))
        except ck.CheckpointError as e:
            assert "\n" not in str(e), (path, how)
            refused += 1
        else:
            run._epoch(run.start_epoch)  # accepted: then it must train on
        if path.startswith(("optimizer", "scheduler", "state.")) and path != "state.config":
            continue  # eval reads the format, the identity, state.config and state.epoch
        try:
            evaluate_path(str(run_dir / CHECKPOINT))
        except ValueError as e:  # CheckpointError, or ConfigError for the embedded config
            assert "\n" not in str(e), (path, how)
    assert refused >= len(cases) * 3 // 4, refused


def test_checkpoint_of_the_old_format_is_refused_or_upgraded(tiny_run, tmp_path):
    from safetensors.torch import save

    tensors, meta = ck.load_checkpoint(tiny_run / CHECKPOINT)
    old = tmp_path / "old.safetensors"
    meta1 = {**meta, "format": "convnn-checkpoint/1", "sha256": ck._tensor_digest(tensors)}
    old.write_bytes(save(tensors, metadata={"convnn": json.dumps(meta1)}))
    with pytest.raises(ck.CheckpointError, match="hash does not cover its metadata.*upgrade"):
        ck.load_checkpoint(old)
    ck.upgrade_checkpoint(old)
    tensors2, meta2 = ck.load_checkpoint(old)
    assert meta2 == meta and tensors2.keys() == tensors.keys()
    assert all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    with pytest.raises(ck.CheckpointError, match="only 'convnn-checkpoint/1' files"):
        ck.upgrade_checkpoint(old)


def test_checkpoint_loading_never_unpickles(tmp_path):
    import pickle

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ck.CheckpointError):
        ck.load_checkpoint(path)


# -------------------------------------------------------------------------------- metrics


def test_metrics_csv_and_mean_std(tmp_path):
    rows = [{"epoch": 1, "train_loss": 1.5, "val_acc": float("nan"), "lr": 1e-3}]
    write_metrics_csv(tmp_path / "m.csv", rows)
    back = read_metrics_csv(tmp_path / "m.csv")
    assert back[0]["epoch"] == 1 and back[0]["train_loss"] == 1.5
    assert math.isnan(back[0]["val_acc"])
    assert mean_std([0.9, 0.92, 0.94]) == pytest.approx((0.92, 0.02))
    assert mean_std([0.5]) == (0.5, 0.0)
    assert format_mean_std([0.9, 0.92, 0.94]) == "92.00 +- 2.00"


# ------------------------------------------------------------------ runs, resume, DDP


def test_run_outputs_and_multi_seed(tmp_path, capsys, tiny):
    from convnn.train.seeds import train_seeds

    cfg = load_config(None, [*tiny.cnn, "train.epochs=2", f"output.dir={tmp_path}"])
    cfg.output.name = "s"
    summaries = train_seeds(cfg, [0, 1])
    out = capsys.readouterr().out
    assert len(summaries) == 2 and summaries[0]["test_acc"] != summaries[1]["test_acc"]
    mean_pm_std = format_mean_std([s["test_acc"] for s in summaries])
    assert f"test acc {mean_pm_std} %" in out and "over seeds [0, 1] (mean +- std)" in out
    run = tmp_path / "s-seed0"
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.csv", "curves.png", CHECKPOINT, "best.safetensors"} <= names
    rows = read_metrics_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]) >= {"train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["params"] > 0 and summary["selection"] == "val"
    assert 0 <= summary["test_acc"] <= 1 and summary["train_img_per_s"] > 0
    assert load_config(run / "config.yaml").train.seed == 0
    # The mean +- std over the seeds is written into every seed's run directory.
    for seed in (0, 1):
        written = json.loads((tmp_path / f"s-seed{seed}" / "seeds.json").read_text())
        mean, std = mean_std([s["test_acc"] for s in summaries])
        assert written["test_acc"] == {"mean": mean, "std": std, "n": 2}
        assert written["runs"] == ["s-seed0", "s-seed1"] and written["seeds"] == [0, 1]


def test_model_selection_uses_validation_never_test(tmp_path, monkeypatch, tiny):
    from convnn.train import runner
    from convnn.train.loading import evaluate_path

    calls: list[tuple[str, int]] = []  # (split, epochs finished when it was evaluated)
    # Forced validation results: epochs 2 and 4 tie on accuracy, epoch 2 has the lower loss.
    val_acc, val_loss = [0.5, 0.9, 0.7, 0.9], [1.0, 0.4, 0.6, 0.5]
    original = runner.Run._eval

    def recording(self, split):
        calls.append((split, len(self.history)))
        result = original(self, split)
        if split == "val":
            epoch = len(self.history)
            result = {**result, "acc": val_acc[epoch], "loss": val_loss[epoch]}
        return result

    monkeypatch.setattr(runner.Run, "_eval", recording)
    epochs = len(val_acc)
    cfg = load_config(None, [*tiny.cnn, f"train.epochs={epochs}"])
    cfg.output.dir, cfg.output.name = str(tmp_path), "sel"
    summary = runner.run_training(cfg)
    # One validation pass per epoch during training; the test split only once training is over.
    assert calls[:epochs] == [("val", e) for e in range(epochs)]
    assert calls[epochs:] and all(c == ("test", epochs) for c in calls[epochs:])

    rows = read_metrics_csv(tmp_path / "sel" / "metrics.csv")
    assert [(r["val_acc"], r["val_loss"]) for r in rows] == list(zip(val_acc, val_loss))
    assert (summary["best_epoch"], summary["best_val_acc"], summary["selection"]) == (2, 0.9, "val")
    assert ck.read_metadata(tmp_path / "sel" / "best.safetensors")["state"]["epoch"] == 2
    # The reported test accuracy is that of the selected (epoch 2) weights, not the last ones.
    best = evaluate_path(str(tmp_path / "sel"))
    last = evaluate_path(str(tmp_path / "sel" / CHECKPOINT))
    assert (best["epoch"], last["epoch"]) == (2, epochs)
    assert best["acc"] == summary["test_acc"] and last["acc"] == summary["test_acc_last"]
    assert best["loss"] != last["loss"]


def test_a_learning_rate_changed_on_resume_is_the_one_the_optimizer_uses(tmp_path, tiny, capsys):
    """--resume --set optim.lr=... once printed the change and trained on at the old rate."""
    from convnn.train.runner import run_training

    settings = [
        *tiny.cnn,
        "optim.name=sgd",
        "optim.momentum=0",
        "optim.weight_decay=0",
        "sched.name=constant",
        f"output.dir={tmp_path}",
        "output.name=run",
    ]
    run_training(load_config(None, [*settings, "train.epochs=1", "optim.lr=0.001"]))
    steps: list[tuple[float, float]] = []  # (lr in the optimizer, lr the update moved by)
    previous: dict = {}

    def record(run, state):
        params = [p for p in run.model.parameters() if p.grad is not None and p.grad.any()]
        if previous:  # SGD without momentum or decay: p <- p - lr * grad
            p, before = params[0], previous[id(params[0])]
            moved = ((before - p.detach()) / p.grad).flatten()
            steps.append(
                (run.optimizer.param_groups[0]["lr"], moved[p.grad.flatten() != 0].median().item())
            )
        previous.update({id(p): p.detach().clone() for p in params})

    resumed = load_config(None, [*settings, "train.epochs=2", "optim.lr=0.01"])
    run_training(resumed, resume="auto", callbacks=[record])
    out = capsys.readouterr().out
    assert "resuming with changed settings (applied): optim.lr: 0.001 -> 0.01" in out
    assert steps and all(lr == 0.01 for lr, _ in steps)
    assert all(moved == pytest.approx(0.01, rel=1e-3) for _, moved in steps), steps
    rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    assert [r["lr"] for r in rows] == [0.001, 0.01]


def test_changes_a_resume_cannot_apply_are_refused(tmp_path, tiny):
    from convnn.train.runner import run_training

    settings = [*tiny.cnn, f"output.dir={tmp_path}", "output.name=run", "train.epochs=1"]
    run_training(load_config(None, [*settings, "train.checkpoint_every_steps=2"]))
    for change, named in (
        ("model.layer=convnn", "model.layer: 'conv' -> 'convnn'"),
        ("train.seed=3", "train.seed: 0 -> 3"),
        ("data.val_size=0.2", "data.val_size: 0.1 -> 0.2"),
        ("optim.name=sgd", "optim.name: 'adamw' -> 'sgd'"),
    ):
        with pytest.raises(ConfigError) as e:
            run_training(load_config(None, [*settings, "train.epochs=2", change]), resume="auto")
        assert "cannot resume" in str(e.value) and named in str(e.value)
        assert "\n" not in str(e.value)


def test_a_diverging_run_is_reported_in_its_output_and_summary(tmp_path, tiny, convnn):
    """A learning rate far too large (SGD at 100): the loss explodes while the run goes on;
    every epoch that diverged is a WARNING line and an entry of summary.json."""
    args = ["train", "--out-dir", tmp_path, "--set", *tiny.cnn, "optim.name=sgd"]
    result = convnn(*args, "optim.lr=100", "train.epochs=2", "--name", "high")
    assert result.code == 0, result.err
    warnings = [line for line in result.out.splitlines() if line.startswith("WARNING: ")]
    assert any("validation loss" in w and "the run diverged" in w for w in warnings), warnings
    summary = json.loads((tmp_path / "high" / "summary.json").read_text())
    assert summary["warnings"] and all(f"WARNING: {w}" in warnings for w in summary["warnings"])
    # A loss that overflows to NaN stops the run with one line; the summary says so.
    result = convnn(*args, "optim.lr=1e8", "train.epochs=3", "--name", "nan")
    assert result.code == 2
    result.error_line("training loss is nan", "lower optim.lr")
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "training loss is nan" in summary["warnings"][-1]
    # A sane rate: no warning.
    result = convnn(*args, "optim.lr=0.05", "train.epochs=2", "--name", "sane")
    assert result.code == 0 and "WARNING" not in result.out


@pytest.mark.slow
def test_an_eval_mode_collapse_is_reported(tmp_path, tiny):
    """The collapse of the issue, reproduced with a plain convolutional ResNet-18: SGD at 0.05
    for batch 32 (the rate the branching network collapsed at). In 15 steps train mode reaches
    ~56% while eval mode, whose BatchNorm running statistics lag far behind weights moving
    that fast, predicts at chance with a loss in the hundreds. Both are reported."""
    from convnn.train.runner import run_training

    settings = [*tiny.resnet, "train.max_steps_per_epoch=15", "train.epochs=1"]
    settings += ["optim.name=sgd", "optim.lr=0.05", "sched.name=constant"]
    settings += [f"output.dir={tmp_path}", "output.name=run"]
    summary = run_training(load_config(None, settings))
    (row,) = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    assert row["train_acc"] > 0.4 and row["val_acc"] < 0.2 and row["val_loss"] > 23, row
    gap, exploded = (
        [w for w in summary["warnings"] if key in w] for key in ("near chance", "validation loss")
    )
    assert len(gap) == 1 and "eval mode" in gap[0] and "lower optim.lr" in gap[0]
    assert len(exploded) == 1 and "the run diverged" in exploded[0]


def test_a_train_eval_gap_is_a_warning():
    """The branching ResNet-18 of the issue: 80% in train mode, chance in eval mode."""
    from convnn.train.health import epoch_warnings

    row = dict(epoch=3, train_loss=0.6, train_acc=0.8, val_loss=1.3, val_acc=0.25)
    (gap,) = epoch_warnings(row, num_classes=4)
    assert "validation accuracy 0.250 is near chance (0.250)" in gap and "eval mode" in gap
    assert len(epoch_warnings({**row, "val_loss": 192.0}, 4)) == 2  # and the exploding loss
    # Overfitting is not a collapse; nor is a run without a validation split.
    assert not epoch_warnings({**row, "train_acc": 1.0, "val_acc": 0.7}, 4)
    assert not epoch_warnings({**row, "val_loss": math.nan, "val_acc": math.nan}, 4)


def test_gradient_accumulation_matches_one_large_batch(tmp_path, tiny):
    """Two batches of 16 accumulated into one step move the weights as one batch of 32 (the
    one-block ViT has no BatchNorm, whose statistics would differ; SGD, whose step does not
    magnify last-bit differences)."""
    from convnn.train.runner import run_training

    settings = [*tiny.vit, "optim.name=sgd", "optim.lr=0.05", "train.epochs=1"]
    settings += [f"output.dir={tmp_path}"]
    one = run_training(load_config(None, [*settings, "output.name=one"]))
    two = run_training(
        load_config(
            None, [*settings, "data.batch_size=16", "train.accum_steps=2", "output.name=two"]
        )
    )
    a, b = _weights(tmp_path / "one" / CHECKPOINT), _weights(tmp_path / "two" / CHECKPOINT)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # two different computations
    assert (
        one["epochs"] == two["epochs"]
        and ck.read_metadata(tmp_path / "two" / CHECKPOINT)["state"]["global_step"] == 3
    )


def test_ema_channels_last_top5_and_checkpoint_history(tmp_path, tiny):
    from convnn.train.loading import evaluate_path
    from convnn.train.metrics import correct_count
    from convnn.train.runner import run_training

    settings = [*tiny.cnn, "model.layer=convnn", "train.epochs=3", f"output.dir={tmp_path}"]
    extra = ["train.ema_decay=0.5"]
    summary = run_training(
        load_config(None, [*settings, *extra, "output.keep_checkpoints=3", "output.name=ema"])
    )
    last = run_training(
        load_config(
            None,
            [*settings, *extra, "output.keep_checkpoints=2", "train.channels_last=true"]
            + ["output.name=cl"],
        )
    )
    run = tmp_path / "ema"
    # EMA: the checkpoint keeps the average beside the raw weights; the average is what was
    # evaluated, selected and saved as best.safetensors.
    tensors, meta = ck.load_checkpoint(run / CHECKPOINT)
    raw = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[len("ema.module.") :]: v for k, v in tensors.items() if k.startswith("ema.module.")}
    assert raw.keys() == ema.keys() and int(tensors["ema.n_averaged"]) == 9
    assert not all(torch.equal(raw[k], ema[k]) for k in raw)
    assert summary["ema"] == 0.5
    best = _weights(run / "best.safetensors")
    at_best, _ = ck.load_checkpoint(run / f"checkpoint-epoch{summary['best_epoch']}.safetensors")
    assert all(torch.equal(best[f"model.{k}"], at_best[f"ema.module.{k}"]) for k in ema)
    assert evaluate_path(str(run))["acc"] == summary["test_acc"]
    # Checkpoint history: the last N epochs, each the state at its end.
    kept = sorted(p.name for p in (tmp_path / "cl").glob("checkpoint-epoch*.safetensors"))
    assert kept == ["checkpoint-epoch2.safetensors", "checkpoint-epoch3.safetensors"]
    assert ck.read_metadata(tmp_path / "cl" / kept[0])["state"]["epoch"] == 2
    # Channels-last: the same run, to float tolerance.
    for key in ("test_acc", "test_loss", "best_epoch"):
        assert last[key] == pytest.approx(summary[key], rel=1e-3), key
    # Top-5: a column of metrics.csv and the summary; never below top-1.
    rows = read_metrics_csv(run / "metrics.csv")
    assert all(r["val_acc5"] >= r["val_acc"] for r in rows)
    assert summary["test_acc5"] >= summary["test_acc"]
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(50) % 10
    top5 = (logits.argsort(1, descending=True)[:, :5] == labels[:, None]).any(1).sum()
    assert correct_count(logits, labels, k=5) == int(top5)
    assert correct_count(logits[:, :3], labels % 3, k=5) == 50  # k capped at the classes


# One training run in a fresh process that SIGKILLs itself after optimizer step {step}.
KILL_SCRIPT = """
import os, signal, sys
from convnn.train.config import load_config
from convnn.train.runner import run_training

def kill(run, state):
    if run.global_step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)

run_training(load_config(None, {overrides!r}), callbacks=[kill])
"""


@pytest.mark.slow
def test_resume_after_kill_9_matches_uninterrupted(tmp_path, tiny, convnn, convnn_process):
    settings = [
        *tiny.cnn,
        "model.layer=branching",
        "train.epochs=3",
        "train.max_steps_per_epoch=4",
        "train.accum_steps=2",
        "train.ema_decay=0.9",
        "data.flip=true",
        "data.crop_padding=1",
        f"output.dir={tmp_path}",
    ]
    assert convnn("train", "--set", *settings, "--name", "full").code == 0
    ref = _weights(tmp_path / "full" / CHECKPOINT)
    ref_rows = read_metrics_csv(tmp_path / "full" / "metrics.csv")
    ref_summary = json.loads((tmp_path / "full" / "summary.json").read_text())

    # SIGKILL in the middle of epoch 2 (global step 7 = its step 3 of 4): resumed from the end
    # of epoch 1, or, with a checkpoint every 2 steps, from the middle of epoch 2.
    for every, resume_step in ((0, 0), (2, 2)):
        name = f"cut{every}"
        run = [*settings, f"train.checkpoint_every_steps={every}", f"output.name={name}"]
        killed = convnn_process(["-c", KILL_SCRIPT.format(step=7, overrides=run)])
        assert killed.code == -9, killed.err
        meta = ck.read_metadata(tmp_path / name / CHECKPOINT)
        assert (meta["state"]["epoch"], meta["state"]["step_in_epoch"]) == (1, resume_step)

        resumed = convnn("train", "--set", *run, "--resume")
        assert resumed.code == 0, resumed.err
        assert "resumed" in resumed.out and "changed settings" not in resumed.out

        got = _weights(tmp_path / name / CHECKPOINT)
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
        rows = read_metrics_csv(tmp_path / name / "metrics.csv")
        for ra, rb in zip(ref_rows, rows, strict=True):
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                assert ra[key] == rb[key], (name, key)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert (summary["test_acc"], summary["best_epoch"]) == (
            ref_summary["test_acc"],
            ref_summary["best_epoch"],
        )


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path, tiny, convnn):
    # SGD, because Adam divides by the gradient's magnitude and so turns the last-bit difference
    # between one full-batch mean and the all-reduced mean of two half-batch means into full
    # lr-sized steps wherever a gradient is near zero.
    train = ["train.epochs=2", "optim.name=sgd", "optim.lr=0.05"]
    common = ["--set", *tiny.vit, *train, "--out-dir", str(tmp_path)]
    single = convnn("train", *common, "--name", "one")
    assert single.code == 0, single.err
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "convnn.cli",
            "train",
            *common,
            "--name",
            "two",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=180,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stdout
    assert ddp.stdout.count("outputs in") == 1  # only rank 0 reports
    a, b = _weights(tmp_path / "one" / CHECKPOINT), _weights(tmp_path / "two" / CHECKPOINT)
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a), moved
    sa = json.loads((tmp_path / "one" / "summary.json").read_text())
    sb = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert sb["world_size"] == 2
    assert sa["test_acc"] == pytest.approx(sb["test_acc"], abs=0.01)
