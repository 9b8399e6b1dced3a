"""Every model of the zoo as a timm model: ``timm.create_model("kw_resnet18", budget=1)``.

Imported by ``kernelwarehouse`` when timm is installed. ``features_only=True`` wraps the model in
timm's :class:`~timm.models.FeatureHookNet` without rewriting it (warehouses stay shared, module
paths stay under ``body.``); ``feature_info`` is read off a probe run, so strides and widths are
the model's own (a ``small_input`` ResNet reports reductions 1, 1, 2, 4, 8).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..core.layers import KWConv2d
from .convnext import ConvNeXt
from .mobilenetv2 import MobileNetV2
from .registry import create_model, list_models
from .resnet import ResNet

try:
    import timm
    from timm.models import FeatureHookNet, register_model
except ImportError:  # timm is optional
    timm = None

PROBE = 64


def feature_modules(model: nn.Module) -> list[str]:
    """Module paths whose outputs are the feature maps, from the stem to the last stage."""
    if isinstance(model, ResNet):
        return ["relu", "layer1", "layer2", "layer3", "layer4"]
    if isinstance(model, ConvNeXt):
        return [f"stages.{i}" for i in range(len(model.stages))]
    if isinstance(model, MobileNetV2):
        strides = [_stride(block) for block in model.features]
        # the last block before each downsampling block, and the final 1x1 conv
        return [f"features.{i}" for i in range(len(strides) - 1) if strides[i + 1] > 1] + \
            [f"features.{len(strides) - 1}"]
    raise ValueError(f"features_only is not supported for {type(model).__name__}")


def _stride(module: nn.Module) -> int:
    return max((m.stride[0] for m in module.modules() if isinstance(m, (nn.Conv2d, KWConv2d))), default=1)


def feature_info(model: nn.Module, names: Sequence[str], in_chans: int = 3) -> list[dict[str, Any]]:
    """timm-style ``feature_info`` (num_chs, reduction, module) of ``names``, from one probe run."""
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())

    def record(name: str, output: torch.Tensor) -> None:
        shapes.setdefault(name, tuple(output.shape))

    handles = [modules[n].register_forward_hook(lambda m, i, out, n=n: record(n, out)) for n in names]
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, in_chans, PROBE, PROBE, device=param.device, dtype=param.dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    return [{"num_chs": shapes[n][1], "reduction": PROBE // shapes[n][-1], "module": n} for n in names]


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, features_only: bool = False,
                   out_indices: Sequence[int] | None = None, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights are distributed; use "
                             f"kernelwarehouse.convert(model, warm_start=True) on a pretrained static model")
        cfg = kwargs.pop("pretrained_cfg", None)
        for key in ("pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        model = create_model(name, **kwargs)
        if cfg is not None:
            model.pretrained_cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
        if not features_only:
            return model
        names = feature_modules(model)
        model.feature_info = feature_info(model, names, kwargs.get("in_chans", 3))
        indices = tuple(range(len(names))) if out_indices is None else tuple(out_indices)
        for attr in ("fc", "head", "classifier"):  # the classifier is not part of a feature extractor
            if isinstance(getattr(model, attr, None), nn.Module):
                setattr(model, attr, nn.Identity())
        return FeatureHookNet(model, out_indices=indices, no_rewrite=True)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"KernelWarehouse zoo model {name!r} (timm entry point)."
    return entrypoint


def register_with_timm() -> list[str]:
    """Register every zoo model with timm (no-op without timm); returns the names registered."""
    if timm is None:
        return []
    known = set(timm.list_models())
    names = [n for n in list_models() if n not in known]
    for name in names:
        register_model(_entrypoint(name))
    return names


register_with_timm()
