"""One run with hooks (count_macs, the stage probe of plan_conversion) leaves every module as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import kernelwarehouse as kw
from kernelwarehouse.bench import count_macs
from kernelwarehouse.probe import probe_run


def _mixed_modes() -> nn.Module:
    """A training model with eval-mode parts at several depths, and a training part inside one of them."""
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU()),
        nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).train()
    model[1].eval()
    model[3].eval()
    model[3][1].train()
    model[7].eval()
    return model


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def test_count_macs_gives_every_module_its_own_mode_back():
    model = _mixed_modes()
    before = _modes(model)
    assert len(set(before.values())) == 2
    count_macs(model, (3, 16, 16))
    assert _modes(model) == before
    assert all(not module._forward_hooks for module in model.modules())


def test_plan_conversion_gives_every_module_its_own_mode_back():
    model = _mixed_modes()
    before = _modes(model)
    conversion = kw.plan_conversion(model, include="*", example_input=torch.randn(1, 3, 16, 16))
    assert {p.name for p in conversion.plan.layers} >= {"3.0", "4.0"}
    assert _modes(model) == before
    assert all(not module._forward_hooks for module in model.modules())


def test_probe_run_is_eval_and_no_grad_inside_and_cleans_up_after_an_error():
    model = _mixed_modes()
    before = _modes(model)
    seen = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen.append((module.training, torch.is_grad_enabled(), output.requires_grad))

    out = probe_run(model, [(model[0], hook), (model[7], hook)], torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10) and seen == [(False, False, False)] * 2
    assert _modes(model) == before

    def fails(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        probe_run(model, [(model[0], fails)], (torch.randn(1, 3, 8, 8),))
    assert _modes(model) == before
    assert all(not module._forward_hooks for module in model.modules())
