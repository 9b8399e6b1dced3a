"""One epoch of the baseline ResNet18s on 1000 of scikit-learn's 8x8 digits (slow: run with -m slow;
minutes per model on a CPU, where per-sample convolution is slow)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernelwarehouse.baselines import baseline_temperature, set_baseline_temperature
from kernelwarehouse.models import create_model

pytestmark = pytest.mark.slow


def digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1000], y[:1000], x[1500:], y[1500:]


def recalibrate_batchnorm(model, x) -> None:
    """Exact BatchNorm statistics of the trained weights (running averages lag after a few steps)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for part in x.split(100):
            model(part)


def held_out(model, x, y) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("name", ["odconv_resnet18", "dyconv_resnet18", "condconv_resnet18"])
def test_one_epoch_on_digits_learns(name):
    torch.manual_seed(0)
    x, y, x_test, y_test = digits()
    model = create_model(name, kernel_num=4, num_classes=10, small_input=True, in_chans=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    before, _ = held_out(model, x_test, y_test)
    batch, steps = 25, len(y) // 25
    for step in range(steps):
        # the papers' schedule: 30 -> 1 over the first 10 epochs
        set_baseline_temperature(model, baseline_temperature(step, 10 * steps))
        part = slice(step * batch, (step + 1) * batch)
        loss = F.cross_entropy(model(x[part]), y[part])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    recalibrate_batchnorm(model, x)
    after, accuracy = held_out(model, x_test, y_test)
    assert after < before and accuracy > 0.5, (before, after, accuracy)
