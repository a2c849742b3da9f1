"""convert() on the models people already use: torchvision, timm and nn.TransformerEncoder.

Every model has random weights with non-zero biases (and non-zero BatchNorm statistics), so
that a dropped bias, norm or dropout shows. 'exact' conversions and every attention kind at
K = N (for 'local': a window covering the map) must give the original logits (<= 1e-5 in
float32); every converted model takes a training step.
"""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
import torchvision
from torch import nn

from convnn import ConvNN2d, ConvNNAttention, convert
from convnn.nn import Branching2d, BranchingAttention, MultiheadAttentionAdapter

TOL = 1e-5
KINDS = ("exact", "kvt", "convnn_attention", "local", "branching_attention")


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-zero biases, random values for parameters initialised to zero (class
    tokens, torchvision's ViT head), random BatchNorm statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def image(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def seen(model: nn.Module) -> set[str]:
    """Names of every convolution and attention module (what the report must list)."""
    kinds = (nn.Conv2d, nn.MultiheadAttention, timm.layers.Attention)
    return {n for n, m in model.named_modules() if isinstance(m, kinds)}


def assert_reports_everything(report, names: set[str]) -> None:
    listed = [r.name for r in report.replaced] + [k.name for k in report.skipped]
    assert len(listed) == len(set(listed))
    assert set(listed) == names
    text = str(report)
    assert all(name in text for name in names)


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    """One SGD step: finite loss, a gradient on every ConvNN parameter, parameters move."""
    model.train()
    layers = [m for m in model.modules() if isinstance(m, (ConvNN2d, ConvNNAttention))]
    convnn = list({id(p): p for m in layers for p in m.parameters()}.values())
    assert convnn
    before = [p.detach().clone() for p in convnn]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, torch.tensor([1, 2]))
    assert loss.isfinite()
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in convnn)
    opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(convnn, before))


# --------------------------------------------------------------------------- CNNs

CNNS = {
    "torchvision_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32),
    "torchvision_resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 32),
    "torchvision_vgg11": (lambda: torchvision.models.vgg11(num_classes=10), 32),
    "timm_resnet50": (lambda: timm.create_model("resnet50", num_classes=10), 32),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), 32),
}
MEASURED: dict[str, float] = {}


@pytest.mark.parametrize("name", list(CNNS))
def test_cnn_exact_conversion_keeps_logits_and_trains(name):
    build, size = CNNS[name]
    torch.manual_seed(0)
    model = randomized(build())
    x = image(size)
    with torch.no_grad():
        before = model(x)
    names = seen(model)
    report = convert(model, conv="exact", include_strided=True)
    assert_reports_everything(report, names)
    kept = {k.name: k.reason for k in report.skipped}
    assert all(isinstance(model.get_submodule(r.name), ConvNN2d) for r in report.replaced)
    assert all(r.K == model.get_submodule(r.name).weight.shape[-1] for r in report.replaced)
    assert len(report.replaced) > 0 and all(
        "1x1" in why or "kernel" in why for why in kept.values()
    )
    with torch.no_grad():
        after = model(x)
    MEASURED[name] = max_diff(after, before)
    assert MEASURED[name] <= TOL, MEASURED[name]
    train_step(model, x)


def test_depthwise_convs_are_converted_exactly():
    """convnext_atto's 7x7 depthwise convolutions: 'exact' and trainable 'convnn'."""
    model = randomized(timm.create_model("convnext_atto", num_classes=10))
    depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 12
    twin = copy.deepcopy(model)
    report = convert(model, conv="exact")
    assert {r.name for r in report.replaced} == set(depthwise)
    assert all(model.get_submodule(n).kernel == "depthwise" for n in depthwise)
    report = convert(twin, conv="convnn", metric="cosine")
    layer = twin.get_submodule(depthwise[0])
    assert (layer.kernel, layer.K, layer.metric) == ("depthwise", 49, "cosine")
    train_step(twin, image(32))


def test_conv_padding_same_anisotropic_stride_and_reasons_kept():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.same = nn.Conv2d(3, 4, 3, padding="same")
            self.tall = nn.Conv2d(4, 4, 3, stride=(2, 1), padding=1)
            self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
            self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
            self.valid = nn.Conv2d(4, 4, 3)
            self.even = nn.Conv2d(4, 4, 2)
            self.rect = nn.Conv2d(4, 4, (1, 3), padding=(0, 1))
            self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
            self.depthwise = nn.Conv2d(4, 4, 5, padding="same", groups=4)

        def forward(self, x):
            for m in self.children():
                x = m(x)
            return x.flatten(1)

    net = randomized(Net())
    x = image(12)
    with torch.no_grad():
        before = net(x)
    report = convert(net, conv="exact", include_strided=True)
    assert {r.name for r in report.replaced} == {"same", "tall", "depthwise"}
    assert net.tall.stride == (2, 1)
    kept = {k.name: k.reason for k in report.skipped}
    for name, word in [
        ("grouped", "groups"),
        ("dilated", "dilation"),
        ("valid", "padding"),
        ("even", "even"),
        ("rect", "square"),
        ("reflect", "padding_mode"),
    ]:
        assert word in kept[name], kept[name]
    with torch.no_grad():
        assert max_diff(net(x), before) <= TOL
    # trainable kinds keep the anisotropic stride and 'same' padding too
    net = Net()
    convert(net, conv="branching", include_strided=True, ratio=0.5)
    assert isinstance(net.tall, Branching2d) and net.tall.convnn.stride == (2, 1)
    assert net.tall.conv.stride == (2, 1) and net(x).shape == before.shape


def test_options_are_split_by_layer_type():
    """A recipe's ``ratio`` does not break conv='convnn' (it is a Branching2d option); options
    no kind takes are a ValueError listing the valid ones; per-type dicts separate K."""
    model = torchvision.models.resnet18(num_classes=10)
    convert(model, conv="convnn", K=9, ratio=0.5, split="heads")
    assert model.layer1[0].conv1.K == 9
    with pytest.raises(ValueError, match="metric") as err:
        convert(torchvision.models.resnet18(), conv="convnn", bogus=1)
    assert "bogus" in str(err.value)
    with pytest.raises(ValueError, match="attention_kwargs"):
        convert(torchvision.models.resnet18(), attention="kvt", attention_kwargs={"ratio": 1})
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
    model.attn = nn.MultiheadAttention(4, 2, batch_first=True)
    convert(model, conv="convnn", attention="kvt", conv_kwargs={"K": 5}, attention_kwargs={"K": 3})
    assert model[0].K == 5 and model.attn.attention.K == 3


def test_candidate_counts_on_small_deep_maps():
    """candidates='random' with num_candidates=32: ResNet's deep maps (1x1 to 4x4 at 32 px) have
    fewer positions, where the layer uses its whole padded map; the report says so."""
    model = torchvision.models.resnet18(num_classes=10)
    report = convert(model, conv="convnn", candidates="random", num_candidates=32)
    layer = model.layer4[1].conv1
    assert layer.effective_candidates(4) == "all" and layer.effective_candidates(64) == "random"
    assert any("num_candidates=32" in note for note in report.notes)
    x = image(32)  # layer4's maps are 1 x 1
    with torch.no_grad():
        assert model.eval()(x).isfinite().all()
    train_step(model, x)


# --------------------------------------------------------------------------- ViTs


def tv_vit():
    model = torchvision.models.vit_b_16(image_size=48, num_classes=10)
    model.encoder.layers = model.encoder.layers[:2]  # two of the twelve blocks, for time
    return model


VITS = {  # 48 px at patch 16: a 3 x 3 token map after the class (and distillation) tokens
    "torchvision_vit_b_16": tv_vit,
    "timm_vit_tiny": lambda: timm.create_model(
        "vit_tiny_patch16_224", img_size=48, depth=2, num_classes=10
    ),
    "timm_deit_tiny": lambda: timm.create_model(
        "deit_tiny_patch16_224", img_size=48, depth=2, num_classes=10
    ),
    "timm_vit_qk_norm": lambda: timm.create_model(
        "vit_tiny_patch16_224", img_size=48, depth=2, num_classes=10, qk_norm=True
    ),
}
N_TOKENS = 10


def at_k_equal_n(kind: str) -> dict:
    return {"K": N_TOKENS} if kind in ("kvt", "convnn_attention", "branching_attention") else {}


@functools.cache
def _vit(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomized(VITS[name]())


def vit(name: str) -> nn.Module:
    """A fresh copy of a randomized ViT (built once: vit_b_16 takes seconds to initialise)."""
    return copy.deepcopy(_vit(name))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(VITS))
def test_vit_every_attention_kind_at_k_equal_n_keeps_logits(name, kind):
    model = vit(name)
    x = image(48)
    with torch.no_grad():
        before = model(x)
    names = seen(model)
    report = convert(model, conv=None, attention=kind, window=3, **at_k_equal_n(kind))
    assert_reports_everything(report, names)
    attn = [r for r in report.replaced]
    assert len(attn) == 2 and all(r.kind == kind for r in attn)
    if kind == "local":  # the 3 x 3 window and the class token: every token
        assert all(r.K == N_TOKENS for r in attn)
    with torch.no_grad():
        after = model(x)
    MEASURED[f"{name}/{kind}"] = max_diff(after, before)
    assert MEASURED[f"{name}/{kind}"] <= TOL, MEASURED[f"{name}/{kind}"]
    train_step(model, x)


@pytest.mark.parametrize("kind", KINDS[1:])
@pytest.mark.parametrize("name", ["timm_vit_tiny"])
def test_vit_sparse_attention_kinds_train(name, kind):
    """K < N (a 1 x 1 window for 'local': the query and the class token) differs from
    attention, and trains."""
    model = vit(name)
    x = image(48)
    with torch.no_grad():
        before = model(x)
    convert(model, conv=None, attention=kind, **({"window": 1} if kind == "local" else {"K": 4}))
    with torch.no_grad():
        assert max_diff(model(x), before) > 1e-3
    train_step(model, x)


def test_every_weight_bias_and_dropout_is_kept():
    """The MHA's biases (in and out), its dropout, batch_first and the rest of its attributes
    carry over to every kind, and bias=False stays bias-free."""
    for bias in (True, False):
        for kind in KINDS:
            mha = nn.MultiheadAttention(8, 2, dropout=0.25, bias=bias, batch_first=True)
            model = nn.Sequential()
            model.attn = mha
            convert(model, conv=None, attention=kind, window=1, grid_size=(2, 2))
            new = model.attn
            assert isinstance(new, MultiheadAttentionAdapter)
            inner = new.attention
            assert inner.attn_drop.p == 0.25 and new.dropout == 0.25
            assert (inner.qkv.bias is not None) == bias and (inner.proj.bias is not None) == bias
            assert torch.equal(new.in_proj_weight, mha.in_proj_weight)
            assert torch.equal(new.out_proj.weight, mha.out_proj.weight)
            if bias:
                assert torch.equal(new.in_proj_bias, mha.in_proj_bias)
                assert torch.equal(new.out_proj.bias, mha.out_proj.bias)
            attrs = ("embed_dim", "num_heads", "head_dim", "batch_first", "kdim", "vdim")
            assert all(getattr(new, a) == getattr(mha, a) for a in attrs)


def test_timm_attention_inside_its_block_signature():
    """timm's Block calls attn(x, attn_mask=..., is_causal=...): None / False run, a mask
    or causal attention is refused clearly; a gated attention is kept with its reason."""
    block = timm.models.vision_transformer.Block(16, 2, qkv_bias=True)
    randomized(block)
    x = torch.randn(2, 5, 16)
    ref = block(x)
    report = convert(block, conv=None, attention="exact")
    assert isinstance(block.attn, ConvNNAttention)
    assert max_diff(block(x), ref) <= TOL
    assert max_diff(block(x, attn_mask=None, is_causal=False), ref) <= TOL
    with pytest.raises(ValueError, match="attn_mask"):
        block(x, attn_mask=torch.zeros(5, 5))
    with pytest.raises(ValueError, match="is_causal"):
        block(x, is_causal=True)
    for kind in ("exact", "convnn_attention", "branching_attention"):  # qk_norm, scale_norm
        block = timm.models.vision_transformer.Block(
            16, 2, qkv_bias=True, qk_norm=True, scale_attn_norm=True
        )
        randomized(block)
        ref = block(x)
        convert(block, conv=None, attention=kind, K=5)
        assert not isinstance(block.attn.q_norm, nn.Identity)
        assert not isinstance(block.attn.norm, nn.Identity)
        assert max_diff(block(x), ref) <= TOL
    gated = timm.layers.Attention(16, 2, gated=True)
    holder = nn.Sequential()
    holder.attn = gated
    report = convert(holder, conv=None, attention="kvt")
    assert report.skipped[0].name == "attn" and "gate" in report.skipped[0].reason


def test_local_attention_needs_an_explicit_token_map():
    """The map of a token sequence is never guessed from a perfect square: an nn.Transformer
    without grid_size keeps its attention for 'local', with the reason."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    report = convert(model, conv=None, attention="local")
    assert not report.replaced and "grid_size" in report.skipped[0].reason
    report = convert(model, conv=None, attention="local", grid_size=(2, 2), num_prefix_tokens=1)
    assert len(report.replaced) == 1
    with pytest.raises(ValueError, match="tokens"):
        model(torch.randn(1, 4, 8))  # 4 tokens, the layer expects 1 + 2 * 2
    attn = ConvNNAttention(8, 2, K=None, kernel="none", candidates="window", window=3)
    with pytest.raises(ValueError, match="grid_size"):
        attn(torch.randn(1, 9, 8))  # 9 = 3 * 3 tokens, but no map was given


# --------------------------------------------------------------------------- nn.TransformerEncoder


def encoder(batch_first: bool):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=batch_first)
    model = nn.Sequential()
    model.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)
    return randomized(model)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_transformer_encoder_every_kind(kind, batch_first):
    """Equal at K = N in eval, with and without grad (its fused fast path must not bypass the
    converted attention), in both layouts; then a training step (dropout on)."""
    model = encoder(batch_first)
    x = torch.randn(2, 10, 16) if batch_first else torch.randn(10, 2, 16)
    with torch.no_grad():
        before = model(x)
    report = convert(
        model, conv=None, attention=kind, grid_size=(3, 3), num_prefix_tokens=1, window=3,
        **at_k_equal_n(kind),
    )  # fmt: skip
    assert len(report.replaced) == 2
    with torch.no_grad():
        MEASURED[f"transformer_encoder/{kind}/batch_first={batch_first}"] = d = max_diff(
            model(x), before
        )
    assert d <= TOL
    assert max_diff(model(x), before) <= TOL  # with grad
    model.train()
    y = model(x)
    y.square().mean().backward()
    attn = model.encoder.layers[0].self_attn.attention
    assert attn.qkv.weight.grad is not None and attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="key_padding_mask"):
        model.encoder(x, src_key_padding_mask=torch.zeros(2, 10, dtype=torch.bool))


@pytest.mark.parametrize("kind", KINDS)
def test_multihead_adapter_need_weights(kind):
    """need_weights returns MHA's weights (averaged or per head), batched or not."""
    torch.manual_seed(0)
    mha = randomized(nn.MultiheadAttention(8, 2, batch_first=True))
    model = nn.Sequential()
    model.attn = copy.deepcopy(mha)
    k = {"K": 9} if kind in ("kvt", "convnn_attention", "branching_attention") else {}
    convert(model, conv=None, attention=kind, grid_size=(3, 3), window=3, **k)
    x = torch.randn(2, 9, 8)
    for average in (True, False):
        y_ref, w_ref = mha(x, x, x, average_attn_weights=average)
        y, w = model.attn(x, x, x, average_attn_weights=average)
        assert max_diff(w, w_ref) <= TOL and max_diff(y, y_ref) <= TOL
    y_ref, w_ref = mha(x[0], x[0], x[0])
    y, w = model.attn(x[0], x[0], x[0])
    assert max_diff(w, w_ref) <= TOL and max_diff(y, y_ref) <= TOL
    with pytest.raises(ValueError, match="self-attention"):
        model.attn(x, x.clone(), x)


def test_branching_attention_heads_split_is_exact_at_k_equal_n():
    mha = randomized(nn.MultiheadAttention(12, 3, batch_first=True))
    layer = BranchingAttention.from_attention(mha, ratio=0.5, split="heads", K=7)
    assert layer.branch_heads == (1, 2) and layer.widths == (4, 8)
    x = torch.randn(2, 7, 12)
    assert max_diff(layer(x), mha(x, x, x, need_weights=False)[0]) <= TOL
    with pytest.raises(ValueError, match="split"):
        BranchingAttention(8, 1, ratio=0.5, split="heads")


def test_measured_differences_are_reported(capsys):
    """Prints the max |diff| measured above (run with -s to see them)."""
    for name, diff in sorted(MEASURED.items()):
        print(f"{name}: {diff:.2e}")
    assert all(d <= TOL for d in MEASURED.values())
