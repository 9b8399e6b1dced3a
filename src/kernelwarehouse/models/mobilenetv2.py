"""MobileNetV2 (Sandler et al., CVPR 2018) and the KernelWarehouse assignment of its layers.

Static models match torchvision's ``mobilenet_v2`` parameter for parameter. KernelWarehouse
MobileNetV2 (Li & Yao, ICML 2024) makes the stem and every conv dynamic; warehouses follow seven
stages, and the first block of a stage that changes width stays in the previous stage's warehouse.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._blocks import make_divisible

# expansion t, output channels c, blocks n, first stride s
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
WAREHOUSE_STAGE = (1, 2, 3, 4, 5, 6, 6)  # warehouse stage of each row above


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                                   bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = [ConvBNReLU(in_ch, hidden, 1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_chans: int = 3,
                 drop_rate: float = 0.0, small_input: bool = False) -> None:
        super().__init__()
        self.width_mult = width_mult
        in_ch = make_divisible(32 * width_mult)
        self.num_features = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU(in_chans, in_ch, stride=1 if small_input else 2)]
        for row, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                stride = s if i == 0 and not (small_input and row == 1) else 1
                features.append(InvertedResidual(in_ch, out_ch, stride, t))
                in_ch = out_ch
        features.append(ConvBNReLU(in_ch, self.num_features, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.num_features, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def mobilenetv2_100(**kwargs) -> MobileNetV2:
    return MobileNetV2(width_mult=1.0, **kwargs)


def mobilenetv2_050(**kwargs) -> MobileNetV2:
    return MobileNetV2(width_mult=0.5, **kwargs)


def mobilenetv2_warehouse_keys(model: MobileNetV2, static_pointwise_stages: tuple[int, ...] = (),
                               dynamic_classifier: bool = False) -> dict[str, str]:
    """Module path -> warehouse key (``stage{s}_layer{l}_{pw,dw}conv{c}``), reference layout.

    Pointwise convs of the warehouse stages in ``static_pointwise_stages`` stay static, and
    ``dynamic_classifier`` makes the classifier a KernelWarehouse layer (the paper's 1/2x variant).
    """
    keys = {"features.0.0": "stage0_conv0"}
    index, layer_idx = 1, 0
    for row, (t, _, n, _) in enumerate(INVERTED_RESIDUAL_SETTING):
        for i in range(n):
            handover = i == 0 and row > 0 and WAREHOUSE_STAGE[row] != WAREHOUSE_STAGE[row - 1]
            stage = WAREHOUSE_STAGE[row] - (1 if handover else 0)
            pointwise = stage not in static_pointwise_stages
            prefix, conv = f"features.{index}.conv", 0
            if t != 1:
                if pointwise:
                    keys[f"{prefix}.0.0"] = f"stage{stage}_layer{layer_idx}_pwconv0"
                conv = 1
            keys[f"{prefix}.{conv}.0"] = f"stage{stage}_layer{layer_idx}_dwconv0"
            if pointwise:
                keys[f"{prefix}.{conv + 1}"] = f"stage{stage}_layer{layer_idx}_pwconv1"
            layer_idx = 0 if handover else layer_idx + 1
            index += 1
    keys[f"features.{index}.0"] = f"stage{WAREHOUSE_STAGE[-1]}_layer{layer_idx}_pwconv1"
    if dynamic_classifier:
        keys["classifier.1"] = "classifier"
    return keys
