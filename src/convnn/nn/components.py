"""The learnable tensors of a layer's components (a metric's, a positional encoding's)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..metrics import get_metric
from ..spec import ConvNNSpec
from ..stages import positional as encoding


class ComponentParameters(nn.Module):
    """Tensors of one component, held by the layer: parameters (in its ``state_dict``,
    trained by the optimizer) and fixed buffers, with their initial values for
    ``reset_parameters``. ``tensors()`` is what the functional API takes
    (``metric_params=`` / ``positional_params=``)."""

    def __init__(
        self,
        initial: dict[str, Tensor],
        buffers: dict[str, Tensor] | None = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._initial = {name: t.detach().clone() for name, t in initial.items()}
        for name, t in initial.items():
            self.register_parameter(
                name, nn.Parameter(torch.empty(t.shape, device=device, dtype=dtype))
            )
        for name, t in (buffers or {}).items():
            self.register_buffer(name, t.to(device=device, dtype=dtype or t.dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, t in self._initial.items():
                getattr(self, name).copy_(t)

    def tensors(self) -> dict[str, Tensor]:
        """{name: tensor} of every parameter and buffer."""
        return {**dict(self.named_parameters(recurse=False)), **dict(self.named_buffers())}

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {tuple(t.shape)}" for n, t in self.tensors().items())


def per_head(initial: dict[str, Tensor], heads: int) -> dict[str, Tensor]:
    """Each initial tensor repeated for ``heads`` heads: (heads, *shape)."""
    return {name: t.expand(heads, *t.shape).clone() for name, t in initial.items()}


def warn_no_gradient(layer: str, what: list[str], weighting: str) -> None:
    """Learnable similarity parameters with weighting 'none' get no gradient: say so."""
    if what and weighting == "none":
        warnings.warn(
            f"{layer}: {', '.join(what)} are learnable, but with weighting='none' nothing "
            f"differentiable depends on the similarity, so they receive no gradient; use "
            f"weighting='softmax' to train them",
            UserWarning,
            stacklevel=3,
        )


def metric_component(spec: ConvNNSpec, dim: int, heads: int, layer: str, factory: dict):
    """The learnable tensors of ``spec``'s metric for ``heads`` heads of ``dim`` selection
    features, each (heads, *shape), or None when it has none."""
    metric = get_metric(spec.metric, spec.p)
    initial = {} if metric.uses_positions else metric.parameters(dim)
    if not initial:
        return None
    warn_no_gradient(layer, [f"the parameters of metric {spec.metric!r}"], spec.weighting)
    return ComponentParameters(per_head(initial, heads), **factory)


def tensors(component: ComponentParameters | None) -> dict[str, Tensor] | None:
    """What the functional API takes for a component (None when the layer has none)."""
    return None if component is None else component.tensors()


def positional_component(
    spec: ConvNNSpec, ndim: int, heads: int, channels: int, layer: str, factory: dict
):
    """The tensors of ``spec``'s positional encoding (learnable ones and fixed buffers), or
    None when it has none."""
    learn, fixed = encoding.initial(spec, ndim, heads, channels)
    if not learn and not fixed:
        return None
    if spec.positional != "cpe":
        warn_no_gradient(layer, list(learn) and ["the relative position bias"], spec.weighting)
    return ComponentParameters(learn, fixed, **factory)
