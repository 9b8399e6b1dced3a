"""ResNet (He et al., CVPR 2016) and the KernelWarehouse assignment of its layers.

Static models match torchvision's ``resnet18`` / ``resnet50`` parameter for parameter.
KernelWarehouse ResNets (Li & Yao, ICML 2024) make every conv of the residual blocks and every
strided downsample conv dynamic; stem, classifier and stride-1 downsample stay static, and in
ResNet50 so does the very first 1x1 conv (``layer1.0.conv1``).
"""
from __future__ import annotations

from typing import Type

import torch
import torch.nn as nn

from ._blocks import DropPath


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(identity + self.drop_path(out))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(identity + self.drop_path(out))


class ResNet(nn.Module):
    """torchvision-layout ResNet. ``small_input`` swaps the 7x7/2 stem and max-pool for a 3x3/1
    stem, the usual choice for 8x8 to 32x32 images."""

    def __init__(self, block: Type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 small_input: bool = False, base_width: int = 64) -> None:
        super().__init__()
        self.block_counts = list(layers)
        widths = [base_width * 2 ** i for i in range(4)]
        self.in_ch = widths[0]
        if small_input:
            self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        total, done = sum(layers), 0
        for i, (width, blocks) in enumerate(zip(widths, layers)):
            rates = [drop_path_rate * (done + j) / max(total - 1, 1) for j in range(blocks)]
            setattr(self, f"layer{i + 1}", self._make_stage(block, width, blocks, 1 if i == 0 else 2, rates))
            done += blocks
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.num_features = widths[-1] * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_stage(self, block, width: int, blocks: int, stride: int, rates: list[float]) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_ch != width * block.expansion:
            downsample = nn.Sequential(conv1x1(self.in_ch, width * block.expansion, stride),
                                       nn.BatchNorm2d(width * block.expansion))
        layers = [block(self.in_ch, width, stride, downsample, rates[0])]
        self.in_ch = width * block.expansion
        layers += [block(self.in_ch, width, drop_path=rates[j]) for j in range(1, blocks)]
        return nn.Sequential(*layers)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.forward_features(x)), 1)
        return self.fc(self.dropout(x))


def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet_warehouse_keys(model: ResNet) -> dict[str, str]:
    """Module path -> warehouse key (``stage{s}_layer{l}_conv{c}``), reference layout.

    The first block of a stage hands its first conv, and the strided downsample conv, over to the
    previous stage's warehouse, whose input width they share.
    """
    keys: dict[str, str] = {}
    bottleneck = isinstance(model.layer1[0], Bottleneck)
    for s, stage in enumerate(model.stages()):
        handover_idx = model.block_counts[s - 1] if s > 0 else 0
        for j, block in enumerate(stage):
            prefix = f"layer{s + 1}.{j}"
            if j == 0:
                prev = s - 1 if bottleneck else max(s - 1, 0)
                if prev >= 0:
                    keys[f"{prefix}.conv1"] = f"stage{prev}_layer{handover_idx}_conv0"
                layer_idx = 0
            else:
                keys[f"{prefix}.conv1"] = f"stage{s}_layer{j}_conv0"
                layer_idx = j
            keys[f"{prefix}.conv2"] = f"stage{s}_layer{layer_idx}_conv1"
            if bottleneck:
                keys[f"{prefix}.conv3"] = f"stage{s}_layer{layer_idx}_conv2"
            if j == 0 and block.downsample is not None and block.downsample[0].stride[0] != 1:
                keys[f"{prefix}.downsample.0"] = f"stage{s - 1}_layer{handover_idx + 1}_conv0"
    return keys
