"""Modules: ConvNN2d/1d shapes and parameters, Branching2d, BranchingAttention, convert()."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import BACKENDS, F64, feature_convnn, max_diff, mhsa, on_backend, randn
from torch import nn

from convnn import (
    Branching2d,
    BranchingAttention,
    ConversionReport,
    ConvNN1d,
    ConvNN2d,
    ConvNNAttention,
    convert,
)

# --------------------------------------------------------------------------- ConvNN2d / 1d


@pytest.mark.parametrize("hw", [(7, 7), (5, 9), (1, 6), (6, 1), (4, 3)])
@pytest.mark.parametrize("stride", [1, 2, 3, (1, 2)])
@pytest.mark.parametrize("padding", [0, 1, (0, 2)])
def test_convnn2d_output_shape(hw, stride, padding):
    layer = ConvNN2d(3, 5, K=3, stride=stride, padding=padding).to(F64)
    sh, sw = stride if isinstance(stride, tuple) else (stride, stride)
    y = layer(randn(2, 3, *hw))
    assert y.shape == (2, 5, math.ceil(hw[0] / sh), math.ceil(hw[1] / sw))
    assert y.isfinite().all()


@pytest.mark.parametrize(
    ("kernel", "shapes"),
    [
        ("standard", {"weight": (5, 3, 4), "bias": (5,)}),
        ("depthwise", {"weight": (3, 1, 4), "bias": (3,)}),
        ("separable", {"weight": (3, 1, 4), "pointwise_weight": (5, 3, 1), "bias": (5,)}),
        ("none", {"bias": (3,)}),
    ],
)
def test_convnn2d_parameters(kernel, shapes):
    c_out = 5 if kernel in ("standard", "separable") else 3
    layer = ConvNN2d(3, c_out, K=4, kernel=kernel)
    got = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert got == shapes
    assert layer(randn(1, 3, 4, 4, dtype=torch.float32)).shape == (1, c_out, 4, 4)
    assert isinstance(repr(layer), str)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_convnn2d_feature_metric_matches_independent(backend, metric):
    torch.manual_seed(0)
    layer = ConvNN2d(3, 4, K=5, metric=metric).to(F64)
    x = randn(2, 3, 5, 6, seed=1)
    with on_backend(backend):
        y = layer(x)
    assert max_diff(y, feature_convnn(x, layer.weight, layer.bias, 5, metric)) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_convnn1d_is_convnn2d_on_a_row(backend):
    """The 1-D layer is the same operator on a 1 x L map."""
    torch.manual_seed(0)
    one = ConvNN1d(3, 4, K=3, stride=2, padding=1).to(F64)
    two = ConvNN2d(3, 4, K=3, stride=(1, 2), padding=(0, 1)).to(F64)
    two.load_state_dict(one.state_dict())
    x = randn(2, 3, 9, seed=2)
    with on_backend(backend):
        y1, y2 = one(x), two(x[:, :, None])[:, :, 0]
    assert y1.shape == (2, 4, 5)
    assert max_diff(y1, y2) < 1e-12


def test_attention_return_indices_shape():
    layer = ConvNNAttention(8, 2, K=3).to(F64)
    y, idx = layer(randn(2, 7, 8), return_indices=True)
    assert y.shape == (2, 7, 8) and idx.shape == (2, 2, 7, 3)
    assert idx.min() >= 0 and idx.max() < 7


# --------------------------------------------------------------------------- Branching2d


def _copy_conv(weight, bias, stride, padding):
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[-1], stride, padding)
    conv = conv.to(F64)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_branching_ratio_zero_is_conv_plus_pointwise(backend, stride, kernel_size):
    torch.manual_seed(0)
    layer = Branching2d(3, 6, kernel_size=kernel_size, ratio=0.0, stride=stride).to(F64)
    assert layer.convnn is None
    conv = _copy_conv(layer.conv.weight, layer.conv.bias, stride, kernel_size // 2)
    point = _copy_conv(layer.pointwise.weight, layer.pointwise.bias, 1, 0)
    x = randn(2, 3, 7, 6, seed=3)
    with on_backend(backend):
        y = layer(x)
    assert max_diff(y, point(conv(x))) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_branching_ratio_one_is_convnn_plus_pointwise(backend):
    torch.manual_seed(0)
    layer = Branching2d(3, 5, ratio=1.0, K=4).to(F64)
    assert layer.conv is None and layer.convnn.out_channels == 5
    x = randn(2, 3, 4, 5, seed=4)
    with on_backend(backend):
        y = layer(x)
    inner = feature_convnn(x, layer.convnn.weight, layer.convnn.bias, 4)
    ref = F.conv2d(inner, layer.pointwise.weight, layer.pointwise.bias)
    assert max_diff(y, ref) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_branching_spatial_ratio_one_is_two_convolutions(backend):
    """A spatial ConvNN branch with K = 9, padding 1 is a 3x3 convolution."""
    torch.manual_seed(0)
    layer = Branching2d(3, 4, ratio=1.0, K=9, stride=2, padding=1, metric="spatial").to(F64)
    x = randn(2, 3, 7, 8, seed=5)
    w = layer.convnn.weight.view(4, 3, 3, 3)
    ref = F.conv2d(F.conv2d(x, w, layer.convnn.bias, 2, 1), layer.pointwise.weight)
    with on_backend(backend):
        y = layer(x)
    assert max_diff(y, ref + layer.pointwise.bias[:, None, None]) < 1e-10


@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.5, 0.7, 0.75, 0.9])
@pytest.mark.parametrize("out_channels", [7, 10])
def test_branching_channel_split(ratio, out_channels):
    torch.manual_seed(0)
    layer = Branching2d(3, out_channels, ratio=ratio, K=4).to(F64)
    c_nn = math.floor(ratio * out_channels)
    assert (layer.convnn.out_channels if c_nn else 0) == c_nn
    assert (layer.conv.out_channels if layer.conv is not None else 0) == out_channels - c_nn
    x = randn(1, 3, 4, 4, seed=6)
    y = layer(x)
    assert y.shape == (1, out_channels, 4, 4)
    # ConvNN channels first, then the convolution's, then the 1x1 fusion
    parts = [feature_convnn(x, layer.convnn.weight, layer.convnn.bias, 4)] if c_nn else []
    parts.append(F.conv2d(x, layer.conv.weight, layer.conv.bias, 1, 1))
    ref = F.conv2d(torch.cat(parts, 1), layer.pointwise.weight, layer.pointwise.bias)
    assert max_diff(y, ref) < 1e-10


# --------------------------------------------------------------------------- BranchingAttention


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_branching_attention_ratio_zero_is_mhsa(backend, qkv_bias):
    torch.manual_seed(0)
    layer = BranchingAttention(8, 2, ratio=0.0, qkv_bias=qkv_bias).to(F64).eval()
    x = randn(2, 7, 8, seed=7)
    with on_backend(backend):
        y = layer(x)
    ref = F.linear(mhsa(x, layer.qkv.weight, layer.qkv.bias, 2), layer.proj.weight, layer.proj.bias)
    assert max_diff(y, ref) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_branching_attention_halves(backend):
    """ratio 0.5: the first half of q, k, v runs top-K ConvNN attention (depthwise weights
    start at one), the second half full attention, both with num_heads heads."""
    torch.manual_seed(0)
    layer = BranchingAttention(8, 2, ratio=0.5, K=3, qkv_bias=True).to(F64).eval()
    x = randn(2, 9, 8, seed=8)
    with on_backend(backend):
        y = layer(x)
    qkv = F.linear(x, layer.qkv.weight, layer.qkv.bias).view(2, 9, 3, 8)
    halves = []
    for cols, K in ((slice(0, 4), 3), (slice(4, 8), None)):
        part = qkv[..., cols].reshape(2, 9, 12)
        halves.append(mhsa(part, torch.eye(12, dtype=F64), None, 2, K))
    ref = F.linear(torch.cat(halves, -1), layer.proj.weight, layer.proj.bias)
    assert max_diff(y, ref) < 1e-10


# --------------------------------------------------------------------------- convert


class _Net(nn.Module):
    """A small ResNet-like model: 3x3 convs (stride 1 and 2), 1x1 convs, a shortcut, MHSA."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1, bias=False)
        )
        self.shortcut = nn.Conv2d(8, 8, 1, 2)
        self.head = nn.Conv2d(8, 8, 1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.head(self.block(x) + self.shortcut(x))
        t = x.flatten(2).transpose(1, 2)
        return t + self.attn(t, t, t)[0]


def _net(dtype=F64):
    torch.manual_seed(0)
    net = _Net().to(dtype).eval()
    with torch.no_grad():
        net.attn.in_proj_bias.normal_()
    return net


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_exact_keeps_outputs(backend):
    net = _net()
    x = randn(2, 3, 9, 7, seed=9)
    before = net(x)
    report = convert(net, conv="exact", attention="exact", include_strided=True)
    assert isinstance(report, ConversionReport)
    replaced = {r.name for r in report.replaced}
    skipped = {k.name for k in report.skipped}
    assert replaced == {"stem", "block.0", "block.2", "attn"}
    assert skipped == {"shortcut", "head"}
    assert isinstance(net.stem, ConvNN2d) and isinstance(net.block[2], ConvNN2d)
    assert isinstance(net.head, nn.Conv2d)
    text = str(report)
    assert all(name in text for name in replaced | skipped)
    with on_backend(backend):
        after = net(x)
    assert max_diff(after, before) < 1e-9


def test_convert_skips_strided_unless_asked():
    net = _net()
    x = randn(1, 3, 6, 6, seed=10)
    before = net(x)
    report = convert(net, conv="exact", attention=None)
    reasons = {k.name: k.reason for k in report.skipped}
    assert "stride" in reasons["block.2"]
    assert {r.name for r in report.replaced} == {"stem", "block.0"}
    assert isinstance(net.attn, nn.MultiheadAttention)
    assert max_diff(net(x), before) < 1e-9


@pytest.mark.parametrize(
    ("conv", "attention"),
    [("convnn", "kvt"), ("branching", "convnn_attention"), ("convnn", "branching_attention")],
)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_convert_trainable_layers_run(conv, attention, dtype):
    """New (non-exact) layers take the replaced module's device and dtype."""
    net = _net(dtype)
    x = randn(2, 3, 6, 6, seed=11, dtype=dtype)
    shape = net(x).shape
    report = convert(net, conv=conv, attention=attention, include_strided=True, K=4)
    assert len(report.replaced) == 4
    assert {p.dtype for p in net.parameters()} == {dtype}
    y = net.train()(x)
    assert y.shape == shape and y.dtype == dtype and y.isfinite().all()
    y.sum().backward()


# --------------------------------------------------------------------------- drop-in constructors


def test_conv2d_positional_arguments_mean_what_they_mean_for_nn_conv2d():
    """ConvNN2d(64, 64, 3, padding=1): kernel_size 3 -> K = 9, the input's spatial size."""
    layer = ConvNN2d(8, 8, 3, padding=1)
    assert layer.K == 9 and layer.padding == (1, 1) and layer.weight.shape == (8, 8, 9)
    x = randn(2, 8, 5, 6, dtype=torch.float32)
    y, idx = layer(x, return_indices=True)
    assert y.shape == (2, 8, 5, 6) and idx.shape[-1] == 9
    assert ConvNN2d(8, 8, 3, padding="same").padding == (1, 1)
    assert ConvNN2d(8, 8, (5, 5), padding="valid").K == 25
    assert ConvNN2d(8, 8, padding="same").padding == (1, 1)  # K=9 default: a 3x3 window
    assert ConvNN2d(8, 8, K=16).K == 16  # keyword users of K keep working
    assert ConvNN1d(8, 8, 5, padding="same").K == 5 and ConvNN1d(8, 8).K == 3
    depthwise = ConvNN2d(8, 8, 3, 1, 1, groups=8)
    assert depthwise.kernel == "depthwise" and depthwise.weight.shape == (8, 1, 9)
    # the same as nn.Conv2d, positional to the end, in the 'spatial' configuration
    conv = nn.Conv2d(8, 4, 3, (2, 1), 1, 1, 1, True)
    layer = ConvNN2d(8, 4, 3, (2, 1), 1, 1, 1, True, metric="spatial")
    with torch.no_grad():
        layer.weight.copy_(conv.weight.flatten(2))
        layer.bias.copy_(conv.bias)
    assert max_diff(layer(x), conv(x)) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel_size": 3, "K": 16}, "kernel_size"),
        ({"kernel_size": 4, "padding": "same"}, "same"),
        ({"K": 8, "padding": "same"}, "same"),
        ({"kernel_size": (3, 5)}, "kernel_size"),
        ({"kernel_size": 3, "dilation": 2}, "dilation"),
        ({"kernel_size": 3, "groups": 2}, "groups"),
        ({"kernel_size": 3, "groups": 8, "kernel": "standard"}, "groups"),
        ({"kernel_size": 3, "padding": "full"}, "padding"),
        ({"kernel_size": 3, "padding_mode": "reflect"}, "padding_mode"),
    ],
)
def test_conv2d_ambiguous_or_unsupported_calls_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvNN2d(8, 8, **kwargs)


def _every_module(device=None, dtype=None):
    f = {"device": device, "dtype": dtype}
    return [
        ConvNN2d(4, 4, 3, padding=1, **f),
        ConvNN1d(4, 4, 3, padding=1, **f),
        ConvNN2d(4, 4, 3, padding=1, kernel="separable", **f),
        ConvNNAttention(8, 2, K=3, qk_norm=True, **f),
        Branching2d(4, 6, 3, padding="same", **f),
        BranchingAttention(8, 2, ratio=0.5, K=3, **f),
        BranchingAttention(8, 2, ratio=0.5, K=3, split="heads", **f),
    ]


def test_every_module_takes_device_dtype_and_resets():
    for module in _every_module(device="meta", dtype=F64):
        assert {(p.device.type, p.dtype) for p in module.parameters()} == {("meta", F64)}
    for module in _every_module():
        text = repr(module)
        assert type(module).__name__ in text and module.extra_repr()
        before = copy.deepcopy(module.state_dict())
        with torch.no_grad():
            for p in module.parameters():
                p.add_(1.0)
        module.reset_parameters()  # every parameter re-initialised, none left as it was
        after = module.state_dict()
        assert all(not torch.equal(after[n], before[n] + 1) for n in before), type(module)
