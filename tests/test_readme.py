"""The README's self-contained snippets run as written, and do what their comments say.

(Snippets that name the user's own tensors, such as the functional API's sketch, are not
run.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import convnn

README = (Path(__file__).parents[1] / "README.md").read_text()


def snippet(first_line: str) -> str:
    """The ```python block of the README that starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"one README python block must start with {first_line!r}"
    return found[0]


def run(code: str) -> dict:
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_quickstart():
    torch.manual_seed(0)
    ns = run(snippet("import torch\nfrom convnn import ConvNN2d"))
    y, idx = ns["y"], ns["idx"]
    assert y.shape == (8, 128, 32, 32) and idx.shape == (8, 1024, 9)  # as its comment says
    assert ns["tokens"].shape == (8, 197, 192)
    assert isinstance(ns["hybrid"], convnn.Branching2d)
    assert ns["hybrid"](ns["x"]).shape == (8, 128, 32, 32)


def test_custom_metric():
    try:
        ns = run(snippet("import torch, convnn\n\nclass Cauchy"))
        x = torch.randn(2, 64, 6, 6)
        assert ns["layer"](x).shape == x.shape
        assert ns["attn"](torch.randn(2, 20, 384)).shape == (2, 20, 384)
    finally:
        if "cauchy" in convnn.metric_names():
            convnn.unregister_metric("cauchy")


def test_timm_registry():
    pytest.importorskip("timm")
    ns = run(snippet("import timm, convnn.models"))
    model = ns["model"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(model.layer1[0].conv1, convnn.Branching2d)


def test_drop_in_timm_and_torchvision():
    """A timm ViT and a torchvision ResNet, converted, take a backward pass."""
    pytest.importorskip("timm")
    ns = run(snippet("import timm, torch, torchvision"))
    vit, resnet = ns["vit"], ns["resnet"]
    assert isinstance(vit.blocks[0].attn, convnn.ConvNNAttention)
    assert isinstance(resnet.layer1[0].conv1, convnn.Branching2d)
    assert vit.blocks[0].attn.qkv.weight.grad is not None
