"""Warm start: the static weights written into the warehouse slots that the temperature
initialisation beta points at, so that at tau = 1 a converted model computes what the original did."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..core.build import kw_layers, plan_of
from ..core.execution import assemble_weights, split_into_cells
from ..core.layers import KWLayer
from ..core.plan import ZERO_CELL, Plan
from ..core.temperature import ANNEALING, set_temperature


def load_static_weights(model: nn.Module, originals: Mapping[str, nn.Module], plan: Plan) -> float:
    """Warm start: write each static layer's weight into the slots its beta points at.

    At tau = 1 the mixture of cell t is exactly the one-hot row beta_t, so the assembled weight is
    the static one wherever beta points at a slot; cells pointing at the zero cell (budgets < 1)
    start at zero, and a warning gives the resulting weight error. Sets tau = 1 on the converted
    layers and returns the largest relative weight error.
    """
    modules = dict(model.named_modules())
    worst, lost = (0.0, ""), 0
    for lp in plan.layers:
        layer, static = modules[lp.name], originals[lp.name]
        if not isinstance(layer, KWLayer):
            raise TypeError(
                f"warm start: {lp.name!r} is a {type(layer).__name__}, not a KernelWarehouse layer"
            )
        store = layer.warehouse.weight
        target = static.weight.detach().reshape(lp.spec.weight_shape).to(store)
        cells = split_into_cells(target, lp.grid, store.shape[1:])
        with torch.no_grad():
            for cell, slot in enumerate(lp.beta):
                if slot != ZERO_CELL:
                    store[slot].copy_(cells[cell])
            if layer.bias is not None:
                layer.bias.copy_(static.bias.detach())
        set_temperature(layer, 1.0)
        lost += sum(slot == ZERO_CELL for slot in lp.beta)
        with torch.no_grad():
            beta = layer.attention.beta[None, :, :-1].to(store)
            rebuilt = assemble_weights(beta, store, lp.grid, lp.spec.weight_shape)[0]
        error = float((rebuilt - target).norm() / target.norm().clamp_min(1e-12))
        worst = max(worst, (error, lp.name))
    if lost:
        warnings.warn(
            f"warm start is not exact at this budget: {lost} of "
            f"{sum(p.num_cells for p in plan.layers)} cells start at the zero cell; largest "
            f"relative weight error {worst[0]:.3f} ({worst[1]}). Use a budget >= 1 for an "
            f"exact start",
            stacklevel=3,
        )
    return worst[0]


def load_static_state_dict(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> float:
    """Warm-start a KernelWarehouse model from the ``state_dict`` of its static counterpart (e.g.
    timm's ``resnet18`` weights into ``kw_resnet18``): every KernelWarehouse layer takes the static
    weight under its own module path (:func:`load_static_weights`), every other entry loads as it is.
    Exact at tau = 1 for budgets >= 1; tau is set to 1. Returns the largest relative weight error.
    ``strict``: raise when an entry of the model finds no value or an entry of ``state_dict`` no home."""
    layers = dict(kw_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no KernelWarehouse layers to warm-start")
    absent = [f"{name}.weight" for name in layers if f"{name}.weight" not in state_dict]
    if absent:
        raise KeyError(f"static state_dict has no weight for the KernelWarehouse layer(s) {absent}")
    originals = {
        name: _StaticWeights(state_dict[f"{name}.weight"], state_dict.get(f"{name}.bias")) for name in layers
    }
    prefixes = tuple(f"{name}." for name in layers)
    rest = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    result = model.load_state_dict(rest, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes) and not k.startswith(ANNEALING)]
    if strict and (missing or result.unexpected_keys):
        raise KeyError(
            f"static state_dict does not fit {type(model).__name__}: missing {missing}, "
            f"unexpected {result.unexpected_keys}"
        )
    return load_static_weights(model, originals, plan_of(model))


@dataclass(frozen=True)
class _StaticWeights:
    """A static layer's parameters, as :func:`load_static_weights` reads them."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
