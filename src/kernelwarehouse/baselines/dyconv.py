"""DY-Conv: dynamic convolution, attention over convolution kernels (Chen et al., CVPR 2020).

Each sample's kernel is ``W(x) = sum_k pi_k(x) W_k`` (and likewise its bias), with
``pi(x) = softmax(FC(ReLU(FC(GAP(x)))) / T)`` (Sec. 3.2). The paper trains with a temperature T
that starts at 30 and falls linearly to 1 over the first epochs, so that early on all kernels get
gradient; ``temperature`` is a plain attribute, set for a whole model by
:func:`kernelwarehouse.baselines.set_baseline_temperature` (KernelWarehouse's own ``set_temperature``
does not touch it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Conv2dArguments, MixtureConv2d, attention_width, check_temperature


@dataclass(frozen=True)
class DynamicConvArguments(Conv2dArguments):
    """:class:`DynamicConv2d`'s arguments: ``nn.Conv2d``'s, then the number of kernels K and the
    attention's options."""

    num_kernels: int = 4
    reduction: float = 0.25
    min_hidden: int = 4
    temperature: float = 1.0


class DynamicConv2d(MixtureConv2d, arguments=DynamicConvArguments):
    """Drop-in ``nn.Conv2d`` with ``num_kernels`` kernels and a softmax attention with temperature.

    Takes the arguments of :class:`DynamicConvArguments`, positionally or by name. The attention's
    hidden width is ``max(int(in_channels * reduction), min_hidden)``; the paper reduces by 4.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        arguments = DynamicConvArguments(*args, **kwargs)
        super().__init__(arguments, arguments.num_kernels)
        hidden = attention_width(arguments.in_channels, arguments.reduction, arguments.min_hidden)
        self.fc1 = nn.Linear(arguments.in_channels, hidden)
        self.fc2 = nn.Linear(hidden, arguments.num_kernels)
        self.temperature = check_temperature(arguments.temperature)

    def kernel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """pi(x) of shape (B, K); each row sums to 1."""
        logits = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))
        return torch.softmax(logits / self.temperature, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        attention = self.kernel_attention(x)
        return self.add_bias(self.convolve(x, self.mix(attention)), attention)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", temperature={self.temperature:g}"
