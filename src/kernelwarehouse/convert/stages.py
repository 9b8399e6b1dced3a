"""Grouping the candidate layers of :func:`~kernelwarehouse.convert` into stages: neighbouring layers
between resolution changes (Li & Yao, ICML 2024, Sec. 3.2), read from one probe run of the model."""

from __future__ import annotations

import math
import sys
import warnings
from typing import Callable

import torch
import torch.nn as nn

from ..probe import probe_run
from .candidates import CONVS, layer_kind

SHARING = ("stage", "kind", "layer", "model")
PROBE_SIZE = {1: (256,), 2: (224, 224), 3: (16, 112, 112)}

Sharing = str | Callable[[str], str | None]


def warn_caller(message: str) -> None:
    """A warning attributed to the first caller outside this package: the call of
    :func:`~kernelwarehouse.convert` or :func:`~kernelwarehouse.plan_conversion`, however deep in
    them it arises."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _inside(frame.f_globals.get("__name__", "")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _inside(module: str) -> bool:
    return module == __package__ or module.startswith(f"{__package__}.")


def stage_groups(
    model: nn.Module, candidates: dict[str, nn.Module], sharing: Sharing, example_input
) -> tuple[list[str], dict[str, str | None], list[str]]:
    """Execution order of the candidates and each one's group label."""
    names = list(candidates)
    if sharing == "layer":
        return names, {n: n for n in names}, []
    if sharing == "kind":
        return names, {n: layer_kind(n) for n in names}, []
    if sharing == "model":
        return names, {n: "model" for n in names}, []
    if callable(sharing):
        return names, {n: sharing(n) for n in names}, []
    notes = []
    try:
        order, resolution = _probe(model, candidates, example_input)
    except Exception as error:  # the model may need inputs we cannot guess
        warn_caller(
            f"could not run {type(model).__name__} on a probe input ({type(error).__name__}: "
            f"{error}); stages follow strided convolutions in module order instead. Pass "
            f"example_input= to group by resolution"
        )
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


def _probe(
    model: nn.Module, candidates: dict[str, nn.Module], example_input
) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Run the model once; record the order layers run in and the resolution of their outputs."""
    if example_input is None:
        example_input = _default_input(model)
    resolution: dict[str, tuple[int, ...]] = {}

    def hook(name: str, module: nn.Module, output: torch.Tensor) -> None:
        if name not in resolution:
            shape = tuple(output.shape)
            resolution[name] = shape[1:-1] if isinstance(module, nn.Linear) else shape[2:]

    probe_run(
        model,
        [(m, lambda mod, _, out, name=n: hook(name, mod, out)) for n, m in candidates.items()],
        example_input,
    )
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
