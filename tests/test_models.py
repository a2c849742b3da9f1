"""Model zoo: every model x layer runs, names match torchvision/timm, checkpoints load."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convnn import Branching2d, ConvNN2d, ConvNNAttention, convert
from convnn.models import create_model, layer_choices, list_models, load_pretrained

CASES = [(name, layer) for name in list_models() for layer in layer_choices(name)]


def _small(name: str) -> dict:
    return dict(patch_size=8, depth=2, img_size=32) if name.startswith("vit") else dict(img_size=16)


@pytest.mark.parametrize("name,layer", CASES)
def test_forward_backward_every_layer(name, layer):
    torch.manual_seed(0)
    kw = _small(name)
    model = create_model(name, num_classes=10, layer=layer, **kw)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    y = model(x)
    assert y.shape == (2, 10)
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("name", ["vit_tiny", "resnet18", "vgg11"])
def test_full_depth_at_digits_size(name):
    """Full-depth models run on 8x8 single-channel inputs (the embedded digits set)."""
    kw = {"patch_size": 2} if name.startswith("vit") else {}
    layer = layer_choices(name)[1]
    model = create_model(name, num_classes=10, in_chans=1, img_size=8, layer=layer, **kw)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


# --- torchvision / timm state dicts, written out independently of convnn's model code -------


def _bn(prefix: str, c: int) -> dict:
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def torchvision_resnet(blocks: list[int], bottleneck: bool) -> dict:
    """Key -> shape of ``torchvision.models.resnetNN().state_dict()`` (1000 classes)."""
    expansion = 4 if bottleneck else 1
    sd = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            if bottleneck:
                sd[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                sd |= _bn(f"{p}.bn1", planes)
                sd[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                sd |= _bn(f"{p}.bn2", planes)
                sd[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                sd |= _bn(f"{p}.bn3", planes * 4)
            else:
                sd[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                sd |= _bn(f"{p}.bn1", planes)
                sd[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                sd |= _bn(f"{p}.bn2", planes)
            if b == 0 and (stage > 1 or inplanes != planes * expansion):
                sd[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                sd |= _bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    sd["fc.weight"], sd["fc.bias"] = (1000, 512 * expansion), (1000,)
    return sd


# (index in ``features``, in, out) of every conv of torchvision's VGG without batch norm.
VGG_CONVS = {
    "vgg11": [(0, 3, 64), (3, 64, 128), (6, 128, 256), (8, 256, 256), (11, 256, 512),
              (13, 512, 512), (16, 512, 512), (18, 512, 512)],
    "vgg16": [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256),
              (12, 256, 256), (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512),
              (24, 512, 512), (26, 512, 512), (28, 512, 512)],
}  # fmt: skip


def torchvision_vgg(name: str) -> dict:
    sd = {}
    for i, cin, cout in VGG_CONVS[name]:
        sd[f"features.{i}.weight"], sd[f"features.{i}.bias"] = (cout, cin, 3, 3), (cout,)
    for i, (cout, cin) in zip((0, 3, 6), ((4096, 512 * 7 * 7), (4096, 4096), (1000, 4096))):
        sd[f"classifier.{i}.weight"], sd[f"classifier.{i}.bias"] = (cout, cin), (cout,)
    return sd


def timm_vit(dim: int, depth: int, patch: int = 16, img: int = 224) -> dict:
    """Key -> shape of ``timm.create_model('vit_*_patch16_224').state_dict()``."""
    sd = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, (img // patch) ** 2 + 1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        p = f"blocks.{i}"
        sd |= {
            f"{p}.norm1.weight": (dim,),
            f"{p}.norm1.bias": (dim,),
            f"{p}.attn.qkv.weight": (3 * dim, dim),
            f"{p}.attn.qkv.bias": (3 * dim,),
            f"{p}.attn.proj.weight": (dim, dim),
            f"{p}.attn.proj.bias": (dim,),
            f"{p}.norm2.weight": (dim,),
            f"{p}.norm2.bias": (dim,),
            f"{p}.mlp.fc1.weight": (4 * dim, dim),
            f"{p}.mlp.fc1.bias": (4 * dim,),
            f"{p}.mlp.fc2.weight": (dim, 4 * dim),
            f"{p}.mlp.fc2.bias": (dim,),
        }
    sd |= {"norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (1000, dim)}
    sd["head.bias"] = (1000,)
    return sd


REFERENCE_SHAPES = {
    "resnet18": lambda: torchvision_resnet([2, 2, 2, 2], bottleneck=False),
    "resnet34": lambda: torchvision_resnet([3, 4, 6, 3], bottleneck=False),
    "resnet50": lambda: torchvision_resnet([3, 4, 6, 3], bottleneck=True),
    "vgg11": lambda: torchvision_vgg("vgg11"),
    "vgg16": lambda: torchvision_vgg("vgg16"),
    "vit_tiny": lambda: timm_vit(192, 12),
    "vit_small": lambda: timm_vit(384, 12),
    "vit_base": lambda: timm_vit(768, 12),
}


def test_reference_shapes_are_the_published_ones():
    """Spot checks of the reference tables against the published torchvision/timm models."""
    r18, r50 = REFERENCE_SHAPES["resnet18"](), REFERENCE_SHAPES["resnet50"]()
    assert r18["conv1.weight"] == (64, 3, 7, 7) and r18["layer1.0.conv1.weight"] == (64, 64, 3, 3)
    assert r18["layer2.0.downsample.0.weight"] == (128, 64, 1, 1) and r18["fc.weight"] == (
        1000,
        512,
    )
    assert sum(len(s) == 4 for s in r18.values()) == 20  # 17 3x3/7x7 convs + 3 downsamples
    assert r50["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert r50["layer4.2.conv3.weight"] == (2048, 512, 1, 1) and r50["fc.weight"] == (1000, 2048)
    assert len(r50) == 320
    vgg = REFERENCE_SHAPES["vgg16"]()
    assert vgg["features.0.weight"] == (64, 3, 3, 3) and vgg["features.28.weight"] == (
        512,
        512,
        3,
        3,
    )
    assert vgg["classifier.0.weight"] == (4096, 25088) and vgg["classifier.6.weight"] == (
        1000,
        4096,
    )
    vit = REFERENCE_SHAPES["vit_tiny"]()
    assert vit["cls_token"] == (1, 1, 192) and vit["pos_embed"] == (1, 197, 192)
    assert vit["patch_embed.proj.weight"] == (192, 3, 16, 16)
    assert vit["blocks.0.norm1.weight"] == (192,) and vit["blocks.0.attn.qkv.weight"] == (576, 192)
    assert vit["blocks.0.mlp.fc1.weight"] == (768, 192) and vit["head.weight"] == (1000, 192)
    assert sum(v.numel() for v in map(torch.empty, vit.values())) == 5_717_416  # timm's count


@pytest.mark.parametrize("name", sorted(REFERENCE_SHAPES))
def test_state_dict_is_torchvision_and_timm_shaped(name):
    """At 224 px the conv / attention models have exactly the reference keys and shapes."""
    with torch.device("meta"):
        sd = create_model(name, img_size=224).state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    expected = REFERENCE_SHAPES[name]()
    assert sorted(set(got) ^ set(expected)) == []
    assert {k for k in expected if got[k] != expected[k]} == set()


def _reference_state_dict(name: str) -> dict[str, torch.Tensor]:
    """A stand-in for a downloaded checkpoint: random tensors of the reference shapes."""
    gen = torch.Generator().manual_seed(0)
    return {
        k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=gen)
        for k, s in REFERENCE_SHAPES[name]().items()
    }


def _is_convnn_weight(model: nn.Module, key: str) -> bool:
    """Whether ``key`` is a tensor that only a ConvNN layer has (no checkpoint can supply it)."""
    owner = key.rpartition(".")[0]
    branching = [n for n, m in model.named_modules() if isinstance(m, Branching2d)]
    if any(owner == b or owner.startswith(b + ".") for b in branching):
        return True  # a Branching2d is new as a whole (ConvNN, conv and 1x1 branches)
    # ConvNN2d's kernel and bias, ConvNNAttention's aggregation weight -- not its qkv / proj.
    return isinstance(model.get_submodule(owner), (ConvNN2d, ConvNNAttention))


@pytest.mark.parametrize(
    "name,layer",
    [
        ("resnet18", "conv"),
        ("resnet18", "convnn"),
        ("resnet18", "branching"),
        ("resnet50", "branching"),
        ("vgg11", "conv"),
        ("vgg11", "convnn"),
        ("vit_tiny", "attention"),
        ("vit_tiny", "convnn_attention"),
        ("vit_tiny", "kvt"),
        ("vit_tiny", "branching_attention"),
    ],
)
def test_torchvision_and_timm_checkpoints_load(name, layer):
    """Conv / attention variants load a torchvision/timm state dict completely; ConvNN variants
    miss only their new ConvNN weights, and only the replaced layers' tensors go unused."""
    source = _reference_state_dict(name)
    model = create_model(name, img_size=224, layer=layer)
    missing, unexpected = load_pretrained(model, source)
    sd = model.state_dict()
    assert [k for k in missing if not _is_convnn_weight(model, k)] == []
    replaced = {n for n, m in model.named_modules() if isinstance(m, Branching2d)}
    assert [k for k in unexpected if k.rpartition(".")[0] not in replaced] == []
    copied = [k for k in source if k not in missing and k not in unexpected]
    assert all(torch.equal(sd[k], source[k]) for k in copied)
    if layer in ("conv", "attention", "kvt"):  # kvt (kernel 'none') adds no parameters
        assert missing == [] and unexpected == [] and len(copied) == len(source) == len(sd)
    else:
        assert missing
    if name.startswith("vit"):  # attention projections always come from the checkpoint
        assert {k for k in source if ".attn.qkv." in k or ".attn.proj." in k} <= set(copied)
    if name.startswith("resnet"):  # stride-2 convolutions stay convolutions and load
        stride2 = "layer2.0.conv2.weight" if name == "resnet50" else "layer2.0.conv1.weight"
        assert stride2 in copied


@pytest.mark.parametrize(
    "name,layer,extra",
    [
        ("resnet18", "convnn", (ConvNN2d,)),
        ("resnet18", "branching", (Branching2d,)),
        ("vgg11", "branching", (Branching2d,)),
        ("vit_tiny", "convnn_attention", (ConvNNAttention,)),
    ],
)
def test_checkpoint_loads_with_only_convnn_weights_missing(name, layer, extra):
    kw = {"patch_size": 8, "depth": 2} if name.startswith("vit") else {}
    torch.manual_seed(0)
    source = create_model(name, num_classes=10, img_size=32, **kw).state_dict()
    target = create_model(name, num_classes=10, img_size=32, layer=layer, **kw)
    missing, unexpected = load_pretrained(target, source)
    sd = target.state_dict()
    # Missing keys belong to ConvNN layers only; every shared tensor was copied.
    owners = {n for n, m in target.named_modules() if isinstance(m, extra)}
    assert missing and all(any(k.startswith(o + ".") for o in owners) for k in missing)
    for key, value in source.items():
        if key in sd and key not in missing:
            assert torch.equal(sd[key], value), key
    if layer == "branching":  # the replaced convolutions' weights have no home
        assert unexpected and all(k.endswith("weight") or k.endswith("bias") for k in unexpected)
    else:  # same names (ConvNN2d.weight is (out, in, K): reported missing, not copied)
        assert unexpected == []


def test_attention_vit_is_a_standard_vit():
    """The 'attention' ViT equals a ViT written with nn.MultiheadAttention (float64)."""
    torch.manual_seed(0)
    model = create_model("vit_tiny", num_classes=7, img_size=32, patch_size=8, depth=2)
    model = model.double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sd = model.state_dict()
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=8)
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.cat([sd["cls_token"].expand(2, -1, -1), tokens], 1) + sd["pos_embed"]
    for i in range(2):
        p = f"blocks.{i}."
        mha = nn.MultiheadAttention(192, 3, batch_first=True).double()
        mha.in_proj_weight.data = sd[p + "attn.qkv.weight"]
        mha.in_proj_bias.data = sd[p + "attn.qkv.bias"]
        mha.out_proj.weight.data = sd[p + "attn.proj.weight"]
        mha.out_proj.bias.data = sd[p + "attn.proj.bias"]
        h = F.layer_norm(tokens, (192,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        tokens = tokens + mha(h, h, h, need_weights=False)[0]
        h = F.layer_norm(tokens, (192,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        h = F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        tokens = tokens + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    tokens = F.layer_norm(tokens, (192,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    expected = F.linear(tokens[:, 0], sd["head.weight"], sd["head.bias"])
    assert (model(x) - expected).abs().max() < 1e-10


def test_options_of_another_layer_are_ignored_so_recipes_can_switch_layer():
    """A branching recipe's K and ratio do not stop a switch to the conv or convnn layer."""
    options = {"K": 4, "ratio": 0.25}
    conv = create_model("vgg11", num_classes=10, img_size=32, layer="conv", **options)
    plain = create_model("vgg11", num_classes=10, img_size=32, layer="conv")
    assert {k: v.shape for k, v in conv.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }
    convnn = create_model("vgg11", num_classes=10, img_size=32, layer="convnn", **options)
    assert {m.K for m in convnn.modules() if isinstance(m, ConvNN2d)} == {4}  # K used, ratio not
    branching = create_model("vgg11", num_classes=10, img_size=32, layer="branching", **options)
    assert {m.ratio for m in branching.modules() if isinstance(m, Branching2d)} == {0.25}
    vit = create_model("vit_tiny", img_size=32, patch_size=8, depth=1, num_heads=1, K=5)
    assert len(vit.blocks) == 1 and vit.blocks[0].attn.num_heads == 1  # model options are used


def test_resnet50_replaces_exactly_the_stride1_3x3_convs():
    model = create_model("resnet50", num_classes=10, img_size=32, layer="convnn")
    replaced = [n for n, m in model.named_modules() if isinstance(m, ConvNN2d)]
    assert len(replaced) == 13  # 16 bottlenecks, minus the stride-2 first blocks of layer2-4
    assert all(n.endswith(".conv2") for n in replaced)
    assert {"layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"}.isdisjoint(replaced)
    assert isinstance(model.layer2[0].conv2, nn.Conv2d)


def test_convert_a_zoo_model_reports_what_changed():
    model = create_model("resnet18", num_classes=10, img_size=32)
    report = convert(model, conv="branching", K=4)
    # resnet18 (CIFAR stem): conv1 + 16 block 3x3 convs; 3 have stride 2.
    assert len(report.replaced) == 14
    assert {k.name for k in report.skipped} >= {"layer2.0.conv1", "layer3.0.conv1"}
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: create_model("vgg12"), r"name must be one of \[.*'vgg11'"),
        (
            lambda: create_model("vgg11", layer="attention"),
            r"layer must be one of \['conv', 'convnn'",
        ),
        (lambda: create_model("vit_tiny", layer="conv"), r"layer must be one of \['attention'"),
        (lambda: layer_choices("nope"), r"name must be one of"),
        (
            lambda: create_model("vit_tiny", img_size=30, patch_size=16),
            r"img_size must be divisible",
        ),
        (  # a typo is an error even for the conv baseline, which has no options
            lambda: create_model("resnet18", img_size=32, KK=9),
            r"^layer_kwargs of resnet18 must be among K, .*candidates, .*ratio.*; got unknown KK$",
        ),
        (
            lambda: create_model("vit_tiny", img_size=32, layer="kvt", metrc="cosine"),
            r"^layer_kwargs of vit_tiny must be among K, .*depth.*num_heads.*; got unknown metrc$",
        ),
    ],
)
def test_bad_names_list_the_choices(call, match):
    with pytest.raises(ValueError, match=match):
        call()
