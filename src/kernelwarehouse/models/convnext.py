"""ConvNeXt (Liu et al., CVPR 2022): timm's ``convnext_tiny`` and its KernelWarehouse version.

The pointwise layers are timm's 1x1-convolution form (``conv_mlp=True``: same parameters, (N, C, H, W)
tensors throughout). KernelWarehouse ConvNeXt (Li & Yao, ICML 2024) makes the stem, the downsample
layers and the depthwise and pointwise convs dynamic, with LayerNorm in the attention branches. The
reference implementation used the original ConvNeXt names (``downsample_layers``, ``dwconv``,
``pwconv1``), mapped by :func:`convnext_reference_names` when its checkpoints are loaded.
"""

from __future__ import annotations

from fractions import Fraction

import torch.nn as nn

from .factory import Family, default_cfg, register_zoo_models
from .resnet import shrink_feature_info

F = Fraction
BLOCK_LAYERS = (("conv_dw", "dwconv0"), ("mlp.fc1", "pwconv1"), ("mlp.fc2", "pwconv2"))


def convnext_small_input(model: nn.Module) -> None:
    """A 1x1 stride-1 stem in place of the 4x4 patchify stem: for 8x8 to 32x32 images."""
    stem = model.stem[0]
    model.stem[0] = nn.Conv2d(
        stem.in_channels, stem.out_channels, 1, 1, device=stem.weight.device, dtype=stem.weight.dtype
    )
    nn.init.trunc_normal_(model.stem[0].weight, std=0.02)
    nn.init.zeros_(model.stem[0].bias)
    shrink_feature_info(model, 4)


def convnext_warehouse_keys(model: nn.Module, budget: Fraction | None = None) -> dict[str, str]:
    """Module path -> warehouse key, reference layout: the stem and each downsample layer are their
    own warehouses, and per stage the depthwise convs share one and the pointwise convs another."""
    keys = {"stem.0": "stagestem_conv0"}
    for i, stage in enumerate(model.stages):
        if i > 0:
            keys[f"stages.{i}.downsample.1"] = f"stage{i - 1}_layerds_conv0"
        for j in range(len(stage.blocks)):
            keys.update(
                {f"stages.{i}.blocks.{j}.{name}": f"stage{i}_layer{j}_{key}" for name, key in BLOCK_LAYERS}
            )
    return keys


def convnext_reference_names(model: nn.Module) -> dict[str, str]:
    """Module path in the original ConvNeXt layout (the reference implementation's) -> timm's."""
    names = {
        "downsample_layers.0.0": "stem.0",
        "downsample_layers.0.1": "stem.1",
        "norm": "head.norm",
        "head": "head.fc",
    }
    originals = dict(zip(("dwconv", "pwconv1", "pwconv2"), (name for name, _ in BLOCK_LAYERS)))
    for i, stage in enumerate(model.stages):
        if i > 0:
            names.update({f"downsample_layers.{i}.{k}": f"stages.{i}.downsample.{k}" for k in (0, 1)})
        for j in range(len(stage.blocks)):
            names[f"stages.{i}.{j}"] = f"stages.{i}.blocks.{j}"
            names.update(
                {f"stages.{i}.{j}.{old}": f"stages.{i}.blocks.{j}.{new}" for old, new in originals.items()}
            )
    return names


CONVNEXT_TINY = Family(
    "convnext_tiny",
    convnext_warehouse_keys,
    lambda budget: {"sharing_range": ("layer", "pwconv"), "norm": "layer"},
    convnext_small_input,
    convnext_reference_names,
    timm_kwargs={"conv_mlp": True},
    feature_cfg={"out_indices": (0, 1, 2, 3), "flatten_sequential": True},
    title="ConvNeXt-Tiny",
    description="with 1x1-conv MLPs (``small_input=True``: a 1x1 stride-1 stem)",
)
# the stem is dynamic: its parameters are its warehouse's
default_cfgs = {"kw_convnext_tiny": default_cfg(CONVNEXT_TINY, first_conv="stem.0.warehouse")}


convnext_tiny, kw_convnext_tiny = register_zoo_models(__name__, convnext_tiny=CONVNEXT_TINY)
