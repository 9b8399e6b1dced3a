"""The paper's models at every budget, registered by name.

KernelWarehouse models are their static counterparts with chosen layers made dynamic
(:func:`kernelwarehouse.core.build.build_kernelwarehouse`). Default warehouse options per budget
follow the reference configurations; any of them may be overridden by keyword.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any, Callable

import torch.nn as nn

from ..core.build import build_kernelwarehouse
from ..core.plan import RATIO_NAMES
from .convnext import convnext_tiny, convnext_warehouse_keys
from .mobilenetv2 import mobilenetv2_050, mobilenetv2_100, mobilenetv2_warehouse_keys
from .registry import ModelEntry, register
from .resnet import resnet18, resnet50, resnet_warehouse_keys

F = Fraction
PLAN_OPTIONS = set(RATIO_NAMES) | {"sharing_range"}


def _split(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate warehouse options from model constructor arguments."""
    plan = {k: v for k, v in overrides.items() if k in PLAN_OPTIONS}
    return plan, {k: v for k, v in overrides.items() if k not in PLAN_OPTIONS}


def _kw(static: Callable[..., nn.Module], keys: Callable[..., dict[str, str]],
        defaults: Callable[[Fraction], dict[str, Any]], key_options: Callable[[Fraction], dict] = lambda b: {}):
    def build(budget: Fraction = F(1), num_classes: int = 1000, **overrides: Any) -> nn.Module:
        plan_options, model_options = _split(overrides)
        model = static(num_classes=num_classes, **model_options)
        options = {"cell_num_ratio": float(budget), **defaults(budget), **plan_options}
        return build_kernelwarehouse(model, keys(model, **key_options(budget)), **options)
    return build


def _resnet_defaults(budget: Fraction, nonlocal_basis: bool = False) -> dict[str, Any]:
    if budget >= 1:
        return {"sharing_range": ("layer", "conv")}
    options = {"sharing_range": ("layer", "conv"), "cell_inplane_ratio": 0.5, "cell_outplane_ratio": 0.5}
    if nonlocal_basis:
        options["nonlocal_basis_ratio"] = 1 / 16
    return options


MOBILENET_HALF = {  # the paper's 1/2x MobileNetV2: per-warehouse ratios over its ten warehouses
    "sharing_range": ("layer",), "reduction": 1 / 32,
    "cell_num_ratio": (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5),
    "cell_inplane_ratio": (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.025),
    "cell_outplane_ratio": (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 1),
}


def _mobilenet_defaults(budget: Fraction) -> dict[str, Any]:
    if budget == F(1, 2):
        return dict(MOBILENET_HALF)
    return {"sharing_range": ("layer",) if budget > 1 else ("layer", "pwconv")}


def _mobilenet_keys(budget: Fraction) -> dict[str, Any]:
    if budget == F(1, 2):
        return {"static_pointwise_stages": (1, 2, 3, 4, 5), "dynamic_classifier": True}
    return {}


kw_resnet18 = _kw(resnet18, resnet_warehouse_keys, _resnet_defaults)
kw_resnet50 = _kw(resnet50, resnet_warehouse_keys, lambda b: _resnet_defaults(b, nonlocal_basis=True))
kw_mobilenetv2_100 = _kw(mobilenetv2_100, mobilenetv2_warehouse_keys, _mobilenet_defaults, _mobilenet_keys)
kw_mobilenetv2_050 = _kw(mobilenetv2_050, mobilenetv2_warehouse_keys, _mobilenet_defaults, _mobilenet_keys)
kw_convnext_tiny = _kw(convnext_tiny, convnext_warehouse_keys,
                       lambda b: {"sharing_range": ("layer", "pwconv"), "norm": "layer"})

# (paper params M, paper top-1) and the reference implementation's exact counts (ImageNet heads)
_TABLES: dict[str, tuple[Callable, dict, dict]] = {
    "resnet18": (resnet18, {None: (11.69, 70.44)}, {None: 11689512}),
    "resnet50": (resnet50, {None: (25.56, 78.44)}, {None: 25557032}),
    "mobilenetv2_100": (mobilenetv2_100, {None: (3.50, 72.04)}, {None: 3504872}),
    "mobilenetv2_050": (mobilenetv2_050, {None: (1.97, 64.32)}, {None: 1968680}),
    "convnext_tiny": (convnext_tiny, {None: (28.59, 82.07)}, {None: 28589128}),
    "kw_resnet18": (kw_resnet18,
                    {F(1, 4): (4.08, 72.73), F(1, 2): (7.43, 73.33), F(1): (11.93, 74.77), F(2): (23.24, 75.19),
                     F(4): (45.86, 76.05)},
                    {F(1, 4): 4031768, F(1, 2): 7431044, F(1): 11932148, F(2): 23242127, F(4): 45862085}),
    "kw_resnet50": (kw_resnet50, {F(1, 2): (17.64, 79.30), F(1): (28.05, 80.38), F(4): (102.02, 81.05)},
                    {F(1, 2): 17638264, F(1): 28052310, F(4): 102015144}),
    "kw_mobilenetv2_100": (kw_mobilenetv2_100, {F(1, 2): (2.65, 72.59), F(1): (5.17, 74.68), F(4): (11.38, 75.92)},
                           {F(1, 2): 2654396, F(1): 5168146, F(4): 11379382}),
    "kw_mobilenetv2_050": (kw_mobilenetv2_050, {F(1, 2): (1.47, 65.20), F(1): (2.85, 68.29), F(4): (4.65, 70.26)},
                           {F(1, 2): 1466888, F(1): 2854522, F(4): 4648587}),
    "kw_convnext_tiny": (kw_convnext_tiny, {F(1): (39.37, 82.51)}, {F(1): 39370674}),
}

for _name, (_builder, _paper, _reference) in _TABLES.items():
    register(ModelEntry(_name, _builder, _name.startswith("kw_"), _paper, _reference))
