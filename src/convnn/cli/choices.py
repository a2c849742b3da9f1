"""The names ``convnn ... --help`` lists, known without importing torch.

The model zoo registers its models when :mod:`convnn.models` is imported, which imports torch
(seconds); the help text reads this copy instead, and tests/test_cli.py checks that it agrees
with ``convnn.train.zoo.list_models()`` and ``layer_choices()``.
"""

from __future__ import annotations

CNN_LAYERS = ("conv", "convnn", "branching")
VIT_LAYERS = ("attention", "convnn_attention", "kvt", "branching_attention", "local")

MODEL_LAYERS: dict[str, tuple[str, ...]] = {
    "small_cnn": CNN_LAYERS,
    **{f"resnet{d}": CNN_LAYERS for d in (18, 34, 50)},
    **{f"vgg{d}{bn}": CNN_LAYERS for d in (11, 13, 16, 19) for bn in ("", "_bn")},
    **{f"vit_{size}": VIT_LAYERS for size in ("tiny", "small", "base")},
}

# The options of the ConvNN layers a recipe sets most (model.layer_kwargs.<name>); the layers
# check them and their values (see the README's table of components).
LAYER_OPTIONS = (
    "K, ratio (branching), metric, candidates, num_candidates, window, weighting, kernel, "
    "positional, ...; ViTs also embed_dim, depth, num_heads; small_cnn width, blocks"
)


def model_names() -> list[str]:
    return sorted(MODEL_LAYERS)


def layer_names() -> list[str]:
    """Every layer kind, CNN ones first."""
    return [*CNN_LAYERS, *VIT_LAYERS]
