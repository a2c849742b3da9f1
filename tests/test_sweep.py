"""``convnn sweep``: a grid x seeds through the ordinary runner, one table and one plot."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from convnn.train.config import ConfigError
from convnn.train.sweep import expand_grid, parse_grid

GRID = ["layer.metric=cosine,euclidean", "layer.K=4,9"]


@pytest.mark.slow
def test_sweep_of_a_2x2_grid_with_2_seeds_writes_the_table_and_the_plot(tmp_path, tiny, convnn):
    args = ["sweep", "--set", *tiny.cnn, "model.layer=convnn", "train.epochs=1"]
    args += ["data.eval_batch_size=512"]  # few evaluation batches: seconds per run
    args += ["--out-dir", tmp_path, "--name", "s", "--grid", *GRID, "--seeds", "0,1"]
    result = convnn(*args)
    assert result.code == 0, result.err
    folder = tmp_path / "s"
    points = [
        "metric-cosine_K-4",
        "metric-cosine_K-9",
        "metric-euclidean_K-4",
        "metric-euclidean_K-9",
    ]
    runs = {p: [folder / f"{p}-seed{s}" for s in (0, 1)] for p in points}
    summaries = {
        p: [json.loads((d / "summary.json").read_text()) for d in dirs] for p, dirs in runs.items()
    }
    with open(folder / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model.layer_kwargs.metric"], r["model.layer_kwargs.K"]) for r in rows] == [
        ("cosine", "4"),
        ("cosine", "9"),
        ("euclidean", "4"),
        ("euclidean", "9"),
    ]
    for row, point in zip(rows, points):
        accs = [s["test_acc"] for s in summaries[point]]
        mean = sum(accs) / 2
        std = abs(accs[0] - accs[1]) / 2**0.5
        assert float(row["test_acc_mean"]) == pytest.approx(mean)
        assert float(row["test_acc_std"]) == pytest.approx(std)
        assert int(row["seeds"]) == 2 and int(row["params"]) == summaries[point][0]["params"]
        assert float(row["train_img_per_s"]) > 0
        # The runs are ordinary ones: the layer options of the point, the seed of the run.
        for seed, run in enumerate(runs[point]):
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            assert cfg["model"]["layer_kwargs"]["K"] == int(row["model.layer_kwargs.K"])
            assert cfg["train"]["seed"] == seed
    assert rows[0]["params"] != rows[1]["params"]  # K=4 and K=9 layers differ
    table = (folder / "sweep.md").read_text()
    assert (
        "| metric | K | test acc % |" in table
        and table.count(" | ") > 0
        and table.count(" +- ") == 1 + 8
    )
    assert (folder / "sweep.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((folder / "sweep.json").read_text())["seeds"] == [0, 1]
    # compare and inspect work on its runs.
    assert convnn("compare", *runs[points[0]], "--out", tmp_path / "c.png").code == 0
    assert convnn("inspect", runs[points[0]][0], "--out", tmp_path / "n.png").code == 0
    # The same command again: finished runs are skipped, an unfinished one resumed.
    (runs[points[3]][1] / "summary.json").unlink()
    again = convnn(*args)
    assert again.code == 0
    assert again.out.count("finished before, skipped") == 7
    assert f"resumed {runs[points[3]][1] / 'checkpoint.safetensors'}" in again.out
    assert (folder / "sweep.csv").read_text().count("\n") == 5


def test_the_whole_grid_is_checked_before_anything_trains(tmp_path, tiny, convnn):
    args = ["sweep", "--set", *tiny.cnn, "model.layer=convnn", "--out-dir", tmp_path]
    result = convnn(*args, "--grid", "layer.metric=cosine,nope", "layer.K=4,9")
    assert result.code == 2
    result.error_line("grid point metric=nope, K=4", "metric", "'nope'")
    assert not list(tmp_path.iterdir())
    result = convnn(*args, "--grid", "optim.lrr=1,2")
    result.error_line("unknown config key 'optim.lrr'")
    listed = convnn(*args, "--grid", *GRID, "--seeds", "0,1,2", "--print-config")
    assert listed.code == 0 and len(listed.out.splitlines()) == 4
    assert "metric-euclidean_K-9: model.layer_kwargs.metric=euclidean model.layer_kwargs.K=9" in (
        listed.out
    )
    assert not list(tmp_path.iterdir())


def test_grid_items():
    grid = parse_grid(["layer.metric=cosine,euclidean", "optim.betas=[0.9, 0.99],[0.8, 0.9]"])
    assert grid == [
        ("model.layer_kwargs.metric", ["cosine", "euclidean"]),
        ("optim.betas", ["[0.9, 0.99]", "[0.8, 0.9]"]),
    ]
    points = expand_grid(grid)
    assert len(points) == 4 and points[1].overrides == [
        "model.layer_kwargs.metric=cosine",
        "optim.betas=[0.8, 0.9]",
    ]
    for bad, needle in (
        ("layer.K", "KEY=V1,V2"),
        ("layer.K=4,,9", "empty value"),
        ("layer.K=4,4", "repeats"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse_grid([bad])
    with pytest.raises(ConfigError, match="twice"):
        parse_grid(["layer.K=4", "model.layer_kwargs.K=9"])
