"""Turning chosen static layers of a model into KernelWarehouse layers: plan, then build.

``build_kernelwarehouse(model, keys, ...)`` reads the static ``nn.ConvNd`` / ``nn.Linear`` layers
named in ``keys`` (module path -> hierarchical warehouse key), plans their warehouses, creates
every warehouse and layer whole, and only then puts the new layers in place of the old ones.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch.nn as nn

from .layers import KWConv1d, KWConv2d, KWConv3d, KWLayer, KWLinear
from .plan import LayerPlan, LayerSpec, Plan, plan_warehouses
from .warehouse import Warehouse

STATIC_TO_KW: dict[type[nn.Module], type[KWLayer]] = {
    nn.Conv1d: KWConv1d,
    nn.Conv2d: KWConv2d,
    nn.Conv3d: KWConv3d,
    nn.Linear: KWLinear,
}


def layer_spec(name: str, module: nn.Module, key: str | None = None) -> LayerSpec:
    """The :class:`LayerSpec` of a static conv or linear layer."""
    key = key or name.replace(".", "_")
    if isinstance(module, nn.Linear):
        return LayerSpec(name, key, module.in_features, module.out_features, (1,))
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise TypeError(f"layer {name!r}: transposed convolutions are not supported")
        return LayerSpec(
            name, key, module.in_channels, module.out_channels, tuple(module.kernel_size), module.groups
        )
    raise TypeError(
        f"layer {name!r} is a {type(module).__name__}; only Conv1d/2d/3d and Linear "
        f"can become KernelWarehouse layers"
    )


def kw_layer_like(module: nn.Module, plan: LayerPlan, warehouse: Warehouse) -> KWLayer:
    """A KernelWarehouse layer with the hyper-parameters of static ``module``."""
    cls = STATIC_TO_KW.get(type(module))
    if cls is None:
        raise TypeError(f"no KernelWarehouse layer for {type(module).__name__}")
    if cls is KWLinear:
        layer = KWLinear(
            module.in_features, module.out_features, module.bias is not None, plan=plan, warehouse=warehouse
        )
    else:
        layer = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            plan=plan,
            warehouse=warehouse,
        )
    return layer.to(device=module.weight.device, dtype=module.weight.dtype)


def plan_model(
    model: nn.Module, keys: Mapping[str, str], sharing_range: Sequence[str] = (), **ratios: Any
) -> Plan:
    """Plan the layers named in ``keys``, visited in the model's module order."""
    modules = dict(model.named_modules())
    missing = [name for name in keys if name not in modules]
    if missing:
        raise KeyError(f"model has no module(s) {missing}")
    order = {name: i for i, name in enumerate(modules)}
    names = sorted(keys, key=order.__getitem__)
    specs = [layer_spec(name, modules[name], keys[name]) for name in names]
    return plan_warehouses(specs, sharing_range, **ratios)


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Replace the static layers that ``plan`` names by KernelWarehouse layers, in place."""
    modules = dict(model.named_modules())
    owned: dict[str, list[tuple[int, int]]] = {}
    for layer in plan.layers:
        owned.setdefault(layer.warehouse, []).append(layer.slots)
    warehouses = {w.name: Warehouse(w, owned[w.name]) for w in plan.warehouses}
    new_layers = {p.name: kw_layer_like(modules[p.name], p, warehouses[p.warehouse]) for p in plan.layers}
    return replace_modules(model, new_layers)


def replace_modules(model: nn.Module, new_modules: Mapping[str, nn.Module]) -> nn.Module:
    """Put each module of ``new_modules`` (module path -> module) in place of ``model``'s, in place."""
    modules = dict(model.named_modules())
    missing = [name for name in new_modules if name not in modules or not name]
    if missing:
        raise KeyError(f"model has no module(s) {missing}")
    for name, module in new_modules.items():
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, module)
    return model


def build_kernelwarehouse(
    model: nn.Module, keys: Mapping[str, str], sharing_range: Sequence[str] = (), **ratios: Any
) -> nn.Module:
    """Plan and apply in one step; returns ``model`` with its KernelWarehouse layers in place."""
    return apply_plan(model, plan_model(model, keys, sharing_range, **ratios))


def kw_layers(model: nn.Module) -> list[tuple[str, KWLayer]]:
    """(module path, layer) of every KernelWarehouse layer, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, KWLayer)]


def chosen_paths(model: nn.Module) -> dict[str, str | None]:
    """{module path: the execution path its last eager call ran} for every KernelWarehouse layer
    (None for a layer not yet called); e.g. ``"loop:slices"`` for ``loop`` with its backward form."""
    return {name: layer.last_path for name, layer in kw_layers(model)}


def plan_of(model: nn.Module) -> Plan:
    """The plan of the KernelWarehouse layers now in ``model``."""
    layers = kw_layers(model)
    if not layers:
        raise ValueError("model has no KernelWarehouse layers")
    warehouses = {}
    for _, layer in layers:
        warehouses.setdefault(layer.warehouse.name, layer.warehouse.plan)
    return Plan(tuple(warehouses.values()), tuple(layer.plan for _, layer in layers))
