"""Which layers of a model :func:`~kernelwarehouse.convert` may turn into KernelWarehouse layers:
the convolutions, the Linear layers where they count, and the ``include`` / ``exclude`` patterns."""

from __future__ import annotations

import fnmatch
import re
from typing import Sequence

import torch.nn as nn

from ..core.build import kw_layers

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def typed_layers(model: nn.Module, with_linear: bool) -> dict[str, nn.Module]:
    types = CONVS + ((nn.Linear,) if with_linear else ())
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def find_candidates(
    model: nn.Module, linear: bool | None, explicit: bool
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
            kind = (layer_kind(name), tuple(m.weight.shape))
            shapes[kind] = shapes.get(kind, 0) + 1
        repeated = {n: m for n, m in linears.items() if shapes[(layer_kind(n), tuple(m.weight.shape))] > 1}
        conv_weights = sum(m.weight.numel() for m in convs.values())
        if sum(m.weight.numel() for m in repeated.values()) > conv_weights:
            return {**convs, **repeated}, skipped, True
        return convs, skipped, False
    if linear is False:
        return convs, skipped, False
    return {**convs, **linears}, skipped, bool(linear)


def patterns_of(value: str | Sequence[str], what: str) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{what} must be a module-path pattern or a list of them, got {value!r}")
    return patterns


def matches(name: str, pattern: str) -> bool:
    """``pattern`` matches the module path or one of its ancestors (``layer4`` matches ``layer4.0.conv1``)."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def select(candidates: dict[str, nn.Module], patterns: Sequence[str], what: str) -> dict[str, nn.Module]:
    chosen = {}
    for pattern in patterns:
        hits = {n: m for n, m in candidates.items() if matches(n, pattern)}
        if not hits:
            raise ValueError(
                f"{what} pattern {pattern!r} matches no convertible layer "
                f"(Conv1d/2d/3d or Linear); examples of layer paths: {list(candidates)[:4]}"
            )
        chosen.update(hits)
    return {n: m for n, m in candidates.items() if n in chosen}


def layer_kind(name: str) -> str:
    """The module path without its block indices: ``blocks.3.attn.qkv`` -> ``blocks.attn.qkv``,
    ``layers.encoder_layer_11.mlp.0`` -> ``layers.encoder_layer.mlp``."""
    return ".".join(re.sub(r"_\d+$", "", part) for part in name.split(".") if not part.isdigit()) or name
