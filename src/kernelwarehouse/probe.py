"""Run a model once with forward hooks, to read something off it (stages, multiply-adds), and leave it
as it was: in eval mode and without gradients while it runs; afterwards the hooks are gone and every
module has its own ``training`` flag back (a model may hold eval-mode parts inside a training one).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

ForwardHook = Callable[[nn.Module, tuple, Any], None]


def probe_run(
    model: nn.Module, hooks: Iterable[tuple[nn.Module, ForwardHook]], example: torch.Tensor | tuple
) -> Any:
    """Run ``model`` on ``example`` (one input, or a tuple of positional inputs) in eval mode under
    ``torch.no_grad()`` with each ``(module, hook)`` of ``hooks`` registered as a forward hook; returns
    the model's output. Hooks are removed and every module's training flag restored, also on error."""
    modes = {module: module.training for module in model.modules()}
    handles = []
    try:
        handles = [module.register_forward_hook(hook) for module, hook in hooks]
        model.eval()
        with torch.no_grad():
            return model(*example) if isinstance(example, tuple) else model(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training


__all__ = ["ForwardHook", "probe_run"]
