"""Multiply-adds per sample, counting what KernelWarehouse adds (Li & Yao, ICML 2024, Sec. 3.4).

Assembling a layer's weights mixes n warehouse cells into each of its m cells: n |W| multiply-adds
per sample (|W| = the layer's weight count), besides the convolution itself and the attention's
two small linear layers. Counters that only hook ``nn.Conv2d``/``nn.Linear`` miss the first two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ..core.layers import KWLayer
from ..probe import probe_run

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def sample_shape(model: nn.Module, example: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    """One sample's shape from a sample shape, a batched shape or an example tensor; the model's
    first convolution says how many dimensions a sample has."""
    shape = tuple(example.shape) if isinstance(example, torch.Tensor) else tuple(example)
    if not shape or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in shape):
        raise ValueError(
            f"the input must be a shape of positive integers such as (3, 224, 224) or (1, 3, 224, 224), "
            f"or an example tensor; got {example if not isinstance(example, torch.Tensor) else shape}"
        )
    first = next(
        (
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, _CONVS) or isinstance(m, KWLayer) and hasattr(m, "dims")
        ),
        None,
    )
    if first is None:
        return shape  # no convolution: a linear model takes the shape as it is given
    name, layer = first
    dims = layer.dims if isinstance(layer, KWLayer) else _CONVS.index(type(layer)) + 1
    if len(shape) == dims + 2:
        return shape[1:]
    if len(shape) != dims + 1:
        raise ValueError(
            f"{type(model).__name__}'s first convolution ({name or 'the model'}, {dims}-d) takes "
            f"samples of {dims + 1} dimensions (C, ...) or batches of {dims + 2} (B, C, ...); got "
            f"shape {shape}"
        )
    return shape


@dataclass(frozen=True)
class MacCount:
    """Multiply-adds per sample: ``total`` = ``layers`` (convolutions and linear layers applied to the
    data) + ``assembly`` (mixing warehouse cells into weights) + ``attention`` (the attention branches)."""

    layers: int
    assembly: int
    attention: int

    @property
    def total(self) -> int:
        return self.layers + self.assembly + self.attention

    def __str__(self) -> str:
        return (
            f"{self.total / 1e9:.3f} GMACs (layers {self.layers / 1e9:.3f}, assembly "
            f"{self.assembly / 1e9:.3f}, attention {self.attention / 1e9:.4f})"
        )


def count_macs(model: nn.Module, example: Sequence[int] | torch.Tensor) -> MacCount:
    """Count multiply-adds per sample of ``model``, including KernelWarehouse weight assembly and
    attention. ``example`` is one sample's shape ((C, H, W) for images), a batched shape
    ((B, C, H, W)) or an example tensor of either; counts are per sample whatever the batch. Runs one
    forward pass at batch size 1."""
    shape = sample_shape(model, example)
    counts = {"layers": 0, "assembly": 0, "attention": 0}
    dynamic = [m for m in model.modules() if isinstance(m, KWLayer) or hasattr(m, "assembly_macs")]
    inside_attention = {id(sub) for layer in dynamic for sub in layer.modules() if sub is not layer}

    def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        x = inputs[0]
        batch = x.shape[0] if x.dim() > 1 else 1
        if isinstance(module, KWLayer):
            weight_shape = module.weight_shape
            counts["assembly"] += module.warehouse.num_cells * math.prod(weight_shape)
        elif hasattr(module, "assembly_macs"):  # other dynamic convolutions (the baselines)
            weight_shape = module.weight_shape
            mixing, scaling = module.assembly_macs(x, out)
            counts["assembly"] += mixing
            counts["attention"] += scaling
        elif isinstance(module, nn.Linear):
            weight_shape = (module.out_features, module.in_features)
        else:
            weight_shape = tuple(module.weight.shape)
        key = "attention" if id(module) in inside_attention else "layers"
        counts[key] += out.numel() // batch * math.prod(weight_shape[1:])

    parameter = next(model.parameters(), None)
    x = torch.zeros(
        (1, *shape),
        device=parameter.device if parameter is not None else None,
        dtype=parameter.dtype if parameter is not None else None,
    )
    counted = [m for m in model.modules() if isinstance(m, (nn.Linear,) + _CONVS) or m in dynamic]
    probe_run(model, [(m, hook) for m in counted], x)
    return MacCount(**counts)
