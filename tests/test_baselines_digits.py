"""One epoch of each baseline model on 1000 of scikit-learn's 8x8 digits (slow: run with -m slow;
minutes per model on a CPU, where per-sample convolution is slow)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernelwarehouse.baselines import baseline_temperature, set_baseline_temperature
from kernelwarehouse.models import create_model

pytestmark = pytest.mark.slow

MODELS = ["odconv_resnet18", "odconv_resnet50", "odconv_mobilenetv2_100", "odconv_mobilenetv2_050",
          "dyconv_resnet18", "condconv_resnet18"]


def digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1000], y[:1000], x[1500:], y[1500:]


def held_out(model, x, y) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("name", MODELS)
def test_one_epoch_on_digits_learns(name):
    torch.manual_seed(0)
    x, y, x_test, y_test = digits()
    model = create_model(name, kernel_num=4, num_classes=10, small_input=True, in_chans=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    before, _ = held_out(model, x_test, y_test)
    steps = len(y) // 50
    for step in range(steps):
        set_baseline_temperature(model, baseline_temperature(step, steps // 2))
        batch = slice(step * 50, (step + 1) * 50)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after, accuracy = held_out(model, x_test, y_test)
    assert after < before and accuracy > 0.3, (before, after, accuracy)
