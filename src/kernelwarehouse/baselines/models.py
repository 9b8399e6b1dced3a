"""The baselines' models: the zoo's static ResNet and MobileNetV2 (timm's) with chosen convs made dynamic.

Which convs become dynamic follows the ODConv authors' models (Li et al., ICLR 2022): in a ResNet
every conv of the residual blocks (stem, downsample shortcuts and classifier stay static), in a
MobileNetV2 every conv after the stem, including the final 1x1 (the classifier stays static).
CondConv and DY-Conv ResNets use the same layers, so the methods differ only in the layer.
Each model takes ``kernel_num``, the number of kernels K of every dynamic layer ("ODConv (4x)").
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch.nn as nn

from ..core.build import replace_modules
from ..models.mobilenetv2 import mobilenetv2_050, mobilenetv2_100
from ..models.registry import register_zoo
from ..models.resnet import resnet18, resnet50, resnet_stages
from .condconv import CondConv2d
from .dyconv import DynamicConv2d
from .odconv import ODConv2d

# method -> (layer class, the layer's keyword for K, the layer options a model builder passes on)
METHODS: dict[str, tuple[type[nn.Module], str, tuple[str, ...]]] = {
    "condconv": (CondConv2d, "num_experts", ()),
    "dyconv": (DynamicConv2d, "num_kernels", ("reduction", "min_hidden", "temperature")),
    "odconv": (ODConv2d, "kernel_num", ("reduction", "min_hidden", "temperature")),
}


def dynamic_like(conv: nn.Conv2d, method: str, kernel_num: int, **options: Any) -> nn.Module:
    """A ``method`` layer with the hyper-parameters, device and dtype of static ``conv``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if type(conv) is not nn.Conv2d:
        raise TypeError(f"only nn.Conv2d can become a {method} layer, got {type(conv).__name__}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"{method} layers pad with zeros only, got padding_mode={conv.padding_mode!r}")
    cls, kernels_keyword, _ = METHODS[method]
    layer = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        **{kernels_keyword: kernel_num},
        **options,
    )
    return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)


def build_baseline(
    model: nn.Module, paths: Iterable[str], method: str, kernel_num: int = 4, **options: Any
) -> nn.Module:
    """Replace the static convs at ``paths`` of ``model`` by ``method`` layers, in place."""
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise KeyError(f"model has no module(s) {missing}")
    return replace_modules(model, {p: dynamic_like(modules[p], method, kernel_num, **options) for p in paths})


def convert_to_baseline(
    model: nn.Module,
    originals: Mapping[str, nn.Module],
    method: str,
    kernel_num: int,
    warm_start: bool = False,
) -> nn.Module:
    """``kw.convert(model, method=...)``: put ``method`` layers with ``kernel_num`` kernels on the Conv2d
    layers among ``originals`` (the static layers KernelWarehouse would take, by module path), in place."""
    if method not in METHODS:
        raise ValueError(f"method must be 'kw' or one of {sorted(METHODS)}, got {method!r}")
    if warm_start:
        raise ValueError(f"warm_start is for method='kw'; {method} layers start from their own init")
    paths = [name for name in originals if type(originals[name]) is nn.Conv2d]
    if not paths:
        raise ValueError(
            f"no Conv2d layer to convert to {method} (the selected layers are {list(originals)})"
        )
    return build_baseline(model, paths, method, kernel_num)


def resnet_dynamic_paths(model: nn.Module) -> list[str]:
    """Every conv of the residual blocks; stem and downsample shortcuts stay static."""
    return [
        f"layer{s + 1}.{j}.{name}"
        for s, stage in enumerate(resnet_stages(model))
        for j, block in enumerate(stage)
        for name, child in block.named_children()
        if name.startswith("conv") and isinstance(child, nn.Conv2d)
    ]


def mobilenetv2_dynamic_paths(model: nn.Module) -> list[str]:
    """Every conv after the stem, including the final 1x1."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name != "conv_stem"]


def _builder(
    static: Callable[..., nn.Module],
    paths: Callable[[nn.Module], list[str]],
    method: str,
) -> Callable[..., nn.Module]:
    layer_options = METHODS[method][2]

    def build(num_classes: int = 1000, kernel_num: int = 4, **overrides: Any) -> nn.Module:
        options = {k: v for k, v in overrides.items() if k in layer_options}
        model = static(
            num_classes=num_classes, **{k: v for k, v in overrides.items() if k not in layer_options}
        )
        return build_baseline(model, paths(model), method, kernel_num, **options)

    build.__name__ = build.__qualname__ = f"{method}_{static.__name__}"
    build.__doc__ = f"{static.__name__} with {method} layers of ``kernel_num`` kernels (default 4)."
    return build


# kernel_num -> (params M, ImageNet top-1) as published in the ODConv authors' README (reduction 1/16)
PUBLISHED: dict[str, dict[int, tuple[float | None, float | None]]] = {
    "odconv_resnet18": {1: (11.94, 73.05), 4: (44.90, 74.19)},
    "odconv_resnet50": {1: (28.64, 77.87), 4: (90.67, 78.50)},
    "odconv_mobilenetv2_100": {1: (4.94, 74.74), 4: (11.51, 75.29)},
    "odconv_mobilenetv2_050": {1: (2.43, 68.06), 4: (4.44, 70.23)},
    "dyconv_resnet18": {4: (None, None)},
    "condconv_resnet18": {4: (None, None)},
}

# kernel_num -> the exact count of the ODConv authors' models (ImageNet head)
REFERENCE_PARAMS: dict[str, dict[int, int]] = {
    "odconv_resnet18": {1: 11943944, 4: 44901640},
    "odconv_resnet50": {1: 28635112, 4: 90670888},
    "odconv_mobilenetv2_100": {1: 4940185, 4: 11512149},
    "odconv_mobilenetv2_050": {1: 2425537, 4: 4435501},
}


def _registered(
    static: Callable[..., nn.Module],
    paths: Callable[[nn.Module], list[str]],
    method: str,
) -> Callable[..., nn.Module]:
    """The builder of ``method`` on ``static``, registered (as ``{method}_{static}``) with its numbers."""
    build = _builder(static, paths, method)
    return register_zoo(PUBLISHED[build.__name__], REFERENCE_PARAMS.get(build.__name__), kind="baseline")(
        build
    )


odconv_resnet18 = _registered(resnet18, resnet_dynamic_paths, "odconv")
odconv_resnet50 = _registered(resnet50, resnet_dynamic_paths, "odconv")
odconv_mobilenetv2_100 = _registered(mobilenetv2_100, mobilenetv2_dynamic_paths, "odconv")
odconv_mobilenetv2_050 = _registered(mobilenetv2_050, mobilenetv2_dynamic_paths, "odconv")
dyconv_resnet18 = _registered(resnet18, resnet_dynamic_paths, "dyconv")
condconv_resnet18 = _registered(resnet18, resnet_dynamic_paths, "condconv")
