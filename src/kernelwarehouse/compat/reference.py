"""Load checkpoints written by the reference implementation (OSVAI/KernelWarehouse).

Its layout differs from ours in four ways: all warehouses live in ``warehouse_manager.weights.{i}``
(i in order of first use), the attention norm is called ``norm1``, a linear layer wraps a conv
as ``.conv``, and the temperature initialisation (beta) is not saved at all. Ours is rebuilt from
the plan, so a mapped model computes what the reference computed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..core.build import kw_layers
from ..core.layers import KWLinear
from ..models.registry import create_model

DERIVED = (".attention.beta", ".attention.temperature")  # ours only, computed from the plan


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
        parts = [f"{label} ({len(keys)}): {', '.join(keys)}"
                 for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                                     ("shape mismatch", self.mismatched)) if keys]
        return "; ".join(parts) or "all keys mapped"


def _our_keys(key: str, ours: Mapping[str, torch.Tensor], linear_paths: list[str],
              warehouse_keys: list[list[str]]) -> list[str]:
    match = re.fullmatch(r"warehouse_manager\.weights\.(\d+)", key)
    if match:
        index = int(match.group(1))
        return warehouse_keys[index] if index < len(warehouse_keys) else []
    key = key.replace(".attention.norm1.", ".attention.norm.")
    for path in linear_paths:
        if key.startswith(path + ".conv."):
            key = path + "." + key[len(path) + 6:]
    if key in ours:
        return [key]
    module, _, name = key.rpartition(".")
    wrapped = f"{module}.1.{name}"  # Sequential(Dropout, Linear) heads
    return [wrapped] if wrapped in ours else []


def load_reference_state_dict(model: nn.Module, state_dict: Mapping[str, Any],
                              strict: bool = True) -> MappingReport:
    """Copy a reference-layout ``state_dict`` into ``model``; raise (strict) or report what did not map."""
    ours = model.state_dict()
    layers = kw_layers(model)
    linear_paths = [name for name, layer in layers if isinstance(layer, KWLinear)]
    order: dict[str, list[str]] = {}
    for name, layer in layers:
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
    options = {k: config[k] for k in ("reduction", "cell_inplane_ratio", "cell_outplane_ratio",
                                      "nonlocal_basis_ratio", "sharing_range") if k in config}
    if isinstance(options.get("sharing_range"), list):
        options["sharing_range"] = tuple(options["sharing_range"])
    half = re.fullmatch(r"kw1d2x_(\w+)", name)
    if half:
        return create_model(f"kw_{half.group(1)}", budget="1/2", **kwargs)
    if not name.startswith("kw_"):
        return create_model(name, **kwargs)
    budget = config.get("cell_num_ratio", 1)
    return create_model(name, budget=budget, **options, **kwargs)
