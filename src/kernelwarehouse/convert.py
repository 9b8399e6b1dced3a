"""Turn the convolutions (and a transformer's linears) of any model into KernelWarehouse layers.

``convert(model, budget)`` finds a model's static layers, groups them into shared warehouses and
puts KernelWarehouse layers (Li & Yao, ICML 2024) in their places under the same module paths.
Grouping follows the paper (Sec. 3.2): neighbouring layers of one stage -- consecutive layers
between resolution changes, found by running the model once on a probe input -- share a
warehouse. Within a stage, layers are packed into warehouses so that the attention stays small:
a layer's attention has a fixed part (its first linear) and a part that grows with the warehouse
(its second linear has m * (n + 1) outputs, quadratic in cells over a warehouse of small cells).
A layer joins the warehouse whose attention grows least, as long as that warehouse's attention
stays within ``max_attention`` of its static weights, and otherwise opens a new one with the
widest attention (reduction 1/16, 1/32, ...) that leaves room for sharing. Layers whose attention
alone would exceed that share (a 3-channel stem, a thin squeeze-excitation conv, a depthwise
conv) stay static, unless named by ``include``.

With ``warm_start=True`` the static weights are written into the warehouse slots that the
temperature initialisation beta points at: at tau = 1 every cell's mixture is exactly its beta row,
so the converted model computes what the original computed. Anneal tau with
:class:`~kernelwarehouse.core.temperature.TemperatureSchedule` while fine-tuning.
"""
from __future__ import annotations

import fnmatch
import math
import re
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from .core.build import apply_plan, kw_layers, layer_spec, plan_of
from .core.execution import assemble_weights, split_into_cells
from .core.layers import KWLayer
from .core.plan import RATIO_NAMES, ZERO_CELL, LayerSpec, Plan, WarehouseConfig, _table, plan_warehouses
from .core.temperature import ANNEALING, set_temperature
from .models.registry import parse_budget

SHARING = ("stage", "kind", "layer", "model")
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PROBE_SIZE = {1: (256,), 2: (224, 224), 3: (16, 112, 112)}
MAX_ATTENTION = 0.25
CANNOT_CUT = "cannot be cut into cells"
REDUCTION = 1 / 16  # the paper's attention reduction, halved where a layer needs it

Sharing = str | Callable[[str], str | None]


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
        rows = [("warehouse", "layers", "cell", "n", "m total", "reduction", "static weights", "attention",
                 "mixing")]
        for w in self.plan.warehouses:
            layers = [p for p in self.plan.layers if p.warehouse == w.name]
            weights = sum(math.prod(p.spec.weight_shape) for p in layers)
            attention = sum(p.attention_parameters for p in layers)
            mixing = sum(p.mixing_parameters for p in layers)
            rows.append((w.name, str(len(layers)), "x".join(map(str, w.cell_shape)), str(w.num_cells),
                         str(sum(p.num_cells for p in layers)),
                         f"1/{1 / w.config.reduction:g}", f"{weights:,}",
                         f"{attention:,} ({attention / weights:.0%})", f"{mixing / weights:.1%}"))
        lines = [_table(rows)]
        if self.skipped:
            lines += ["", "static:"] + [f"  {name}: {reason}" for name, reason in self.skipped]
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(
            f"\n{len(self.plan.layers)} layers in {len(self.plan.warehouses)} warehouses at budget "
            f"{self.budget:g}; they hold {self.coverage:.1%} of the candidate weights; parameters "
            f"{self.original_parameters:,} -> {self.num_parameters:,} ({self.parameter_ratio:.3f}x)")
        return "\n".join(lines)


def convert(model: nn.Module, budget: Any = 1.0, warm_start: bool = False,
            include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
            sharing: Sharing = "stage", norm: str = "batch", *, linear: bool | None = None,
            example_input: torch.Tensor | tuple | None = None, max_attention: float = MAX_ATTENTION,
            verbose: bool = False, method: str = "kw", kernel_num: int = 4, **ratios: Any) -> nn.Module:
    """Replace ``model``'s static layers by KernelWarehouse layers, in place; returns ``model``.

    Args:
        budget: b = n / m of every warehouse (``cell_num_ratio``): 1/4 to 4, a number or ``"1/2"``.
        warm_start: copy the static weights into the warehouses so that at tau = 1 the model
            computes what it computed before (exact for b >= 1, the closest it can for b < 1, with
            a warning); tau is set to 1.
        include / exclude: module-path glob patterns (``"layer4"``, ``"*.conv2"``); a pattern
            also matches every layer below the module it names. Included layers are converted
            even where their attention is costly.
        sharing: ``"stage"`` (layers between resolution changes), ``"kind"`` (the same path up to
            block indices, e.g. every ``blocks.*.attn.qkv``), ``"layer"`` (no sharing), ``"model"``
            (one pool), or a function from module path to group name (None keeps a layer static).
        norm: the attention's norm (``"batch"``, ``"layer"``, ``"group"``, ``"none"``).
        linear: also convert ``nn.Linear``. None: the Linear layers repeated across blocks, when they
            hold more weights than the convolutions (transformers, ConvNeXt); True: every Linear.
        example_input: the probe input the stages are read from (default: one 224x224 image).
        max_attention: the share of a warehouse's static weights its layers' attention may take.
        method: ``"kw"``, or a baseline (``"odconv"``, ``"dyconv"``, ``"condconv"``) with
            ``kernel_num`` kernels put on the same Conv2d layers KernelWarehouse would take.
        **ratios: further warehouse options (``cell_inplane_ratio``, ``reduction``, ...), one value
            or a mapping from warehouse name to value.
    """
    conversion, originals = _plan(model, budget, include, exclude, sharing, norm, linear,
                                  example_input, max_attention, ratios)
    if method != "kw":
        from .baselines.models import METHODS, build_baseline
        if method not in METHODS:
            raise ValueError(f"method must be 'kw' or one of {sorted(METHODS)}, got {method!r}")
        if warm_start:
            raise ValueError(f"warm_start is for method='kw'; {method} layers start from their own init")
        paths = [name for name in originals if type(originals[name]) is nn.Conv2d]
        if not paths:
            raise ValueError(f"no Conv2d layer to convert to {method} (the selected layers are {list(originals)})")
        return build_baseline(model, paths, method, kernel_num)
    apply_plan(model, conversion.plan)
    for name, static in originals.items():  # a new layer trains or evaluates as the one it replaces
        model.get_submodule(name).train(static.training)
    if verbose:
        print(conversion)
    if warm_start:
        load_static_weights(model, originals, conversion.plan)
    return model


def plan_conversion(model: nn.Module, budget: Any = 1.0, include: str | Sequence[str] | None = None,
                    exclude: str | Sequence[str] | None = None, sharing: Sharing = "stage",
                    norm: str = "batch", *, linear: bool | None = None,
                    example_input: torch.Tensor | tuple | None = None,
                    max_attention: float = MAX_ATTENTION, **ratios: Any) -> Conversion:
    """What :func:`convert` would do with the same arguments, without changing ``model``."""
    return _plan(model, budget, include, exclude, sharing, norm, linear, example_input, max_attention,
                 ratios)[0]


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
            raise TypeError(f"warm start: {lp.name!r} is a {type(layer).__name__}, not a KernelWarehouse layer")
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
        warnings.warn(f"warm start is not exact at this budget: {lost} of "
                      f"{sum(p.num_cells for p in plan.layers)} cells start at the zero cell; largest "
                      f"relative weight error {worst[0]:.3f} ({worst[1]}). Use a budget >= 1 for an "
                      f"exact start", stacklevel=3)
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
    originals = {name: _StaticWeights(state_dict[f"{name}.weight"], state_dict.get(f"{name}.bias"))
                 for name in layers}
    prefixes = tuple(f"{name}." for name in layers)
    rest = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    result = model.load_state_dict(rest, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes) and not k.startswith(ANNEALING)]
    if strict and (missing or result.unexpected_keys):
        raise KeyError(f"static state_dict does not fit {type(model).__name__}: missing {missing}, "
                       f"unexpected {result.unexpected_keys}")
    return load_static_weights(model, originals, plan_of(model))


@dataclass(frozen=True)
class _StaticWeights:
    """A static layer's parameters, as :func:`load_static_weights` reads them."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# choosing the layers


def _plan(model: nn.Module, budget: Any, include, exclude, sharing: Sharing, norm: str,
          linear: bool | None, example_input, max_attention: float, ratios: dict[str, Any]
          ) -> tuple[Conversion, dict[str, nn.Module]]:
    if "cell_num_ratio" in ratios:
        raise TypeError("pass the budget as budget=, not cell_num_ratio=")
    if not (isinstance(sharing, str) and sharing in SHARING) and not callable(sharing):
        raise ValueError(f"sharing must be one of {SHARING} or a function of the module path, got {sharing!r}")
    if not 0 < max_attention:
        raise ValueError(f"max_attention must be > 0, got {max_attention}")
    b = float(parse_budget(budget))
    unknown = set(ratios) - set(RATIO_NAMES)
    if unknown:
        raise TypeError(f"unknown warehouse option(s) {sorted(unknown)}; known: {list(RATIO_NAMES)}")
    ratios = {**ratios, "norm": norm, "cell_num_ratio": b}
    pack_ratios = {k: v for k, v in ratios.items()
                   if not isinstance(v, (Mapping, list, tuple)) and k != "cell_num_ratio"}
    WarehouseConfig(**pack_ratios)  # a clear error for a bad value, before any work

    candidates, skipped, linear_mode = _candidates(model, linear, include is not None)
    forced = set()
    if include is not None:
        candidates = _select(candidates, _patterns(include, "include"), "include")
        forced = set(candidates)
    if exclude is not None:
        patterns = _patterns(exclude, "exclude")
        names = [name for name, _ in model.named_modules()]
        for pattern in patterns:
            if not any(_matches(name, pattern) for name in names):
                raise ValueError(f"exclude pattern {pattern!r} matches no module of the model")
        candidates = {n: m for n, m in candidates.items() if not any(_matches(n, p) for p in patterns)}
        if not candidates:
            raise ValueError(f"exclude={list(patterns)} leaves no layer to convert")
    if not candidates:
        kinds = "Conv1d/2d/3d or Linear" if linear_mode or linear else "Conv1d/2d/3d"
        raise ValueError(f"nothing to convert: {type(model).__name__} has no {kinds} layers"
                         + (f" (left static: {dict(skipped)})" if skipped else ""))

    specs = {name: layer_spec(name, module) for name, module in candidates.items()}
    order, labels, notes = _groups(model, candidates, sharing, example_input)
    for name in candidates:
        if labels.get(name) is None:
            skipped.append((name, "left static by the sharing function" if callable(sharing)
                            else "not reached when running the model"))
    keys, reductions = {}, {}
    taken = {layer.warehouse.name for _, layer in kw_layers(model)}  # from an earlier conversion
    for label in dict.fromkeys(labels[n] for n in order if labels.get(n) is not None):
        members = [specs[n] for n in order if labels.get(n) == label]
        if sharing == "layer":  # one warehouse each: pack every layer on its own
            groups = [g for spec in members for g in _pack([spec], forced, pack_ratios, max_attention, skipped)]
        else:
            groups = _pack(members, forced, pack_ratios, max_attention, skipped)
        for index, (reduction, group) in enumerate(groups):
            key = label if len(groups) == 1 else f"{label}_{index + 1}"
            key = next(k for k in (key, *(f"{key}_{j}" for j in range(2, len(taken) + 2))) if k not in taken)
            reductions[key] = reduction
            keys.update({spec.name: key for spec in group})
    if not keys:
        raise ValueError("nothing to convert: every candidate layer would stay static: "
                         + "; ".join(f"{n}: {r}" for n, r in skipped[:5]))
    unplaceable = [f"{n} ({r})" for n, r in skipped if r.startswith(CANNOT_CUT)]
    if unplaceable:
        warnings.warn(f"{len(unplaceable)} layer(s) stay static because no cell of the given ratios fits "
                      f"them: {'; '.join(unplaceable)}", stacklevel=3)

    names = [n for n in candidates if n in keys]  # module order
    if "reduction" not in ratios:
        ratios["reduction"] = reductions
    plan = plan_warehouses([replace(specs[n], key=keys[n]) for n in names], (), **ratios)
    candidate_weights = sum(m.weight.numel() for m in _typed(model, linear_mode or bool(linear)).values())
    conversion = Conversion(
        plan, tuple(skipped), sum(p.numel() for p in model.parameters()),
        sum(candidates[n].weight.numel() for n in names), max(candidate_weights, 1), b, tuple(notes))
    return conversion, {n: candidates[n] for n in names}


def _typed(model: nn.Module, with_linear: bool) -> dict[str, nn.Module]:
    types = CONVS + ((nn.Linear,) if with_linear else ())
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def _candidates(model: nn.Module, linear: bool | None, explicit: bool
                ) -> tuple[dict[str, nn.Module], list[tuple[str, str]], bool]:
    """The convertible layers, the ones left static for their type, and whether Linear counts."""
    convs, linears, skipped = {}, {}, []
    inside = tuple(f"{name}." for name, _ in kw_layers(model))  # attention branches of KW layers
    for name, module in model.named_modules():
        if isinstance(module, (*CONVS, nn.Linear)) and not name.startswith(inside):
            if type(module) not in (*CONVS, nn.Linear):
                skipped.append((name, f"{type(module).__name__} has its own forward"))
            elif isinstance(module, nn.Linear):
                linears[name] = module
            else:
                convs[name] = module
    if linear is None and not explicit:
        shapes: dict[tuple, int] = {}
        for name, m in linears.items():
            kind = (_kind(name), tuple(m.weight.shape))
            shapes[kind] = shapes.get(kind, 0) + 1
        repeated = {n: m for n, m in linears.items() if shapes[(_kind(n), tuple(m.weight.shape))] > 1}
        conv_weights = sum(m.weight.numel() for m in convs.values())
        if sum(m.weight.numel() for m in repeated.values()) > conv_weights:
            return {**convs, **repeated}, skipped, True
        return convs, skipped, False
    if linear is False:
        return convs, skipped, False
    return {**convs, **linears}, skipped, bool(linear)


def _patterns(value: str | Sequence[str], what: str) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{what} must be a module-path pattern or a list of them, got {value!r}")
    return patterns


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` matches the module path or one of its ancestors (``layer4`` matches ``layer4.0.conv1``)."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def _select(candidates: dict[str, nn.Module], patterns: Sequence[str], what: str) -> dict[str, nn.Module]:
    chosen = {}
    for pattern in patterns:
        hits = {n: m for n, m in candidates.items() if _matches(n, pattern)}
        if not hits:
            raise ValueError(f"{what} pattern {pattern!r} matches no convertible layer "
                             f"(Conv1d/2d/3d or Linear); examples of layer paths: {list(candidates)[:4]}")
        chosen.update(hits)
    return {n: m for n, m in candidates.items() if n in chosen}


def _kind(name: str) -> str:
    """The module path without its block indices: ``blocks.3.attn.qkv`` -> ``blocks.attn.qkv``,
    ``layers.encoder_layer_11.mlp.0`` -> ``layers.encoder_layer.mlp``."""
    return ".".join(re.sub(r"_\d+$", "", part) for part in name.split(".") if not part.isdigit()) or name


# ---------------------------------------------------------------------------------------------
# grouping into stages


def _groups(model: nn.Module, candidates: dict[str, nn.Module], sharing: Sharing, example_input
            ) -> tuple[list[str], dict[str, str | None], list[str]]:
    """Execution order of the candidates and each one's group label."""
    names = list(candidates)
    if sharing == "layer":
        return names, {n: n for n in names}, []
    if sharing == "kind":
        return names, {n: _kind(n) for n in names}, []
    if sharing == "model":
        return names, {n: "model" for n in names}, []
    if callable(sharing):
        return names, {n: sharing(n) for n in names}, []
    notes = []
    try:
        order, resolution = _probe(model, candidates, example_input)
    except Exception as error:  # the model may need inputs we cannot guess
        warnings.warn(f"could not run {type(model).__name__} on a probe input ({type(error).__name__}: "
                      f"{error}); stages follow strided convolutions in module order instead. Pass "
                      f"example_input= to group by resolution", stacklevel=4)
        order, resolution = names, _strided_stages(candidates)
        notes.append("stages from strided convolutions in module order (the probe run failed)")
    labels, stage, current = {}, 0, None
    for name in order:
        res = resolution[name]
        if math.prod(res) <= 1:  # globally pooled input: squeeze-excitation, heads
            labels[name] = f"stage{max(stage, 1)}_pooled"
            continue
        if res != current:
            stage, current = stage + 1, res
        labels[name] = f"stage{stage}"
    return order, labels, notes


def _probe(model: nn.Module, candidates: dict[str, nn.Module], example_input
           ) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Run the model once; record the order layers run in and the resolution of their outputs."""
    if example_input is None:
        example_input = _default_input(model)
    resolution: dict[str, tuple[int, ...]] = {}

    def hook(name: str, module: nn.Module, output: torch.Tensor) -> None:
        if name not in resolution:
            shape = tuple(output.shape)
            resolution[name] = shape[1:-1] if isinstance(module, nn.Linear) else shape[2:]

    handles = [m.register_forward_hook(lambda mod, _, out, name=n: hook(name, mod, out))
               for n, m in candidates.items()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return list(resolution), resolution


def _default_input(model: nn.Module) -> torch.Tensor:
    first = next((m for m in model.modules() if isinstance(m, (*CONVS, nn.Linear))), None)
    if first is None:
        raise ValueError("no layer to size a probe input from")
    weight = first.weight
    if isinstance(first, nn.Linear):
        return torch.zeros(1, first.in_features, device=weight.device, dtype=weight.dtype)
    dims = len(first.kernel_size)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, first.in_channels, *PROBE_SIZE[dims], generator=generator)
    return x.to(device=weight.device, dtype=weight.dtype)


def _strided_stages(candidates: dict[str, nn.Module]) -> dict[str, tuple[int, ...]]:
    """Fallback stages: a strided convolution opens a new one."""
    stage, result = 1, {}
    for name, module in candidates.items():
        if isinstance(module, CONVS) and math.prod(module.stride) > 1:
            stage += 1
        result[name] = (stage + 1,)  # any value > 1, distinct per stage
    return result


# ---------------------------------------------------------------------------------------------
# packing a stage into warehouses


def _weights(specs: Iterable[LayerSpec]) -> int:
    return sum(math.prod(s.weight_shape) for s in specs)


def _cost(specs: Sequence[LayerSpec], ratios: dict[str, Any]) -> tuple[float, float, str]:
    """(attention, mixing part of it, error) of ``specs`` sharing one warehouse at budget 1."""
    try:
        plan = plan_warehouses([replace(s, key="w") for s in specs], (), **ratios)
    except ValueError as error:
        return math.inf, math.inf, str(error)
    return (sum(p.attention_parameters for p in plan.layers),
            sum(p.mixing_parameters for p in plan.layers), "")


def _costly(specs: Sequence[LayerSpec], ratios: dict[str, Any]) -> str:
    attention, _, error = _cost(specs, ratios)
    if error:
        return f"{CANNOT_CUT}: {error}"
    return (f"its attention ({attention:,} parameters) would cost {attention / _weights(specs):.0%} "
            f"of its weights")


def _pack(members: list[LayerSpec], forced: set[str], ratios: dict[str, Any], max_attention: float,
          skipped: list[tuple[str, str]]) -> list[tuple[float, list[LayerSpec]]]:
    """First fit: each layer joins the warehouse whose attention grows least, within budget.

    A warehouse may spend ``max_attention`` of its static weights on attention (forced layers'
    first linear not counted). A new warehouse takes the largest reduction (hidden width) that
    leaves half of that for sharing, so one wide-input layer does not use it all up.
    """
    reductions = ([ratios["reduction"]] if "reduction" in ratios
                  else [REDUCTION / 2 ** k for k in range(4)])
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


__all__ = ["Conversion", "convert", "load_static_weights", "plan_conversion"]
