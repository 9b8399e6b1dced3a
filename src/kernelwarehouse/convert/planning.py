"""The conversion plan: check the arguments, choose the layers, group them into stages and pack each
stage into warehouses whose attention stays within ``max_attention`` of their static weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..core.build import kw_layers, layer_spec
from ..core.plan import RATIO_NAMES, LayerSpec, Plan, WarehouseConfig, _table, plan_warehouses
from ..models.registry import parse_budget
from .candidates import find_candidates, matches, patterns_of, select, typed_layers
from .stages import SHARING, Sharing, stage_groups, warn_caller

MAX_ATTENTION = 0.25
CANNOT_CUT = "cannot be cut into cells"
REDUCTION = 1 / 16  # the paper's attention reduction, halved where a layer needs it


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert` does to a model: the plan, the layers left static and why, and sizes.

    ``coverage`` is the share of the candidate weights (every conv, and in linear mode every
    Linear) that the converted layers hold.
    """

    plan: Plan
    skipped: tuple[tuple[str, str], ...]
    original_parameters: int
    converted_weights: int
    candidate_weights: int
    budget: float
    notes: tuple[str, ...] = ()

    @property
    def num_parameters(self) -> int:
        """Parameters of the converted model (layer biases are kept as they are)."""
        return self.original_parameters - self.converted_weights + self.plan.num_parameters

    @property
    def parameter_ratio(self) -> float:
        return self.num_parameters / self.original_parameters

    @property
    def coverage(self) -> float:
        return self.converted_weights / max(self.candidate_weights, 1)

    def __str__(self) -> str:
        rows = [
            (
                "warehouse",
                "layers",
                "cell",
                "n",
                "m total",
                "reduction",
                "static weights",
                "attention",
                "mixing",
            )
        ]
        for w in self.plan.warehouses:
            layers = [p for p in self.plan.layers if p.warehouse == w.name]
            weights = sum(math.prod(p.spec.weight_shape) for p in layers)
            attention = sum(p.attention_parameters for p in layers)
            mixing = sum(p.mixing_parameters for p in layers)
            rows.append(
                (
                    w.name,
                    str(len(layers)),
                    "x".join(map(str, w.cell_shape)),
                    str(w.num_cells),
                    str(sum(p.num_cells for p in layers)),
                    f"1/{1 / w.config.reduction:g}",
                    f"{weights:,}",
                    f"{attention:,} ({attention / weights:.0%})",
                    f"{mixing / weights:.1%}",
                )
            )
        lines = [_table(rows)]
        if self.skipped:
            lines += ["", "static:"] + [f"  {name}: {reason}" for name, reason in self.skipped]
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(
            f"\n{len(self.plan.layers)} layers in {len(self.plan.warehouses)} warehouses at budget "
            f"{self.budget:g}; they hold {self.coverage:.1%} of the candidate weights; parameters "
            f"{self.original_parameters:,} -> {self.num_parameters:,} ({self.parameter_ratio:.3f}x)"
        )
        return "\n".join(lines)


def plan_conversion(
    model: nn.Module,
    budget: Any = 1.0,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    sharing: Sharing = "stage",
    norm: str = "batch",
    *,
    linear: bool | None = None,
    example_input: torch.Tensor | tuple | None = None,
    max_attention: float = MAX_ATTENTION,
    **ratios: Any,
) -> Conversion:
    """What :func:`convert` would do with the same arguments, without changing ``model``: the layers
    its plan converts (``plan.layers``, by module path) and their warehouses."""
    if "cell_num_ratio" in ratios:
        raise TypeError("pass the budget as budget=, not cell_num_ratio=")
    if not (isinstance(sharing, str) and sharing in SHARING) and not callable(sharing):
        raise ValueError(
            f"sharing must be one of {SHARING} or a function of the module path, got {sharing!r}"
        )
    if not 0 < max_attention:
        raise ValueError(f"max_attention must be > 0, got {max_attention}")
    b = float(parse_budget(budget))
    unknown = set(ratios) - set(RATIO_NAMES)
    if unknown:
        raise TypeError(f"unknown warehouse option(s) {sorted(unknown)}; known: {list(RATIO_NAMES)}")
    ratios = {**ratios, "norm": norm, "cell_num_ratio": b}
    pack_ratios = {
        k: v for k, v in ratios.items() if not isinstance(v, (Mapping, list, tuple)) and k != "cell_num_ratio"
    }
    WarehouseConfig(**pack_ratios)  # a clear error for a bad value, before any work

    candidates, skipped, linear_mode = find_candidates(model, linear, include is not None)
    forced = set()
    if include is not None:
        candidates = select(candidates, patterns_of(include, "include"), "include")
        forced = set(candidates)
    if exclude is not None:
        patterns = patterns_of(exclude, "exclude")
        names = [name for name, _ in model.named_modules()]
        for pattern in patterns:
            if not any(matches(name, pattern) for name in names):
                raise ValueError(f"exclude pattern {pattern!r} matches no module of the model")
        candidates = {n: m for n, m in candidates.items() if not any(matches(n, p) for p in patterns)}
        if not candidates:
            raise ValueError(f"exclude={list(patterns)} leaves no layer to convert")
    if not candidates:
        kinds = "Conv1d/2d/3d or Linear" if linear_mode or linear else "Conv1d/2d/3d"
        raise ValueError(
            f"nothing to convert: {type(model).__name__} has no {kinds} layers"
            + (f" (left static: {dict(skipped)})" if skipped else "")
        )

    specs = {name: layer_spec(name, module) for name, module in candidates.items()}
    order, labels, notes = stage_groups(model, candidates, sharing, example_input)
    for name in candidates:
        if labels.get(name) is None:
            skipped.append(
                (
                    name,
                    "left static by the sharing function"
                    if callable(sharing)
                    else "not reached when running the model",
                )
            )
    keys, reductions = {}, {}
    taken = {layer.warehouse.name for _, layer in kw_layers(model)}  # from an earlier conversion
    for label in dict.fromkeys(labels[n] for n in order if labels.get(n) is not None):
        members = [specs[n] for n in order if labels.get(n) == label]
        if sharing == "layer":  # one warehouse each: pack every layer on its own
            groups = [
                g for spec in members for g in _pack([spec], forced, pack_ratios, max_attention, skipped)
            ]
        else:
            groups = _pack(members, forced, pack_ratios, max_attention, skipped)
        for index, (reduction, group) in enumerate(groups):
            key = label if len(groups) == 1 else f"{label}_{index + 1}"
            key = next(k for k in (key, *(f"{key}_{j}" for j in range(2, len(taken) + 2))) if k not in taken)
            reductions[key] = reduction
            keys.update({spec.name: key for spec in group})
    if not keys:
        raise ValueError(
            "nothing to convert: every candidate layer would stay static: "
            + "; ".join(f"{n}: {r}" for n, r in skipped[:5])
        )
    unplaceable = [f"{n} ({r})" for n, r in skipped if r.startswith(CANNOT_CUT)]
    if unplaceable:
        warn_caller(
            f"{len(unplaceable)} layer(s) stay static because no cell of the given ratios fits "
            f"them: {'; '.join(unplaceable)}"
        )

    names = [n for n in candidates if n in keys]  # module order
    if "reduction" not in ratios:
        ratios["reduction"] = reductions
    plan = plan_warehouses([replace(specs[n], key=keys[n]) for n in names], (), **ratios)
    typed = typed_layers(model, linear_mode or bool(linear))
    candidate_weights = sum(m.weight.numel() for m in typed.values())
    return Conversion(
        plan,
        tuple(skipped),
        sum(p.numel() for p in model.parameters()),
        sum(candidates[n].weight.numel() for n in names),
        max(candidate_weights, 1),
        b,
        tuple(notes),
    )


def _weights(specs: Iterable[LayerSpec]) -> int:
    return sum(math.prod(s.weight_shape) for s in specs)


def _cost(specs: Sequence[LayerSpec], ratios: dict[str, Any]) -> tuple[float, float, str]:
    """(attention, mixing part of it, error) of ``specs`` sharing one warehouse at budget 1."""
    try:
        plan = plan_warehouses([replace(s, key="w") for s in specs], (), **ratios)
    except ValueError as error:
        return math.inf, math.inf, str(error)
    return (
        sum(p.attention_parameters for p in plan.layers),
        sum(p.mixing_parameters for p in plan.layers),
        "",
    )


def _costly(specs: Sequence[LayerSpec], ratios: dict[str, Any]) -> str:
    attention, _, error = _cost(specs, ratios)
    if error:
        return f"{CANNOT_CUT}: {error}"
    return (
        f"its attention ({attention:,} parameters) would cost {attention / _weights(specs):.0%} "
        f"of its weights"
    )


def _pack(
    members: list[LayerSpec],
    forced: set[str],
    ratios: dict[str, Any],
    max_attention: float,
    skipped: list[tuple[str, str]],
) -> list[tuple[float, list[LayerSpec]]]:
    """First fit: each layer joins the warehouse whose attention grows least, within budget.

    A warehouse may spend ``max_attention`` of its static weights on attention (forced layers'
    first linear not counted). A new warehouse takes the largest reduction (hidden width) that
    leaves half of that for sharing, so one wide-input layer does not use it all up.
    """
    reductions = [ratios["reduction"]] if "reduction" in ratios else [REDUCTION / 2**k for k in range(4)]
    groups: list[tuple[float, list[LayerSpec]]] = []
    for spec in members:
        best = None
        for reduction, group in groups:
            if len(group[0].kernel_size) != len(spec.kernel_size):
                continue
            trial = group + [spec]
            attention, mixing, _ = _cost(trial, {**ratios, "reduction": reduction})
            auto = [s for s in trial if s.name not in forced]
            used = mixing + (attention - mixing) * _weights(auto) / _weights(trial) if auto else mixing
            if used <= max_attention * _weights(trial) and (best is None or used < best[0]):
                best = (used, group)
        if best is not None:
            best[1].append(spec)
            continue
        costs = [(r, _cost([spec], {**ratios, "reduction": r})) for r in reductions]
        for share in (max_attention / 2, max_attention):
            fits = [r for r, (attention, _, _) in costs if attention <= share * _weights([spec])]
            if fits:
                groups.append((fits[0], [spec]))
                break
        else:
            reduction, (_, _, error) = costs[0]
            if spec.name not in forced:
                skipped.append((spec.name, _costly([spec], {**ratios, "reduction": reductions[-1]})))
            elif error:
                raise ValueError(f"cannot convert {spec.name!r}: {error}")
            else:
                groups.append((reduction, [spec]))
    return groups
