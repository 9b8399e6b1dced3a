"""Multiply-accumulates per sample of static, KernelWarehouse and baseline models.

Common counters (thop, ptflops, fvcore) see only the convolutions. A dynamic layer also builds its
weights for every sample: mixing K kernels costs K * |W| (CondConv, DY-Conv, ODConv with K > 1),
ODConv's spatial attention |W| more, and KernelWarehouse's mixture n * |W| for a warehouse of n
cells (Li & Yao, ICML 2024, Sec. 3.4). Those go in ``assembly``; the attention branches, and
ODConv's scaling of the input and output feature maps, in ``attention``. Normalisation,
activations and pooling are not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ..core.layers import KWLayer
from ._base import MixtureConv2d
from .odconv import ODConv2d


@dataclass(frozen=True)
class MacCount:
    """MACs per sample: the layers' own products, weight assembly and attention branches."""

    layers: int
    assembly: int
    attention: int

    @property
    def total(self) -> int:
        return self.layers + self.assembly + self.attention


def _weight_macs(weight_numel: int, out_channels: int, out: torch.Tensor) -> int:
    """A conv or linear layer: every output element costs |W| / C_out products."""
    return out.numel() * (weight_numel // out_channels)


def _dynamic_macs(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> tuple[int, int, int]:
    """(layer, assembly, feature-map attention) MACs of one dynamic layer on a batch of 1."""
    if isinstance(module, KWLayer):
        size = math.prod(module.weight_shape)
        return _weight_macs(size, module.weight_shape[0], out), module.plan.warehouse_cells * size, 0
    size = math.prod(module.weight_shape)
    mixing = size * module.num_kernels if module.num_kernels > 1 else 0
    extra = 0
    if isinstance(module, ODConv2d):
        att = module.attention
        mixing += size if att.spatial_fc is not None else 0
        extra = x.numel() + (out.numel() if att.filter_fc is not None else 0)
    return _weight_macs(size, module.out_channels, out), mixing, extra


def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> MacCount:
    """MACs of one sample of shape ``input_size`` through ``model`` (run once, in eval mode)."""
    dynamic = (KWLayer, MixtureConv2d)
    seen: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, dynamic + (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: seen.append((name, m, args[0], out))))
    training = model.training
    parameter = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, dtype=parameter.dtype, device=parameter.device))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    owners = [name for name, m, _, _ in seen if isinstance(m, dynamic)]
    layers = assembly = attention = 0
    for name, module, x, out in seen:
        inside = any(name != owner and name.startswith(f"{owner}." if owner else "") for owner in owners)
        if isinstance(module, dynamic):
            own, mixing, extra = _dynamic_macs(module, x, out)
            layers, assembly, attention = layers + own, assembly + mixing, attention + extra
        elif isinstance(module, nn.Linear):
            macs = out.numel() * module.in_features
            attention, layers = (attention + macs, layers) if inside else (attention, layers + macs)
        else:
            layers += _weight_macs(module.weight.numel(), module.out_channels, out)
    return MacCount(layers, assembly, attention)
