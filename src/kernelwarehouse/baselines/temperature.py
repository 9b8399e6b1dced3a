"""The softmax/sigmoid temperature of DY-Conv and ODConv, apart from KernelWarehouse's tau.

Both papers start training at temperature 30 and lower it linearly to 1 over the first epochs
(DY-Conv: Chen et al., CVPR 2020, Sec. 3.3; ODConv: the authors' recipe, 10 epochs).
``kernelwarehouse.set_temperature`` sets KernelWarehouse's tau in [0, 1] and leaves these alone.
"""

from __future__ import annotations

import torch.nn as nn

from ..core.temperature import linear_temperature
from ._base import check_temperature
from .dyconv import DynamicConv2d
from .odconv import ODConv2d

START, END = 30.0, 1.0


def set_baseline_temperature(model: nn.Module, temperature: float) -> int:
    """Set the temperature of every DY-Conv and ODConv layer in ``model``; returns how many."""
    temperature = check_temperature(temperature)
    layers = [m for m in model.modules() if isinstance(m, (DynamicConv2d, ODConv2d))]
    for layer in layers:
        layer.temperature = temperature
    return len(layers)


def baseline_temperature(step: int, total_steps: int, start: float = START, end: float = END) -> float:
    """The papers' schedule: linear from ``start`` (30) to ``end`` (1) over ``total_steps``, then ``end``."""
    return linear_temperature(step, total_steps, start, end)
