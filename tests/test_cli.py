"""The ``convnn`` command: help, one-line errors with exit status 2, eval, compare, demo recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from convnn import cli
from convnn.train.checkpoint import CheckpointError
from convnn.train.config import config_from_dict, config_to_dict
from convnn.train.demo import DEMO_RECIPE
from convnn.train.rundir import CHECKPOINT

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("command", [[]] + [[c.name] for c in cli.COMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: convnn" in out
    if command == ["train"]:
        assert "--resume" in out and "--seeds" in out and "optim:" in out


def test_help_imports_no_torch_and_lists_the_choices(convnn_process):
    """`convnn --help` and every subcommand's --help answer without importing torch (which
    alone takes seconds), and list what each choice allows."""
    names = [c.name for c in cli.COMMANDS]
    script = (
        "import sys\n"
        "from convnn import cli\n"
        f"for argv in [[], *[[n] for n in {names!r}]]:\n"
        "    try:\n"
        "        cli.main([*argv, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        "    assert 'torch' not in sys.modules, argv\n"
    )
    result = convnn_process(["-c", script])
    assert result.code == 0, result.err
    helps = result.out.split("usage: convnn")
    train = next(h for h in helps if h.startswith(" train"))
    for listed in (
        "small_cnn | vgg11 |",  # models
        "[conv | convnn | branching]",  # layers of the default model
        "[cifar10 | cifar100 | digits | imagefolder]",  # datasets
        "[adamw | sgd]",  # optimizers
        "[cosine | step | constant]",  # schedules
    ):
        assert listed in train, listed
    demo = next(h for h in helps if h.startswith(" demo"))
    assert "the demo's settings" in demo and f"name={DEMO_RECIPE['model']['name']}" in demo
    # Every option of every subcommand has help text.
    for text in helps[1:]:
        options = re.findall(r"^  (-{1,2}\S+)(.*)$", text, re.M)
        for option, rest in options:
            assert rest.strip() or option == "-h", (text.split()[0], option)


def test_help_choices_agree_with_the_registries():
    from convnn.backends import BACKENDS
    from convnn.cli import choices, verify
    from convnn.train import zoo

    assert choices.model_names() == zoo.list_models()
    for name in zoo.list_models():
        assert list(choices.MODEL_LAYERS[name]) == zoo.layer_choices(name), name
    assert set(verify.BACKENDS) == set(BACKENDS)


def test_console_script_entry_point(convnn_process):
    result = convnn_process(["train", "--set", "optim.lrr=1"])
    assert result.code == 2
    result.error_line("unknown config key 'optim.lrr'", "valid keys", "optim.lr")


def test_print_config_applies_file_and_overrides(convnn):
    code, out, _ = convnn(
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


def test_missing_and_corrupt_cifar_archives(tmp_path, convnn, tiny):
    cifar = ["train", "--set", *tiny.cnn, "data.dataset=cifar10", "--data-dir"]
    result = convnn(*cifar, tmp_path / "none")
    assert result.code == 2
    expected = ("cifar-10-python.tar.gz", "cifar-10-batches-py", "data_batch_1..5", "test_batch")
    result.error_line("cifar10", *expected, "--data-dir")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar archive")
    result = convnn(*cifar, tmp_path)
    assert result.code == 2
    result.error_line("truncated or corrupt", *expected, "--data-dir")


def test_missing_config_file(convnn):
    result = convnn("train", "-c", "no/such/recipe.yaml")
    assert result.code == 2
    result.error_line("not found")


def test_eval_compare_and_outputs(trained, tmp_path, convnn):
    run = trained["cnn"]
    code, out, _ = convnn("eval", run)
    assert code == 0 and out.startswith("test acc ") and "top-5" in out
    code, out, _ = convnn("eval", run / "checkpoint.safetensors", "--split", "val")
    assert code == 0 and out.startswith("val acc ")
    png = tmp_path / "cmp.png"
    code, out, _ = convnn("compare", run, trained["convnn"], "--out", png)
    assert code == 0 and png.stat().st_size > 0
    header = out.splitlines()[0].split()
    assert header[:4] == ["run", "model", "layer", "params"] and "test" in header
    assert "small_cnn" in out.splitlines()[2]


def test_compare_never_overwrites_and_titles_its_plot(trained, tmp_path, convnn):
    import shutil

    for name in ("cnn", "convnn"):
        shutil.copytree(trained[name], tmp_path / name)
    runs = [tmp_path / "cnn", tmp_path / "convnn"]
    first, second = convnn("compare", *runs), convnn("compare", *runs)
    assert first.out.splitlines()[-1] == f"plot: {tmp_path / 'compare.png'}"
    assert second.out.splitlines()[-1] == f"plot: {tmp_path / 'compare-2.png'}"
    explicit = tmp_path / "compare.png"
    before = explicit.read_bytes()
    assert convnn("compare", runs[0], "--out", explicit, "--title", "mine").code == 0
    assert explicit.read_bytes() != before  # an explicit --out is replaced
    from convnn.train.report import default_title, load_run

    assert default_title([load_run(r) for r in runs]) == "small_cnn: conv vs convnn on digits"


def test_resume_checkpoint_of_another_model(trained, convnn, tiny):
    run = trained["cnn"]
    result = convnn("train", "--set", *tiny.cnn, "model.layer_kwargs.width=4", "--resume", run)
    assert result.code == 2
    result.error_line("cannot resume", "model.layer_kwargs", "architecture")
    result = convnn("eval", run, "--set", "model.layer_kwargs.width=4")
    assert result.code == 2
    result.error_line("different model")


def test_corrupt_checkpoint(trained, tmp_path, convnn):
    blob = (trained["cnn"] / "checkpoint.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(blob[: len(blob) // 2])
    result = convnn("eval", bad)
    assert result.code == 2
    result.error_line("corrupt or truncated")
    result = convnn("eval", tmp_path / "missing.safetensors")
    assert result.code == 2
    result.error_line("not found")


def test_existing_run_needs_resume(trained, convnn, tiny):
    run = trained["cnn"]
    result = convnn("train", "--set", *tiny.cnn, "--out-dir", run.parent, "--name", run.name)
    assert result.code == 2
    result.error_line("--resume")


def test_resume_finished_run_is_a_no_op(trained, convnn):
    run = trained["cnn"]
    before = (run / "metrics.csv").read_text()
    code, out, _ = convnn("train", "--resume", run)
    assert code == 0 and "resumed" in out and "test acc" in out
    assert (run / "metrics.csv").read_text() == before


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


def test_verify_prints_configuration_and_difference_per_case(convnn):
    code, out, _ = convnn("verify")
    assert code == 0
    report = _verify_report(out)
    assert set(VERIFY_CASES) <= set(report)
    for name, (diff, status, *_) in report.items():
        assert status == "ok" and 0 <= diff < 1e-9, name
    for name, (needles, module) in VERIFY_CASES.items():
        config, recovers = report[name][2:]
        assert all(n in config for n in needles), config
        assert module in recovers, recovers


def test_verify_fails_when_a_case_differs(convnn, monkeypatch):
    from convnn import verify

    def off_by_a_bit(dtype):
        config, ref, ours, theirs = verify.CASES["multi-head attention"](dtype)
        return config, ref, ours, theirs + 1e-3

    monkeypatch.setitem(verify.CASES, "broken attention", off_by_a_bit)
    code, out, _ = convnn("verify", "--dtype", "float32")
    report = _verify_report(out)
    assert code == 1 and report["broken attention"][1] == "FAIL"
    assert report["broken attention"][0] == pytest.approx(1e-3, rel=1e-2)
    assert report["multi-head attention"][1] == "ok"


def test_demo_recipe_matches_configs_demo_yaml():
    recipe = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    assert config_to_dict(config_from_dict(recipe)) == config_to_dict(config_from_dict(DEMO_RECIPE))


@pytest.mark.slow
def test_demo_writes_both_runs_the_comparison_and_the_neighbour_picture(tmp_path, convnn):
    out = tmp_path / "demo"
    result = convnn(
        "demo", "--out-dir", out, "--set", "train.epochs=1", "train.max_steps_per_epoch=3"
    )
    assert result.code == 0, result.err
    for layer in ("convnn", "conv"):
        summary = yaml.safe_load((out / layer / "summary.json").read_text())
        assert summary["model"] == "small_cnn" and summary["layer"] == layer
        assert summary["params"] < 100_000
        # Checkpoints sized to the model: weights and AdamW state of ~66,000 parameters.
        assert (out / layer / CHECKPOINT).stat().st_size < 1_500_000
    for png in ("compare.png", "neighbors.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    assert f"neighbours: {out / 'neighbors.png'}" in result.out
    assert "outside the 3x3 window of a convolution" in result.out


def test_register_adds_a_subcommand(convnn, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", list(cli.COMMANDS))

    def add(p):
        p.add_argument("--n", type=int, default=1)

    def run(args):
        if args.n < 0:
            raise CheckpointError("negative n; pass a positive --n")
        print("hello" * args.n)

    cli.register("hello", "say hello", add, run)
    assert convnn("hello", "--n", "2").out == "hellohello\n"
    result = convnn("hello", "--n", "-1")
    assert result.code == 2
    result.error_line("negative n")


def test_a_rank_that_joined_a_process_group_exits_without_finalization(tmp_path, convnn_process):
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
    result = convnn_process(["-c", script])
    assert result.code == 2, result.err
    assert result.out == "before"  # flushed, and no finalization
    result.error_line("nope")
    # Without a process group, a normal exit.
    result = convnn_process(["-c", script.replace("distributed._joined = True\n", "")])
    assert result.code == 2 and result.out == "beforefinalized\n"


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
def test_invalid_train_arguments_are_one_line_before_any_setup(
    case, tmp_path, convnn, tiny, monkeypatch
):
    def heavy(*args, **kwargs):
        raise AssertionError("the dataset or the model was set up before the error")

    monkeypatch.setattr("convnn.data.load_dataset", heavy)
    monkeypatch.setattr("convnn.train.runner.build_model", heavy)
    (tmp_path / "file").write_text("not a folder")
    args, needles = REFUSED_UP_FRONT[case]
    args = [a.format(tmp=tmp_path) for a in args]
    out_dir = ["--out-dir", str(tmp_path / "runs")]
    result = convnn("train", "--set", *tiny.vit, *out_dir, *args)
    assert result.code == 2
    result.error_line(*(n.format(tmp=tmp_path) for n in needles))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("settings", "needles"),
    [
        (["model.layer=convnn", "model.layer_kwargs.metric=nope"], ["metric", "'nope'"]),
        (["model.layer=branching", "model.layer_kwargs.ratio=2"], ["ratio", "2"]),
        (["model.layer_kwargs.KK=3"], ["KK"]),
        (["sched.name=onecycle"], ["'sched.name'", "cosine, step, constant", "onecycle"]),
    ],
)
def test_bad_values_are_refused_before_any_setup_and_by_print_config(
    settings, needles, tmp_path, convnn, tiny, monkeypatch
):
    """A layer option's name or value (checked by the layers) and every config value are
    refused before the data is read or the model built, and --print-config checks them too."""

    def heavy(*args, **kwargs):
        raise AssertionError("the dataset or the model was set up before the error")

    monkeypatch.setattr("convnn.data.load_dataset", heavy)
    monkeypatch.setattr("convnn.train.runner.build_model", heavy)
    args = ["train", "--set", *tiny.cnn, *settings, "--out-dir", tmp_path]
    for extra in ([], ["--print-config"]):
        result = convnn(*args, *extra)
        assert result.code == 2 and result.out == ""
        result.error_line(*needles)
    assert not list(tmp_path.iterdir())


def test_resume_on_a_first_launch_starts_the_run(tmp_path, convnn, tiny):
    # A job script that always passes --resume: the first launch starts the run, and says so.
    args = ["train", "--set", *tiny.vit, "train.epochs=1", "--out-dir", str(tmp_path)]
    code, out, err = convnn(*args, "--name", "job", "--resume")
    assert code == 0 and "error" not in err
    notes = [line for line in out.splitlines() if line.startswith("--resume")]
    assert notes == [f"--resume: no checkpoint in {tmp_path / 'job'} yet; starting a new run there"]
    assert (tmp_path / "job" / "summary.json").exists()
    code, out, _ = convnn(*args, "--name", "job", "--resume")
    assert code == 0 and f"resumed {tmp_path / 'job' / CHECKPOINT} at epoch 1" in out
    # Without a name, the newest run of this model/layer/dataset, or else a new one.
    code, out, _ = convnn("train", "--set", *tiny.vit, "train.epochs=1", "--resume",
                          "--out-dir", str(tmp_path / "other"))  # fmt: skip
    assert code == 0 and "starting a new run there" in out
    assert len(list((tmp_path / "other").glob("vit_tiny-attention-digits-*/summary.json"))) == 1


def test_corrupt_image_read_by_worker_processes_is_one_line(tmp_path, convnn, tiny):
    from PIL import Image

    for split, count in (("train", 4), ("val", 1)):
        for cls, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), colour).save(folder / f"{i}.png")
    (tmp_path / "data" / "train" / "b" / "2.png").write_bytes(b"not a png")
    result = convnn(
        "train", "--set", *tiny.vit, "data.dataset=imagefolder", "data.num_workers=2",
        "data.batch_size=4", "data.val_size=0", "--data-dir", str(tmp_path / "data"),
        "--out-dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert result.code == 2
    result.error_line("imagefolder: cannot decode", "2.png", "UnidentifiedImageError")
    assert "worker" not in result.err


def test_corrupt_checkpoint_is_refused_by_every_command(tmp_path, convnn, tiny):
    args = ["train", "--set", *tiny.vit, "model.layer=kvt", "model.layer_kwargs.K=2"]
    code, _, _ = convnn(*args, "--epochs", "3", "--out-dir", str(tmp_path), "--name", "r")
    assert code == 0
    run = tmp_path / "r"
    ckpt, best = run / CHECKPOINT, run / "best.safetensors"
    rows = (run / "metrics.csv").read_text()
    good = ckpt.read_bytes(), best.read_bytes()
    assert convnn("inspect", ckpt, "--out", tmp_path / "n.png").code == 0
    # One bit turns the stored epoch 3 into 1; another flips a weight of the best epoch.
    ckpt.write_bytes(good[0].replace(b'\\"epoch\\": 3', b'\\"epoch\\": 1', 1))
    blob = bytearray(good[1])
    blob[-200] ^= 0x10
    best.write_bytes(bytes(blob))
    for argv in (
        ["train", "--set", *tiny.vit, "model.layer=kvt", "model.layer_kwargs.K=2", "--epochs",
         "5", "--resume", str(run)],
        ["train", "--resume", str(ckpt)],
        ["eval", str(ckpt)],
        ["eval", str(run)],  # best.safetensors
        ["inspect", str(ckpt)],
        ["inspect", str(run), "--config", str(run / "config.yaml")],
    ):  # fmt: skip
        result = convnn(*argv)
        assert result.code == 2, argv
        result.error_line("is corrupt or truncated (checksum mismatch)")
    assert (run / "metrics.csv").read_text() == rows  # nothing resumed "at epoch 1"
