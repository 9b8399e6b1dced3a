"""ConvNeXt (Liu et al., CVPR 2022) and the KernelWarehouse assignment of its layers.

The pointwise layers are 1x1 convolutions on (N, C, H, W) tensors; the static model has the
parameters of torchvision's ``convnext_tiny``. KernelWarehouse ConvNeXt (Li & Yao, ICML 2024)
makes the stem, the downsample layers and the depthwise and pointwise convs dynamic, with
LayerNorm in the attention branches.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._blocks import DropPath, LayerNorm2d


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Conv2d(dim, 4 * dim, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(4 * dim, dim, 1)
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.drop_path(self.gamma * out)


class ConvNeXt(nn.Module):
    def __init__(self, num_classes: int = 1000, depths: tuple[int, ...] = (3, 3, 9, 3),
                 dims: tuple[int, ...] = (96, 192, 384, 768), in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, layer_scale: float = 1e-6, small_input: bool = False) -> None:
        super().__init__()
        stem_stride = 1 if small_input else 4
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], stem_stride, stem_stride), LayerNorm2d(dims[0], eps=1e-6))]
            + [nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], 2, 2))
               for i in range(len(dims) - 1)])
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(nn.Sequential(*[ConvNeXtBlock(dims[i], rates[start + j], layer_scale)
                                               for j in range(depth)]))
        self.num_features = dims[-1]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.forward_features(x).mean((-2, -1)))
        return self.head(self.dropout(x))


def convnext_tiny(**kwargs) -> ConvNeXt:
    return ConvNeXt(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), **kwargs)


def convnext_warehouse_keys(model: ConvNeXt) -> dict[str, str]:
    """Module path -> warehouse key, reference layout: each downsample layer is its own warehouse,
    and per stage the depthwise convs share one and the pointwise convs another."""
    keys = {"downsample_layers.0.0": "stagestem_conv0"}
    for i in range(1, len(model.downsample_layers)):
        keys[f"downsample_layers.{i}.1"] = f"stage{i - 1}_layerds_conv0"
    for i, stage in enumerate(model.stages):
        for j in range(len(stage)):
            for name, key in (("dwconv", "dwconv0"), ("pwconv1", "pwconv1"), ("pwconv2", "pwconv2")):
                keys[f"stages.{i}.{j}.{name}"] = f"stage{i}_layer{j}_{key}"
    return keys
