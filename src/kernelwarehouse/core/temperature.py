"""The temperature tau of the attention function, annealed from 1 to 0 early in training."""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import KWAttention


def checked_temperature(tau: float, name: str = "temperature") -> float:
    """``tau`` as a float, or a ValueError naming ``name`` unless it is a number in [0, 1]."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {tau!r}")
    return float(tau)


def set_temperature(model: nn.Module, tau: float) -> int:
    """Set tau on every KernelWarehouse attention in ``model``; returns how many were set."""
    checked_temperature(tau)
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
        checked_temperature(start, "start temperature"), checked_temperature(end, "end temperature")
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
        return {
            "steps_done": self.steps_done,
            "anneal_steps": self.anneal_steps,
            "start": self.start,
            "end": self.end,
            "tau": self.tau,
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps_done, self.anneal_steps = state["steps_done"], state["anneal_steps"]
        self.start, self.end, self.tau = state["start"], state["end"], state["tau"]
        set_temperature(self.model, self.tau)


class TemperatureAnnealing(nn.Module):
    """The state of :func:`anneal`: steps counted so far and the length of the schedule, kept as
    buffers so that they are saved in the model's ``state_dict`` and restored on resume."""

    def __init__(self, anneal_steps: int, start: float = 1.0, end: float = 0.0) -> None:
        super().__init__()
        if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 0:
            raise ValueError(f"anneal steps must be an integer >= 0, got {anneal_steps!r}")
        self.start = checked_temperature(start, "start temperature")
        self.end = checked_temperature(end, "end temperature")
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("anneal_steps", torch.tensor(anneal_steps, dtype=torch.long))
        self.attentions: list[KWAttention] = []

    def tau(self) -> float:
        return linear_temperature(int(self.steps_done), int(self.anneal_steps), self.start, self.end)

    def apply(self) -> float:
        """Set tau for the coming step on every attention of the model; returns it."""
        tau = self.tau()
        for attention in self.attentions:
            attention.temperature.fill_(tau)
        return tau

    def advance(self) -> None:
        self.steps_done += 1

    def forward(self, x):  # holds state only; kept out of the model's computation
        raise RuntimeError("TemperatureAnnealing holds the annealing state and is not called")

    def extra_repr(self) -> str:
        return f"steps={int(self.anneal_steps)}, start={self.start}, end={self.end}"


ANNEALING = "temperature_annealing"  # the attribute of the model that holds the annealing state


def anneal(
    model: nn.Module,
    steps: int,
    optimizer: torch.optim.Optimizer | None = None,
    start: float = 1.0,
    end: float = 0.0,
) -> TemperatureAnnealing:
    """Make tau fall linearly from ``start`` to ``end`` over ``steps`` training steps, with no call
    in the training loop.

    Steps are counted by ``optimizer``'s step hook when one is given, otherwise by the model's
    forward passes in training mode (one per step; with gradient accumulation give the optimizer).
    The count lives in the model's ``state_dict`` (``temperature_annealing.steps_done``), so a run
    resumed from a checkpoint continues the schedule where it stopped. Returns the state module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"anneal needs an nn.Module, got {type(model).__name__}")
    attentions = [m for m in model.modules() if isinstance(m, KWAttention)]
    if not attentions:
        raise ValueError(
            f"{type(model).__name__} has no KernelWarehouse layers: there is no temperature to anneal"
        )
    if isinstance(getattr(model, ANNEALING, None), TemperatureAnnealing):
        raise ValueError("the temperature of this model is already annealed (model.temperature_annealing)")
    param = attentions[0].temperature
    state = TemperatureAnnealing(steps, start, end).to(param.device)
    state.attentions = attentions
    setattr(model, ANNEALING, state)
    state.apply()
    if optimizer is not None:

        def after_step(*_):
            state.advance()
            state.apply()

        optimizer.register_step_post_hook(after_step)
    else:

        def before_forward(module, _):
            if module.training:
                state.apply()
                state.advance()

        model.register_forward_pre_hook(before_forward)
    return state
