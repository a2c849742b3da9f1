"""convnn's models in timm's registry, as ``convnn_<name>``: once timm is imported (before or
after convnn), ``timm.create_model("convnn_resnet18", layer="branching", num_classes=10)``
works, and so does timm's ``train.py --model convnn_resnet18 --model-kwargs layer=branching``
in a process that imported convnn. convnn itself never imports timm."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from .registry import create_model, list_models

PREFIX = "convnn_"
# timm's create_model passes these to every entrypoint; drop_rate is a model option.
_TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entrypoint(name: str):
    def build(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(
                f"pretrained must be False: {PREFIX}{name} has no published weights (load a "
                "torchvision / timm checkpoint with convnn.models.load_pretrained)"
            )
        overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
        for key in _TIMM_ARGS:
            kwargs.pop(key, None)
        if name.startswith("vgg") and "drop_rate" in kwargs:  # VGG names it dropout
            kwargs["dropout"] = kwargs.pop("drop_rate")
        model = create_model(name, **kwargs)
        model.pretrained_cfg.update(overlay, architecture=PREFIX + name)
        return model

    build.__name__ = build.__qualname__ = PREFIX + name
    build.__module__ = __name__
    build.__doc__ = f"convnn's {name} (layer options as keyword arguments) for timm."
    return build


def register_timm() -> list[str]:
    """Register every convnn model in timm's registry (imports timm); returns the names."""
    from timm.models import register_model
    from timm.models._registry import _model_entrypoints

    names = []
    for name in list_models():
        fn = _entrypoint(name)
        if getattr(_model_entrypoints.get(fn.__name__), "__module__", None) != __name__:
            register_model(fn)
        names.append(fn.__name__)
    return names


class _RegisterAfterTimmImport(importlib.abc.MetaPathFinder):
    """Registers convnn's models right after timm's first import, without importing it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            register_timm()

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if timm is loaded, else as soon as it is."""
    if "timm" in sys.modules:
        register_timm()
    elif not any(isinstance(f, _RegisterAfterTimmImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimmImport())
