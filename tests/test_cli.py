"""The ``convnn`` command: help, one-line errors with exit status 2, eval, compare, demo recipe."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from convnn import cli
from convnn.train.checkpoint import CheckpointError
from convnn.train.config import config_from_dict, config_to_dict
from convnn.train.demo import DEMO_RECIPE
from convnn.train.runner import CHECKPOINT

ROOT = Path(__file__).parents[1]
TINY = [
    "model.name=resnet18",
    "model.img_size=8",
    "data.batch_size=32",
    "train.max_steps_per_epoch=3",
    "train.epochs=2",
    "train.num_threads=1",
    "output.progress=false",
]


# A one-block ViT of 3,850 parameters (seconds per run, checkpoints of a few tens of kB).
TINY_VIT = [
    "model.name=vit_tiny",
    "model.layer=attention",
    "model.img_size=8",
    "model.patch_size=4",
    "model.layer_kwargs.embed_dim=16",
    "model.layer_kwargs.depth=1",
    "model.layer_kwargs.num_heads=2",
    "data.batch_size=32",
    "train.max_steps_per_epoch=2",
    "train.num_threads=1",
    "output.progress=false",
]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convnn: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny finished run, shared by the tests below."""
    out = tmp_path_factory.mktemp("runs")
    assert cli.main(["train", "--set", *TINY, "--out-dir", str(out), "--name", "tiny"]) == 0
    return out / "tiny"


@pytest.mark.parametrize("command", [[]] + [[c.name] for c in cli.COMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: convnn" in out
    if command == ["train"]:
        assert "--resume" in out and "--seeds" in out and "optim:" in out


def test_console_script_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "convnn.cli", "train", "--set", "optim.lrr=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    _one_line_error(proc.stderr, "unknown config key 'optim.lrr'", "valid keys", "optim.lr")


def test_print_config_applies_file_and_overrides(tmp_path, capsys):
    code, out, _ = _run(
        capsys,
        "train",
        "-c",
        str(ROOT / "configs" / "vgg11_cifar10_branching.yaml"),
        "--set",
        "optim.lr=5e-4",
        "--epochs",
        "3",
        "--print-config",
    )
    cfg = yaml.safe_load(out)
    assert code == 0 and cfg["model"]["layer"] == "branching" and cfg["optim"]["lr"] == 5e-4
    assert cfg["train"]["epochs"] == 3 and cfg["data"]["batch_size"] == 256


def test_missing_and_corrupt_cifar_archives(tmp_path, capsys):
    code, _, err = _run(
        capsys, "train", "--set", "data.dataset=cifar10", "--data-dir", str(tmp_path / "none")
    )
    assert code == 2
    expected = ("cifar-10-python.tar.gz", "cifar-10-batches-py", "data_batch_1..5", "test_batch")
    _one_line_error(err, "cifar10", *expected, "--data-dir")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar archive")
    code, _, err = _run(
        capsys, "train", "--set", "data.dataset=cifar10", "--data-dir", str(tmp_path)
    )
    assert code == 2
    _one_line_error(err, "truncated or corrupt", *expected, "--data-dir")


def test_missing_config_file(capsys):
    code, _, err = _run(capsys, "train", "-c", "no/such/recipe.yaml")
    assert code == 2
    _one_line_error(err, "not found")


def test_eval_compare_and_outputs(trained, tmp_path, capsys):
    code, out, _ = _run(capsys, "eval", str(trained))
    assert code == 0 and out.startswith("test acc ")
    code, out, _ = _run(capsys, "eval", str(trained / "checkpoint.safetensors"), "--split", "val")
    assert code == 0 and out.startswith("val acc ")
    png = tmp_path / "cmp.png"
    code, out, _ = _run(capsys, "compare", str(trained), str(trained), "--out", str(png))
    assert code == 0 and png.stat().st_size > 0
    header = out.splitlines()[0].split()
    assert header[:4] == ["run", "model", "layer", "params"] and "test" in header
    assert "resnet18" in out.splitlines()[2]


def test_resume_checkpoint_of_another_model(trained, capsys):
    code, _, err = _run(
        capsys, "train", "--set", *TINY, "model.name=vgg11", "--resume", str(trained)
    )
    assert code == 2
    _one_line_error(err, "different model", "--resume")
    code, _, err = _run(capsys, "eval", str(trained), "--set", "model.name=vgg11")
    assert code == 2
    _one_line_error(err, "different model")


def test_corrupt_checkpoint(trained, tmp_path, capsys):
    blob = (trained / "checkpoint.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(blob[: len(blob) // 2])
    code, _, err = _run(capsys, "eval", str(bad))
    assert code == 2
    _one_line_error(err, "corrupt or truncated")
    code, _, err = _run(capsys, "eval", str(tmp_path / "missing.safetensors"))
    assert code == 2
    _one_line_error(err, "not found")


def test_existing_run_needs_resume(trained, capsys):
    code, _, err = _run(
        capsys, "train", "--set", *TINY, "--out-dir", str(trained.parent), "--name", "tiny"
    )
    assert code == 2
    _one_line_error(err, "--resume")


def test_resume_finished_run_is_a_no_op(trained, capsys):
    before = (trained / "metrics.csv").read_text()
    code, out, _ = _run(capsys, "train", "--resume", str(trained))
    assert code == 0 and "resumed" in out and "test acc" in out
    assert (trained / "metrics.csv").read_text() == before


def test_bad_seeds_argument(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--seeds", "0,x"])
    assert e.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


VERIFY_CASES = {  # name -> what the ConvNN configuration and the recovered module must say
    "convolution 3x3": (["metric='spatial'", "weighting='none'", "kernel='standard'"], "nn.Conv2d"),
    "depthwise convolution 3x3": (["metric='spatial'", "kernel='depthwise'"], "groups=8"),
    "multi-head attention": (
        ["K=None", "weighting='softmax'", "kernel='none'"],
        "MultiheadAttention",
    ),
    "top-k (KVT) attention": (["K=5", "candidates='all'", "weighting='softmax'"], "top-5"),
    "local attention": (["candidates='window'", "weighting='softmax'"], "neighbourhood attention"),
}


def _verify_report(out: str) -> dict[str, tuple[float, str, str, str]]:
    """name -> (max diff, status, ConvNN configuration line, recovered-module line)."""
    lines = out.splitlines()
    report = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"(\S.*?)\s+max\|diff\| = (\S+)\s+(ok|FAIL)", line)
        if m:
            config, recovers = lines[i + 1].strip(), lines[i + 2].strip()
            assert config.startswith("ConvNN:") and recovers.startswith("recovers:"), line
            report[m.group(1)] = (float(m.group(2)), m.group(3), config, recovers)
    return report


def test_verify_prints_configuration_and_difference_per_case(capsys):
    code, out, _ = _run(capsys, "verify")
    assert code == 0
    report = _verify_report(out)
    assert set(VERIFY_CASES) <= set(report)
    for name, (diff, status, *_) in report.items():
        assert status == "ok" and 0 <= diff < 1e-9, name
    for name, (needles, module) in VERIFY_CASES.items():
        config, recovers = report[name][2:]
        assert all(n in config for n in needles), config
        assert module in recovers, recovers


def test_verify_fails_when_a_case_differs(capsys, monkeypatch):
    from convnn import verify

    def off_by_a_bit(dtype):
        config, ref, ours, theirs = verify.CASES["multi-head attention"](dtype)
        return config, ref, ours, theirs + 1e-3

    monkeypatch.setitem(verify.CASES, "broken attention", off_by_a_bit)
    code, out, _ = _run(capsys, "verify", "--dtype", "float32")
    report = _verify_report(out)
    assert code == 1 and report["broken attention"][1] == "FAIL"
    assert report["broken attention"][0] == pytest.approx(1e-3, rel=1e-2)
    assert report["multi-head attention"][1] == "ok"


def test_demo_recipe_matches_configs_demo_yaml():
    recipe = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    assert config_to_dict(config_from_dict(recipe)) == config_to_dict(config_from_dict(DEMO_RECIPE))


def test_register_adds_a_subcommand(capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", list(cli.COMMANDS))

    def add(p):
        p.add_argument("--n", type=int, default=1)

    def run(args):
        if args.n < 0:
            raise CheckpointError("negative n; pass a positive --n")
        print("hello" * args.n)

    cli.register("hello", "say hello", add, run)
    assert _run(capsys, "hello", "--n", "2")[:2] == (0, "hellohello\n")
    code, _, err = _run(capsys, "hello", "--n", "-1")
    assert code == 2
    _one_line_error(err, "negative n")


def test_a_rank_that_joined_a_process_group_exits_without_finalization(tmp_path):
    # The cure for ranks aborting (SIGABRT) inside interpreter finalization after DDP on gloo:
    # once a process group was joined, main() flushes its output and ends with os._exit, so
    # finalization (here: an atexit hook) never runs, and the command's status is kept.
    script = (
        "import atexit, sys\n"
        "from convnn import cli\n"
        "from convnn.train import distributed\n"
        "atexit.register(lambda: print('finalized', flush=True))\n"
        "distributed._joined = True\n"
        "print('before', end='')\n"
        f"sys.exit(cli.main(['compare', {str(tmp_path / 'nope')!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "before"  # flushed, and no finalization
    _one_line_error(proc.stderr, "nope")
    # Without a process group, a normal exit.
    proc = subprocess.run(
        [sys.executable, "-c", script.replace("distributed._joined = True\n", "")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == "beforefinalized\n"


# Each: extra `convnn train` arguments ({tmp} is a fresh folder) and what the one line names.
REFUSED_UP_FRONT = {
    "config is a folder": (["-c", "{tmp}"], ["config file", "is a folder", "YAML"]),
    "betas a number": (["--set", "optim.betas=5"], ["'optim.betas'", "list of 2 numbers", "5"]),
    "betas too short": (["--set", "optim.betas=[0.9]"], ["'optim.betas'", "2 numbers", "[0.9]"]),
    "device tpu": (["--device", "tpu"], ["'train.device'", "auto, cpu, cuda or cuda:N", "'tpu'"]),
    "device cpu:5": (["--set", "train.device=cpu:5"], ["'train.device'", "cuda:N", "'cpu:5'"]),
    "patch size 0": (["--set", "model.patch_size=0"], ["'model.patch_size'", ">= 1", "got 0"]),
    "label smoothing 2": (
        ["--set", "train.label_smoothing=2"],
        ["'train.label_smoothing'", "in [0, 1]", "got 2"],
    ),
    "out-dir a file": (["--out-dir", "{tmp}/file"], ["output.dir", "folder", "is a file"]),
    "out-dir in a file": (["--out-dir", "{tmp}/file/runs"], ["output.dir", "inside the file"]),
    "epochs 0": (["--epochs", "0"], ["'train.epochs'", ">= 1", "got 0"]),
    "epochs -1": (["--set", "train.epochs=-1"], ["'train.epochs'", ">= 1", "got -1"]),
    "weight decay -1": (["--set", "optim.weight_decay=-1"], ["'optim.weight_decay'", ">= 0"]),
    "eval batch 0": (["--set", "data.eval_batch_size=0"], ["'data.eval_batch_size'", ">= 1"]),
    "warmup -1": (["--set", "sched.warmup_epochs=-1"], ["'sched.warmup_epochs'", ">= 0"]),
    "workers -1": (["--set", "data.num_workers=-1"], ["'data.num_workers'", ">= 0", "-1"]),
    "resume a missing path": (["--resume", "{tmp}/nope"], ["--resume", "{tmp}/nope", "not exist"]),
}


@pytest.mark.parametrize("case", list(REFUSED_UP_FRONT))
def test_invalid_train_arguments_are_one_line_before_any_setup(case, tmp_path, capsys, monkeypatch):
    def heavy(*args, **kwargs):
        raise AssertionError("the dataset or the model was set up before the error")

    monkeypatch.setattr("convnn.data.load_dataset", heavy)
    monkeypatch.setattr("convnn.train.runner.build_model", heavy)
    (tmp_path / "file").write_text("not a folder")
    args, needles = REFUSED_UP_FRONT[case]
    args = [a.format(tmp=tmp_path) for a in args]
    out_dir = ["--out-dir", str(tmp_path / "runs")]
    code, _, err = _run(capsys, "train", "--set", *TINY_VIT, *out_dir, *args)
    assert code == 2
    _one_line_error(err, *(n.format(tmp=tmp_path) for n in needles))
    assert not (tmp_path / "runs").exists()


def test_resume_on_a_first_launch_starts_the_run(tmp_path, capsys):
    # A job script that always passes --resume: the first launch starts the run, and says so.
    args = ["train", "--set", *TINY_VIT, "train.epochs=1", "--out-dir", str(tmp_path)]
    code, out, err = _run(capsys, *args, "--name", "job", "--resume")
    assert code == 0 and "error" not in err
    notes = [line for line in out.splitlines() if line.startswith("--resume")]
    assert notes == [f"--resume: no checkpoint in {tmp_path / 'job'} yet; starting a new run there"]
    assert (tmp_path / "job" / "summary.json").exists()
    code, out, _ = _run(capsys, *args, "--name", "job", "--resume")
    assert code == 0 and f"resumed {tmp_path / 'job' / CHECKPOINT} at epoch 1" in out
    # Without a name, the newest run of this model/layer/dataset, or else a new one.
    code, out, _ = _run(capsys, "train", "--set", *TINY_VIT, "train.epochs=1", "--resume",
                        "--out-dir", str(tmp_path / "other"))  # fmt: skip
    assert code == 0 and "starting a new run there" in out
    assert len(list((tmp_path / "other").glob("vit_tiny-attention-digits-*/summary.json"))) == 1


def test_corrupt_image_read_by_worker_processes_is_one_line(tmp_path, capsys):
    from PIL import Image

    for split, count in (("train", 4), ("val", 1)):
        for cls, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), colour).save(folder / f"{i}.png")
    (tmp_path / "data" / "train" / "b" / "2.png").write_bytes(b"not a png")
    code, _, err = _run(
        capsys, "train", "--set", *TINY_VIT, "data.dataset=imagefolder", "data.num_workers=2",
        "data.batch_size=4", "data.val_size=0", "--data-dir", str(tmp_path / "data"),
        "--out-dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert code == 2
    _one_line_error(err, "imagefolder: cannot decode", "2.png", "UnidentifiedImageError")
    assert "worker" not in err


def test_corrupt_checkpoint_is_refused_by_every_command(tmp_path, capsys):
    args = ["train", "--set", *TINY_VIT, "model.layer=kvt", "model.layer_kwargs.K=2"]
    code, _, _ = _run(capsys, *args, "--epochs", "3", "--out-dir", str(tmp_path), "--name", "r")
    assert code == 0
    run = tmp_path / "r"
    ckpt, best = run / CHECKPOINT, run / "best.safetensors"
    rows = (run / "metrics.csv").read_text()
    good = ckpt.read_bytes(), best.read_bytes()
    assert _run(capsys, "inspect", str(ckpt), "--out", str(tmp_path / "n.png"))[0] == 0
    # One bit turns the stored epoch 3 into 1; another flips a weight of the best epoch.
    ckpt.write_bytes(good[0].replace(b'\\"epoch\\": 3', b'\\"epoch\\": 1', 1))
    blob = bytearray(good[1])
    blob[-200] ^= 0x10
    best.write_bytes(bytes(blob))
    for argv in (
        ["train", "--set", *TINY_VIT, "model.layer=kvt", "model.layer_kwargs.K=2", "--epochs",
         "5", "--resume", str(run)],
        ["train", "--resume", str(ckpt)],
        ["eval", str(ckpt)],
        ["eval", str(run)],  # best.safetensors
        ["inspect", str(ckpt)],
        ["inspect", str(run), "--config", str(run / "config.yaml")],
    ):  # fmt: skip
        code, _, err = _run(capsys, *argv)
        assert code == 2, argv
        _one_line_error(err, "is corrupt or truncated (checksum mismatch)")
    assert (run / "metrics.csv").read_text() == rows  # nothing resumed "at epoch 1"
