"""Load checkpoints written by the reference implementation (OSVAI/KernelWarehouse).

Its layout differs from ours in five ways: all warehouses live in ``warehouse_manager.weights.{i}``
(i in order of first use), the attention norm is called ``norm1``, a linear layer wraps a conv
as ``.conv``, the temperature initialisation (beta) is not saved at all, and MobileNetV2 and
ConvNeXt modules have torchvision's / the original ConvNeXt's names where ours are timm's (each
:class:`~kernelwarehouse.models.factory.Family` gives the renaming). Ours is rebuilt from the plan,
so a mapped model computes what the reference computed.

:func:`pretrained_filter` lets timm's own pretrained path load such a checkpoint:
``timm.create_model("kw_resnet18", budget=1, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ..core.build import kw_layers
from ..core.layers import KWLinear
from ..models.factory import Family, family_of, module_renamer
from ..models.registry import create_model

DERIVED = (".attention.beta", ".attention.temperature")  # ours only, computed from the plan
WAREHOUSES = "warehouse_manager."  # where the reference keeps every warehouse


@dataclass
class MappingReport:
    """What a mapping did: ``missing`` of ours got no value, ``unexpected`` of theirs found no home,
    ``reshaped`` were stored with another shape of the same size."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys)}"
            for label, keys in (
                ("missing", self.missing),
                ("unexpected", self.unexpected),
                ("shape mismatch", self.mismatched),
            )
            if keys
        ]
        return "; ".join(parts) or "all keys mapped"


def _our_keys(
    key: str, ours: Mapping[str, torch.Tensor], linear_paths: list[str], warehouse_keys: list[list[str]]
) -> list[str]:
    match = re.fullmatch(re.escape(WAREHOUSES) + r"weights\.(\d+)", key)
    if match:
        index = int(match.group(1))
        return warehouse_keys[index] if index < len(warehouse_keys) else []
    key = key.replace(".attention.norm1.", ".attention.norm.")
    for path in linear_paths:
        if key.startswith(path + ".conv."):
            key = path + "." + key[len(path) + 6 :]
    if key in ours:
        return [key]
    module, _, name = key.rpartition(".")
    wrapped = f"{module}.1.{name}"  # Sequential(Dropout, Linear) heads
    return [wrapped] if wrapped in ours else []


def load_reference_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True, family: Family | None = None
) -> MappingReport:
    """Copy a reference-layout ``state_dict`` into ``model``; raise (strict) or report what did not map.

    ``family`` gives the module renaming of a zoo model (found from ``model.pretrained_cfg`` when
    not given); other models are taken to share the reference's names.
    """
    family = family or family_of(model)
    rename = module_renamer(family.reference_names(model) if family else {})
    state_dict = {
        key if key.startswith(WAREHOUSES) else rename(key): value for key, value in state_dict.items()
    }
    ours = model.state_dict()
    layers = kw_layers(model)
    linear_paths = [name for name, layer in layers if isinstance(layer, KWLinear)]
    # the reference numbers its warehouses in order of first use, which is the order of its modules:
    # the order in which its state dict names the layers
    first_seen: dict[str, int] = {}
    for index, key in enumerate(state_dict):
        first_seen.setdefault(key.split(".attention.")[0], index)
    order: dict[str, list[str]] = {}
    for name, layer in sorted(layers, key=lambda item: first_seen.get(item[0], len(first_seen))):
        order.setdefault(layer.warehouse.name, []).append(f"{name}.warehouse.weight")
    warehouse_keys = list(order.values())

    report, values = MappingReport(), {}
    for key, value in state_dict.items():
        targets = _our_keys(key, ours, linear_paths, warehouse_keys)
        if not targets:
            report.unexpected.append(key)
            continue
        for target in targets:
            expected = ours[target].shape
            if value.shape != expected:
                if value.numel() != ours[target].numel():
                    report.mismatched.append(f"{key} {tuple(value.shape)} -> {target} {tuple(expected)}")
                    continue
                report.reshaped.append(target)
                value = value.reshape(expected)
            values[target] = value
    report.missing = [k for k in ours if k not in values and not k.endswith(DERIVED)]
    if strict and not report.ok:
        raise KeyError(f"reference state_dict does not map onto {type(model).__name__}: {report}")
    merged = {k: values.get(k, v) for k, v in ours.items()}
    model.load_state_dict(merged)
    return report


def model_from_reference_config(config: Mapping[str, Any], **kwargs: Any) -> nn.Module:
    """Build our model from a reference configuration (``{"model": "kw_resnet18", ...}``)."""
    config = dict(config)
    name = config.pop("model")
    options = {
        k: config[k]
        for k in (
            "reduction",
            "cell_inplane_ratio",
            "cell_outplane_ratio",
            "nonlocal_basis_ratio",
            "sharing_range",
        )
        if k in config
    }
    if isinstance(options.get("sharing_range"), list):
        options["sharing_range"] = tuple(options["sharing_range"])
    half = re.fullmatch(r"kw1d2x_(\w+)", name)
    if half:
        return create_model(f"kw_{half.group(1)}", budget="1/2", **kwargs)
    if not name.startswith("kw_"):
        return create_model(name, **kwargs)
    budget = config.get("cell_num_ratio", 1)
    return create_model(name, budget=budget, **options, **kwargs)


def pretrained_filter(family: Family) -> Callable[[Mapping[str, Any], nn.Module], dict[str, Any]]:
    """timm's ``pretrained_filter_fn`` for a zoo model: a checkpoint of the reference implementation
    is mapped onto the model, a static model's state dict warm-starts it (exact at tau = 1 for
    budgets >= 1), and one of ours passes through. A classifier of another size is left to timm
    (it drops it when ``num_classes`` differs from the checkpoint's)."""

    def load(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
        state_dict = dict(state_dict)
        layers = [name for name, _ in kw_layers(model)]
        if any(key.startswith(WAREHOUSES) for key in state_dict):
            report = load_reference_state_dict(model, state_dict, strict=False, family=family)
            classifier = _classifier_prefixes(model)
            if report.unexpected or any(
                not key.startswith(classifier) for key in report.missing + report.mismatched
            ):
                raise KeyError(f"reference checkpoint does not map onto {type(model).__name__}: {report}")
            return model.state_dict()  # complete: what did not map keeps the model's own values
        if (
            layers
            and all(f"{name}.weight" in state_dict for name in layers)
            and not any(f"{name}.warehouse.weight" in state_dict for name in layers)
        ):
            from ..convert import load_static_state_dict

            load_static_state_dict(model, state_dict)
            return model.state_dict()
        return state_dict

    return load


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier")
    return tuple(name + "." for name in ((names,) if isinstance(names, str) else names or ()))
