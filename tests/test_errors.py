"""Bad input: every mistake is a ValueError that names the argument or attribute."""

from __future__ import annotations

import pytest
import torch
from _helpers import F64, randn
from torch import nn

from convnn import (
    Branching2d,
    BranchingAttention,
    ConvNN1d,
    ConvNN2d,
    ConvNNAttention,
    backends,
    convert,
)
from convnn.functional import (
    convnn1d,
    convnn2d,
    convnn_attention,
    knn_select,
    neighbor_aggregate,
)

CHOICES = {
    "metric": ["cosine", "euclidean", "dot", "scaled_dot", "spatial"],
    "candidates": ["all", "random", "grid", "window"],
    "weighting": ["none", "softmax"],
    "kernel": ["standard", "depthwise", "separable", "none"],
}


def _raises_listing(name: str, call, choices=None):
    with pytest.raises(ValueError, match=name) as err:
        call()
    message = str(err.value)
    for choice in choices or CHOICES[name]:
        assert repr(choice) in message or choice in message, (choice, message)
    assert "bogus" in message, message


@pytest.mark.parametrize("name", list(CHOICES))
def test_unknown_choice_module(name):
    _raises_listing(name, lambda: ConvNN2d(3, 3, **{name: "bogus"}))
    _raises_listing(name, lambda: ConvNN1d(3, 3, **{name: "bogus"}))


@pytest.mark.parametrize("name", list(CHOICES))
def test_unknown_choice_functional(name):
    x, w = randn(1, 3, 4, 4), randn(3, 3, 3)
    _raises_listing(name, lambda: convnn2d(x, w, K=3, **{name: "bogus"}))
    q = randn(1, 2, 4, 3)
    _raises_listing(name, lambda: convnn_attention(q, q, q, 2, **{name: "bogus"}))


@pytest.mark.parametrize("name", ["metric", "candidates", "weighting", "kernel"])
def test_unknown_choice_attention_module(name):
    choices = ["depthwise", "standard", "none"] if name == "kernel" else None
    _raises_listing(name, lambda: ConvNNAttention(8, 2, **{name: "bogus"}), choices)


def test_unknown_backend_and_conversion():
    _raises_listing("backend", lambda: backends.use("bogus").__enter__(), ["reference", "chunked"])
    x = randn(1, 3, 4, 4)
    _raises_listing(
        "backend", lambda: convnn2d(x, randn(3, 3, 3), K=3, backend="bogus"), ["reference"]
    )
    net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))
    _raises_listing("conv", lambda: convert(net, conv="bogus"), ["exact", "convnn", "branching"])
    _raises_listing("attention", lambda: convert(net, attention="bogus"), ["exact", "kvt"])


@pytest.mark.parametrize("K", [0, -1])
def test_k_below_one(K):
    with pytest.raises(ValueError, match="K"):
        ConvNN2d(3, 3, K=K)
    with pytest.raises(ValueError, match="K"):
        ConvNN1d(3, 3, K=K)
    with pytest.raises(ValueError, match="K"):
        ConvNNAttention(8, 2, K=K)
    with pytest.raises(ValueError, match="K"):
        convnn2d(randn(1, 3, 4, 4), randn(3, 3, 1), K=K)
    q = randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="K"):
        convnn_attention(q, q, q, K)
    with pytest.raises(ValueError, match="K"):
        knn_select(q[0], q[0], K)


def test_k_not_an_integer():
    with pytest.raises(ValueError, match="K"):
        ConvNN2d(3, 3, K=2.5)
    with pytest.raises(ValueError, match="K"):
        ConvNNAttention(8, 2, K=2.5)


@pytest.mark.parametrize(
    ("options", "hw", "K"),
    [
        ({}, (3, 3), 10),  # 9 positions
        ({"padding": 1}, (2, 2), 17),  # 16 padded positions
        ({"candidates": "random", "num_candidates": 5}, (4, 4), 6),
        ({"candidates": "grid", "num_candidates": 4}, (4, 4), 5),
        ({"candidates": "window", "window": 3}, (5, 5), 10),
    ],
)
def test_k_larger_than_candidates(options, hw, K):
    layer = ConvNN2d(2, 2, K=K, **options).to(F64)
    with pytest.raises(ValueError, match="K"):
        layer(randn(1, 2, *hw))
    q = randn(1, 1, hw[0] * hw[1], 2)
    attention_options = {k: v for k, v in options.items() if k != "padding"}
    if "padding" not in options:
        with pytest.raises(ValueError, match="K"):
            convnn_attention(q, q, q, K, hw=hw, **attention_options)


def test_k_larger_than_candidates_knn_select():
    q = randn(1, 5, 3)
    with pytest.raises(ValueError, match="K"):
        knn_select(q, q, 6)
    with pytest.raises(ValueError, match="K"):
        knn_select(q, q, 3, candidates=torch.tensor([0, 1]))


def test_wrong_channel_count():
    with pytest.raises(ValueError, match="channels"):
        ConvNN2d(3, 4, K=3).to(F64)(randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="channels"):
        ConvNN1d(3, 4, K=3).to(F64)(randn(1, 2, 5))
    with pytest.raises(ValueError, match=r"x must be \(B, N, 8\)"):
        ConvNNAttention(8, 2).to(F64)(randn(1, 5, 6))
    with pytest.raises(ValueError, match="x must be"):
        BranchingAttention(8, 2).to(F64)(randn(1, 5, 6))
    with pytest.raises(ValueError, match="weight"):  # functional: weight vs input channels
        convnn2d(randn(1, 3, 4, 4), randn(4, 2, 3), K=3)


def test_wrong_rank():
    with pytest.raises(ValueError, match="x must be a 4-D"):
        ConvNN2d(3, 3, K=3)(randn(3, 5, 5, dtype=torch.float32))
    with pytest.raises(ValueError, match="x must be a 3-D"):
        ConvNN1d(3, 3, K=3)(randn(1, 3, 5, 5, dtype=torch.float32))
    with pytest.raises(ValueError, match="x must be"):
        ConvNNAttention(8, 2)(randn(5, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match="x must be a 4-D"):
        convnn2d(randn(3, 4, 4), randn(3, 3, 3), K=3)
    with pytest.raises(ValueError, match="x must be a 3-D"):
        convnn1d(randn(3, 4), randn(3, 3, 3), K=3)
    with pytest.raises(ValueError, match="q must be"):
        convnn_attention(randn(2, 4, 3), randn(2, 4, 3), randn(2, 4, 3), 2)
    with pytest.raises(ValueError, match="query must be"):
        knn_select(randn(4, 3), randn(4, 3), 2)
    with pytest.raises(ValueError, match="values must be"):
        neighbor_aggregate(randn(4, 3), torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="indices must be"):
        neighbor_aggregate(randn(1, 4, 3), torch.zeros(4, 2, dtype=torch.long), kernel="none")


def test_mismatched_attention_operands():
    q = randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="q, k, v"):
        convnn_attention(q, randn(1, 2, 5, 3), randn(1, 2, 5, 3), 2)
    with pytest.raises(ValueError, match="query and key"):
        knn_select(randn(1, 4, 3), randn(1, 4, 2), 2)
    with pytest.raises(ValueError, match="hw"):
        convnn_attention(q, q, q, 2, hw=(3, 3))


# --------------------------------------------------------------------------- from_conv


@pytest.mark.parametrize(
    ("conv", "attribute"),
    [
        (nn.Conv2d(3, 3, 3, padding=2, dilation=2), "dilation"),
        (nn.Conv2d(3, 3, 4, padding=2), "kernel_size"),
        (nn.Conv2d(3, 3, 2), "kernel_size"),
        (nn.Conv2d(3, 3, (3, 5), padding=(1, 2)), "kernel_size"),
        (nn.Conv2d(3, 3, 3, padding=0), "padding"),
        (nn.Conv2d(3, 3, 3, padding=2), "padding"),
        (nn.Conv2d(3, 3, 3, padding=(1, 0)), "padding"),
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), "groups"),
        (nn.Conv2d(2, 4, 3, padding=1, groups=2), "groups"),
        (nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), "padding_mode"),
        (nn.Conv1d(3, 3, 3, padding=2, dilation=2), "dilation"),
        (nn.Conv1d(3, 3, 4, padding=2), "kernel_size"),
        (nn.Conv1d(3, 3, 3, padding=0), "padding"),
        (nn.Conv1d(4, 4, 3, padding=1, groups=2), "groups"),
        (nn.Conv1d(3, 3, 3, padding=1, padding_mode="reflect"), "padding_mode"),
    ],
)
def test_from_conv_rejects(conv, attribute):
    from_conv = ConvNN2d.from_conv2d if isinstance(conv, nn.Conv2d) else ConvNN1d.from_conv1d
    with pytest.raises(ValueError, match=attribute):
        from_conv(conv)


@pytest.mark.parametrize(
    ("kwargs", "attribute"),
    [
        ({"batch_first": False}, "batch_first"),
        ({"kdim": 4, "batch_first": True}, "kdim"),
        ({"vdim": 4, "batch_first": True}, "vdim"),
        ({"add_bias_kv": True, "batch_first": True}, "add_bias_kv|bias_k"),
        ({"add_zero_attn": True, "batch_first": True}, "add_zero_attn"),
    ],
)
def test_from_attention_rejects(kwargs, attribute):
    mha = nn.MultiheadAttention(8, 2, **kwargs)
    with pytest.raises(ValueError, match=attribute):
        ConvNNAttention.from_attention(mha)


# --------------------------------------------------------------------------- other options


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"candidates": "random"}, "num_candidates"),
        ({"candidates": "grid"}, "num_candidates"),
        ({"candidates": "window"}, "window"),
        ({"kernel": "depthwise", "out_channels": 4}, "out_channels"),
        ({"kernel": "none", "out_channels": 4}, "out_channels"),
        ({"stride": 0}, "stride"),
        ({"padding": -1}, "padding"),
        ({"in_channels": 0}, "in_channels"),
        ({"coords": "polar"}, "coords"),
    ],
)
def test_conv_options_rejected(kwargs, name):
    args = {"in_channels": 3, "out_channels": 3, "K": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        ConvNN2d(**args)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"candidates": "window", "window": 2}, "window"),
        ({"candidates": "window", "window": 7}, "window"),
        ({"candidates": "random", "num_candidates": 17}, "num_candidates"),
        ({"candidates": "random", "num_candidates": 0}, "num_candidates"),
        ({"lam": 1.5, "coords": "xy"}, "lam"),
    ],
)
def test_forward_options_rejected(kwargs, name):
    x = randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=name):
        convnn2d(x, randn(2, 2, 1), K=1, **kwargs)


def test_attention_options_rejected():
    with pytest.raises(ValueError, match="num_heads"):
        ConvNNAttention(10, 3)
    with pytest.raises(ValueError, match="kernel"):
        ConvNNAttention(8, 2, K=None, kernel="depthwise")
    q = randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="kernel"):
        convnn_attention(q, q, q, None, kernel="depthwise", weight=randn(6, 1, 4))
    with pytest.raises(ValueError, match="weight"):
        convnn_attention(q, q, q, 2, kernel="depthwise", weight=randn(6, 1, 3))


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_branching_ratio_rejected(ratio):
    with pytest.raises(ValueError, match="ratio"):
        Branching2d(3, 4, ratio=ratio)
    with pytest.raises(ValueError, match="ratio"):
        BranchingAttention(8, 2, ratio=ratio)


def test_branching_rejects_even_kernel_and_uneven_heads():
    with pytest.raises(ValueError, match="kernel_size"):
        Branching2d(3, 4, kernel_size=4)
    BranchingAttention(8, 2, ratio=0.25)  # widths 2 and 6 split into 2 heads each
    with pytest.raises(ValueError, match="num_heads"):
        BranchingAttention(8, 2, ratio=0.375)  # widths 3 and 5 do not


# --------------------------------------------------------------------------- argument types


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: ConvNNAttention(8, None), "num_heads"),
        (lambda: ConvNNAttention(0, 2), "dim"),
        (lambda: ConvNNAttention(8, 2, attn_drop=float("nan")), "attn_drop"),
        (lambda: ConvNNAttention(8, 2, proj_drop=1.5), "proj_drop"),
        (lambda: BranchingAttention(8, 2, attn_drop=-0.5), "attn_drop"),
        (lambda: BranchingAttention(8, None), "num_heads"),
        (lambda: BranchingAttention(8, 2, ratio="half"), "ratio"),
        (lambda: Branching2d(3, 4, kernel_size=None), "kernel_size"),
        (lambda: Branching2d(None, 4), "in_channels"),
    ],
)
def test_layer_arguments_of_the_wrong_type(make, name):
    """Not a TypeError or ZeroDivisionError from deep inside: a ValueError naming the argument."""
    with pytest.raises(ValueError, match=name) as err:
        make()
    assert "got" in str(err.value)


@pytest.mark.parametrize(
    "layer",
    [
        lambda: ConvNNAttention(8, 2),
        lambda: BranchingAttention(8, 2),
        lambda: Branching2d(3, 4),
        lambda: ConvNN2d(3, 3, K=3),
    ],
)
def test_layer_input_not_a_tensor_or_of_another_dtype(layer):
    torch.manual_seed(0)
    module = layer()
    x = torch.randn((1, 3, 4, 4) if isinstance(module, (Branching2d, ConvNN2d)) else (1, 5, 8))
    for bad in (x.tolist(), x.double(), x.long()):
        with pytest.raises(ValueError, match=r"\bx\b") as err:
            module(bad)
        assert "got" in str(err.value)


def test_functional_flags_and_options_are_checked():
    x, w = randn(1, 3, 4, 4), randn(3, 3, 3)
    for name, bad in [
        ("include_self", "yes"),
        ("training", 1),
        ("return_indices", None),
        ("generator", 0),
        ("selection_dtype", torch.int32),
        ("lam", float("nan")),
    ]:
        with pytest.raises(ValueError, match=name):
            convnn2d(x, w, K=3, **{name: bad})
    q = randn(1, 2, 4, 3)
    for name, bad in [("dropout_p", 1.5), ("hw", (0, 4)), ("hw", "2x2"), ("k", q.float())]:
        with pytest.raises(ValueError, match=name):
            convnn_attention(
                q, q if name != "k" else bad, q, 2, **({} if name == "k" else {name: bad})
            )
    with pytest.raises(ValueError, match="K"):
        convnn2d(x, w, K=None)
    with pytest.raises(ValueError, match="pointwise_weight"):
        convnn2d(x, None, K=3, kernel="none", pointwise_weight=randn(3, 3, 1))
    with pytest.raises(ValueError, match="weights"):
        neighbor_aggregate(
            randn(1, 4, 3),
            torch.zeros(1, 2, 2, dtype=torch.long),
            None,
            weights=randn(1, 2, 2).float(),
            kernel="none",
        )
