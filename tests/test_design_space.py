"""The design space as components (DESIGN.md 2 and 2b): one options object, the metrics,
the positional encodings and the dispatcher, each against an independent float64 formula."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import convnn.functional as CF
from convnn import ConvNN1d, ConvNN2d, ConvNNAttention
from convnn.spec import ConvNNSpec

F64 = torch.float64


def _documented(doc: str) -> set[str]:
    """Names documented as ``name:`` entries of a docstring's argument list."""
    return {m.group(1) for m in re.finditer(r"^\s+(\w+)(?:, \w+)*:", doc, re.M)} | {
        n for m in re.finditer(r"^\s+(\w+(?:, \w+)+):", doc, re.M) for n in m.group(1).split(", ")
    }


@pytest.mark.parametrize("layer", [ConvNN2d, ConvNNAttention])
def test_layer_options_are_the_spec(layer):
    """Every option of ConvNNSpec is a documented argument of the layer and of its
    functional form, and the layer keeps it in ``layer.spec``."""
    fields = set(ConvNNSpec.fields())
    fn = CF.convnn2d if layer is ConvNN2d else CF.convnn_attention
    for callable_ in (layer.__init__, fn):
        assert fields <= set(inspect.signature(callable_).parameters), callable_
    missing = fields - _documented(layer.__doc__)
    assert not missing, f"{layer.__name__} does not document {sorted(missing)}"


def test_spec_validates_once_with_clear_errors():
    with pytest.raises(ValueError, match="metric must be one of"):
        ConvNNSpec(metric="nope")
    with pytest.raises(ValueError, match="num_candidates is required"):
        ConvNNSpec(candidates="grid")
    with pytest.raises(ValueError, match="K=None"):
        ConvNNSpec(K=None)
    spec = ConvNNSpec(metric="euclidean", weighting="softmax")
    assert spec.changed() == {"metric": "euclidean", "weighting": "softmax"}
    assert ConvNN2d(4, 4, K=4, metric="euclidean", weighting="softmax").spec == spec.replace(K=4)


def test_extra_repr_shows_non_default_options():
    r = repr(ConvNN2d(4, 4, K=4, metric="euclidean", weighting="softmax"))
    assert "metric='euclidean'" in r and "weighting='softmax'" in r and "candidates" not in r
    r = repr(ConvNNAttention(8, 2, K=3))
    assert "metric" not in r and "K=3" in r
    r = repr(ConvNN1d(4, 4, K=3, positional="coords", lam=0.25))
    assert "positional='coords'" in r and "lam=0.25" in r


def test_coords_deprecated_name_is_positional_coords():
    x = torch.randn(1, 3, 5, 6, dtype=F64)
    w = torch.randn(3, 3, 4, dtype=F64)
    a = CF.convnn2d(x, w, K=4, coords="xy", lam=0.3)
    b = CF.convnn2d(x, w, K=4, positional="coords", lam=0.3)
    assert torch.equal(a, b)
    assert ConvNN2d(3, 3, K=4, coords="xy").spec.positional == "coords"
    with pytest.raises(ValueError, match="coords='xy' is positional='coords'"):
        CF.convnn2d(x, w, K=4, coords="xy", positional="rope")
