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


def linear_temperature(step: int, total_steps: int, start: float = 1.0, end: float = 0.0) -> float:
    """The reference schedule: tau goes linearly from ``start`` to ``end`` over ``total_steps``,
    then stays at ``end``; with start 1 and end 0 that is max(0, 1 - step / total_steps)."""
    if total_steps <= 0 or step >= total_steps:
        return end
    return start + (end - start) * max(step, 0) / total_steps


class TemperatureSchedule:
    """Anneals tau on every KernelWarehouse layer of ``model``: one ``step()`` per training step.

    Works with any training loop, wrapped in DDP or not (``model.module`` is reached through
    ``modules()`` either way). The paper anneals from 1 to 0 over the first 20 epochs (ResNet,
    ConvNeXt) or 15 (MobileNetV2): ``anneal_steps = epochs * steps_per_epoch``.

    >>> schedule = TemperatureSchedule(model, anneal_steps=20 * len(loader))
    >>> for x, y in loader:
    ...     schedule.step()   # sets tau for this step
    ...     loss = criterion(model(x), y)
    """

    def __init__(self, model: nn.Module, anneal_steps: int, start: float = 1.0, end: float = 0.0) -> None:
        if anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {anneal_steps}")
        for value in (start, end):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"temperatures must lie in [0, 1], got {value}")
        self.model, self.anneal_steps, self.start, self.end = model, anneal_steps, start, end
        self.steps_done = 0
        self.tau = self.value(0)
        set_temperature(model, self.tau)

    def value(self, step: int) -> float:
        return linear_temperature(step, self.anneal_steps, self.start, self.end)

    def step(self) -> float:
        """Set and return tau for the coming training step, then advance."""
        self.tau = self.value(self.steps_done)
        set_temperature(self.model, self.tau)
        self.steps_done += 1
        return self.tau

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "anneal_steps": self.anneal_steps,
                "start": self.start, "end": self.end, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done, self.anneal_steps = state["steps_done"], state["anneal_steps"]
        self.start, self.end, self.tau = state["start"], state["end"], state["tau"]
        set_temperature(self.model, self.tau)
