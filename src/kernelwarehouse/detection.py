"""Detection with a KernelWarehouse backbone: torchvision Faster R-CNN / Mask R-CNN on KW-ResNet50-FPN.

The paper (Li & Yao, ICML 2024, Sec. 4.2) trains Mask R-CNN on MS-COCO with KernelWarehouse
backbones. Here the backbone is the zoo's ``kw_resnet50`` (any budget) under a feature pyramid;
heads, losses and evaluation are torchvision's. Needs torchvision.

>>> model = fasterrcnn_kw_resnet50_fpn(num_classes=3, budget=1, min_size=320, max_size=512)
>>> losses = model(images, targets)          # training: a dict of losses
>>> detections = model.eval()(images)        # evaluation: boxes, labels, scores per image
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn as nn

from .models.registry import create_model
from .models.resnet import resnet_stages

__all__ = [
    "KWResNetFPN",
    "fasterrcnn_kw_resnet50_fpn",
    "kw_resnet50_fpn_backbone",
    "maskrcnn_kw_resnet50_fpn",
]


class KWResNetFPN(nn.Module):
    """A ResNet body (its classifier dropped) and a feature pyramid on the chosen stages.

    Returns torchvision's ``OrderedDict`` of pyramid levels; ``out_channels`` is the pyramid width.
    """

    def __init__(
        self, body: nn.Module, returned_layers: Sequence[int] = (1, 2, 3, 4), out_channels: int = 256
    ) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        if not returned_layers or any(i not in (1, 2, 3, 4) for i in returned_layers):
            raise ValueError(
                f"returned_layers must be a non-empty subset of (1, 2, 3, 4), got {returned_layers}"
            )
        self.returned_layers = tuple(sorted(returned_layers))
        body.fc = nn.Identity()
        self.body = body
        widths = [_out_channels(stage) for stage in resnet_stages(body)]
        self.fpn = FeaturePyramidNetwork(
            [widths[i - 1] for i in self.returned_layers], out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        body = self.body
        x = body.maxpool(body.act1(body.bn1(body.conv1(x))))
        features = OrderedDict()
        for index, stage in enumerate(resnet_stages(body), start=1):
            x = stage(x)
            if index in self.returned_layers:
                features[str(index - 1)] = x
            if index == self.returned_layers[-1]:
                break
        return self.fpn(features)


def _out_channels(stage: nn.Sequential) -> int:
    block = stage[-1]
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


def kw_resnet50_fpn_backbone(
    budget: Any = 1, returned_layers: Sequence[int] = (1, 2, 3, 4), out_channels: int = 256, **overrides: Any
) -> KWResNetFPN:
    """KW-ResNet50 (the zoo's, at ``budget``; ``overrides`` go to its builder) under an FPN."""
    return KWResNetFPN(create_model("kw_resnet50", budget=budget, **overrides), returned_layers, out_channels)


def fasterrcnn_kw_resnet50_fpn(
    num_classes: int = 91, budget: Any = 1, *, backbone_options: dict[str, Any] | None = None, **kwargs: Any
) -> nn.Module:
    """torchvision :class:`~torchvision.models.detection.FasterRCNN` on KW-ResNet50-FPN;
    ``kwargs`` go to FasterRCNN (``min_size``, ``max_size``, RPN and ROI settings)."""
    from torchvision.models.detection import FasterRCNN

    return FasterRCNN(kw_resnet50_fpn_backbone(budget, **(backbone_options or {})), num_classes, **kwargs)


def maskrcnn_kw_resnet50_fpn(
    num_classes: int = 91, budget: Any = 1, *, backbone_options: dict[str, Any] | None = None, **kwargs: Any
) -> nn.Module:
    """torchvision :class:`~torchvision.models.detection.MaskRCNN` on KW-ResNet50-FPN (the paper's
    detector)."""
    from torchvision.models.detection import MaskRCNN

    return MaskRCNN(kw_resnet50_fpn_backbone(budget, **(backbone_options or {})), num_classes, **kwargs)
