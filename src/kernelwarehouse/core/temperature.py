"""The temperature tau of the attention function, annealed from 1 to 0 early in training."""
from __future__ import annotations

import torch.nn as nn

from .attention import KWAttention


def set_temperature(model: nn.Module, tau: float) -> int:
    """Set tau on every KernelWarehouse attention in ``model``; returns how many were set."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"temperature must be a number in [0, 1], got {tau!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, KWAttention):
            module.temperature.fill_(float(tau))
            count += 1
    return count


def get_temperature(model: nn.Module) -> float | None:
    """tau of the first KernelWarehouse attention in ``model`` (None when it has none)."""
    for module in model.modules():
        if isinstance(module, KWAttention):
            return float(module.temperature)
    return None


def linear_temperature(step: int, total_steps: int) -> float:
    """The reference schedule: tau = max(0, 1 - step / total_steps), 0 once total_steps <= 0."""
    if total_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / total_steps)
