"""``convnn inspect``: per-layer neighbour statistics and the plot of a trained run."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from convnn import cli
from convnn.nn import ConvNN2d
from convnn.train.loading import load_trained_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW = re.compile(
    r"(?P<name>\S+)\s+(?P<h>\d+)x(?P<w>\d+)\s+(?P<k>\d+)\s+(?P<mean>\S+)\s+(?P<max>\S+)"
    r"\s+(?P<beyond>\S+)%\s+(?P<off>\S+)%"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny, trained) -> dict[str, Path]:
    """A tiny ResNet-18 trained with ConvNN layers (maps from 8x8 to 1x1), and a run with
    plain convolutions."""
    out = tmp_path_factory.mktemp("runs")
    argv = ["train", "--set", *tiny.resnet, "train.epochs=1", "model.layer=convnn"]
    assert cli.main([*argv, "--out-dir", str(out), "--name", "convnn"]) == 0
    return {"convnn": out / "convnn", "conv": trained["cnn"]}


def _table(out: str) -> dict[str, dict]:
    rows = {}
    for line in out.splitlines():
        m = ROW.fullmatch(line.strip())
        if m:
            rows[m["name"]] = {k: v if k == "name" else float(v) for k, v in m.groupdict().items()}
    return rows


def _plot_line(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("plot: ")]
    return line


def test_one_line_per_convnn_layer_and_a_png(runs, convnn):
    code, out, err = convnn("inspect", runs["convnn"], "--images", "2")
    assert code == 0, err
    model = load_trained_model(runs["convnn"]).model
    expected = [n for n, m in model.named_modules() if isinstance(m, ConvNN2d)]
    rows = _table(out)
    assert list(rows) == expected and len(expected) >= 8
    for name, row in rows.items():
        assert row["k"] == 9, name
        assert all(math.isfinite(row[c]) for c in ("mean", "max", "beyond", "off")), row
        assert 0 <= row["mean"] <= row["max"] <= max(row["h"], row["w"]), row
        assert 0 <= row["beyond"] <= 100 and 0 <= row["off"] <= 100, row
    # A 1x1 map with one ring of padding has exactly 9 candidates: the query (distance 0)
    # and the 8 padding cells around it (distance 1).
    for name in ("layer4.0.conv2", "layer4.1.conv1"):
        row = rows[name]
        assert (row["h"], row["w"]) == (1, 1)
        assert row["mean"] == pytest.approx(8 / 9, abs=0.005) and row["max"] == 1
        assert row["beyond"] == 0 and row["off"] == pytest.approx(800 / 9, abs=0.05)
    assert (rows["layer1.0.conv1"]["h"], rows["layer1.0.conv1"]["w"]) == (8, 8)
    assert "images 0-1 of the test split" in out.splitlines()[0]
    png = runs["convnn"] / "neighbors.png"
    assert str(png) in _plot_line(out)
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_layer_filter_queries_out_and_checkpoint(runs, tmp_path, convnn):
    png = tmp_path / "sub" / "picks.png"
    code, out, err = convnn(
        "inspect",
        str(runs["convnn"] / "checkpoint.safetensors"),
        "--split",
        "val",
        "--index",
        "5",
        "--layers",
        "layer3.1",
        "layer1.0.conv1",
        "--queries",
        "0,0",
        "1,1",
        "--out",
        str(png),
    )
    assert code == 0, err
    assert "image 5 of the val split" in out.splitlines()[0]
    shown = _plot_line(out).split("layers ")[1].rstrip(")").split(", ")
    assert shown == ["layer1.0.conv1", "layer3.1.conv1", "layer3.1.conv2"]
    assert png.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--layers", "layer9"], ["--layers", "layer1.0.conv1", "'layer9'"]),
        (["--index", "100000"], ["--index", "--images", "100000"]),
        (["--images", "0"], ["--images", "positive", "got 0"]),
        (["--queries", *["0.5,0.5"] * 6], ["--queries", "at most 5", "got 6"]),
    ],
)
def test_bad_arguments(runs, argv, needles, convnn):
    result = convnn("inspect", runs["convnn"], *argv)
    assert result.code == 2
    result.error_line(*needles)


def test_query_outside_the_map(runs, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["inspect", str(runs["convnn"]), "--queries", "0.5,1.5"])
    assert e.value.code == 2
    assert "--queries" in capsys.readouterr().err


def test_run_without_convnn_layers(runs, convnn):
    result = convnn("inspect", runs["conv"])
    assert result.code == 2 and result.out == ""
    result.error_line("layer=conv", "no ConvNN layer")
    assert not (runs["conv"] / "neighbors.png").exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["inspect", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: convnn inspect")
    for option in ("RUN_DIR|CHECKPOINT", "--split", "--images", "--index", "--layers", "--queries"):
        assert option in out
