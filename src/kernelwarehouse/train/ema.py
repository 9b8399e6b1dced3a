"""An exponential moving average of a model's weights (Polyak averaging), as used for ConvNeXt."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEma:
    """``module`` holds the average; ``update(model)`` after every optimizer step.

    Parameters are averaged with ``decay`` (warmed up as min(decay, (1 + t) / (10 + t)) so that the
    first steps are not dominated by the initial weights); buffers (BatchNorm statistics, the
    temperature tau) are copied. Parameters shared by several layers, such as a warehouse, are
    updated once.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema, live in zip(self.module.parameters(), model.parameters()):
            ema.lerp_(live.detach(), 1.0 - decay)
        for ema, live in zip(self.module.buffers(), model.buffers()):
            ema.copy_(live)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.decay, self.updates = state["decay"], state["updates"]
