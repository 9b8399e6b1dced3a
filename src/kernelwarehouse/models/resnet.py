"""ResNet (He et al., CVPR 2016): timm's ``resnet18`` / ``resnet50`` and their KernelWarehouse versions.

KernelWarehouse ResNets (Li & Yao, ICML 2024) make every conv of the residual blocks and every
strided downsample conv dynamic; stem, classifier and stride-1 downsample stay static, and in
ResNet50 so does the very first 1x1 conv (``layer1.0.conv1``). Module names are timm's, which are
also the reference implementation's.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch.nn as nn

from .factory import Family, default_cfg, register_zoo_models

F = Fraction


def resnet_stages(model: nn.Module) -> list[nn.Sequential]:
    return [model.layer1, model.layer2, model.layer3, model.layer4]


def shrink_feature_info(model: nn.Module, factor: int) -> None:
    """Divide the reductions of ``model.feature_info`` by ``factor`` (a stem made stride 1)."""
    for info in model.feature_info:
        info["reduction"] = max(1, info["reduction"] // factor)


def resnet_small_input(model: nn.Module) -> None:
    """A 3x3 stride-1 stem and no max-pool: the usual ResNet for 8x8 to 32x32 images."""
    stem = model.conv1
    model.conv1 = nn.Conv2d(
        stem.in_channels,
        stem.out_channels,
        3,
        1,
        1,
        bias=False,
        device=stem.weight.device,
        dtype=stem.weight.dtype,
    )
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    shrink_feature_info(model, 4)


def resnet_stem_width(model: nn.Module, width: int) -> None:
    """A plain stem of ``width`` channels (timm's plain stem is 64 wide whatever ``stem_width`` says;
    narrow ResNets such as the demo's need it), with the first block taking that width."""
    if isinstance(model.conv1, nn.Sequential):  # a deep stem: timm's own stem_width applies
        return
    stem, block = model.conv1, model.layer1[0]
    model.conv1 = _conv_like(stem, in_channels=stem.in_channels, out_channels=width)
    model.bn1 = type(model.bn1)(width)
    block.conv1 = _conv_like(block.conv1, in_channels=width, out_channels=block.conv1.out_channels)
    last = block.conv3 if hasattr(block, "conv3") else block.conv2
    if block.downsample is not None:
        if width == last.out_channels:  # same width, stride 1: an identity shortcut, as torchvision's
            block.downsample = None
        else:
            shortcut = block.downsample[0]
            block.downsample[0] = _conv_like(shortcut, in_channels=width, out_channels=shortcut.out_channels)
    model.feature_info[0]["num_chs"] = width


def _conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    new = nn.Conv2d(
        in_channels,
        out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=False,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    return new


def resnet_warehouse_keys(model: nn.Module, budget: Fraction | None = None) -> dict[str, str]:
    """Module path -> warehouse key (``stage{s}_layer{l}_conv{c}``), reference layout.

    The first block of a stage hands its first conv, and the strided downsample conv, over to the
    previous stage's warehouse, whose input width they share.
    """
    keys: dict[str, str] = {}
    stages = resnet_stages(model)
    bottleneck = hasattr(model.layer1[0], "conv3")
    for s, stage in enumerate(stages):
        handover_idx = len(stages[s - 1]) if s > 0 else 0
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


def resnet_plan_options(budget: Fraction, nonlocal_basis: bool = False) -> dict[str, Any]:
    """The reference configurations: below 1x, cells of half the input and output channels (and
    in ResNet50 a non-local basis of 1/16)."""
    if budget >= 1:
        return {"sharing_range": ("layer", "conv")}
    options = {"sharing_range": ("layer", "conv"), "cell_inplane_ratio": 0.5, "cell_outplane_ratio": 0.5}
    if nonlocal_basis:
        options["nonlocal_basis_ratio"] = 1 / 16
    return options


# the reference implementation trains from torchvision's initialisation: no zero-initialised last norm
TORCHVISION_INIT = {"zero_init_last": False}
STEM_WIDTH = {"stem_width": resnet_stem_width}


def _family(timm_name: str, title: str, nonlocal_basis: bool = False) -> Family:
    return Family(
        timm_name,
        resnet_warehouse_keys,
        lambda budget: resnet_plan_options(budget, nonlocal_basis),
        resnet_small_input,
        timm_kwargs=TORCHVISION_INIT,
        extra_options=STEM_WIDTH,
        title=title,
        description="(``small_input=True``: 3x3 stride-1 stem, no max-pool)",
    )


RESNET18, RESNET50 = _family("resnet18", "ResNet18"), _family("resnet50", "ResNet50", nonlocal_basis=True)
default_cfgs = {"kw_resnet18": default_cfg(RESNET18), "kw_resnet50": default_cfg(RESNET50)}


resnet18, resnet50, kw_resnet18, kw_resnet50 = register_zoo_models(
    __name__, resnet18=RESNET18, resnet50=RESNET50
)
