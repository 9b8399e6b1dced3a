"""DY-Conv: dynamic convolution, attention over convolution kernels (Chen et al., CVPR 2020).

Each sample's kernel is ``W(x) = sum_k pi_k(x) W_k`` (and likewise its bias), with
``pi(x) = softmax(FC(ReLU(FC(GAP(x)))) / T)`` (Sec. 3.2). The paper trains with a temperature T
that starts at 30 and falls linearly to 1 over the first epochs, so that early on all kernels get
gradient; ``temperature`` is a plain attribute, set for a whole model by
:func:`kernelwarehouse.baselines.set_baseline_temperature` (KernelWarehouse's own ``set_temperature``
does not touch it).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import MixtureConv2d, attention_width, check_temperature


class DynamicConv2d(MixtureConv2d):
    """Drop-in ``nn.Conv2d`` with ``num_kernels`` kernels and a softmax attention with temperature.

    The attention's hidden width is ``max(int(in_channels * reduction), min_hidden)``; the paper
    reduces by 4.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        num_kernels: int = 4,
        reduction: float = 0.25,
        min_hidden: int = 4,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_kernels
        )
        hidden = attention_width(in_channels, reduction, min_hidden)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, num_kernels)
        self.temperature = check_temperature(temperature)

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
