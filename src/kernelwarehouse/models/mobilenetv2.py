"""MobileNetV2 (Sandler et al., CVPR 2018): timm's ``mobilenetv2_100`` / ``mobilenetv2_050`` and their
KernelWarehouse versions.

KernelWarehouse MobileNetV2 (Li & Yao, ICML 2024) makes the stem and every conv dynamic; warehouses
follow seven stages, and the first block of a stage that changes width stays in the previous
stage's warehouse. The paper's 1/2x models keep the pointwise convs of stages 1-5 static and make the
classifier dynamic. timm's rows ``blocks.{r}`` are the rows of the MobileNetV2 table below; the
reference implementation used torchvision's names (``features.{k}``), mapped by
:func:`mobilenetv2_reference_names` when its checkpoints are loaded.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch.nn as nn

from .factory import Family, default_cfg, register_zoo_models
from .resnet import shrink_feature_info

F = Fraction

# expansion t, output channels c, blocks n, first stride s
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
WAREHOUSE_STAGE = (1, 2, 3, 4, 5, 6, 6)  # warehouse stage of each row above

HALF = {  # the paper's 1/2x MobileNetV2: per-warehouse ratios over its ten warehouses
    "sharing_range": ("layer",),
    "reduction": 1 / 32,
    "cell_num_ratio": (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5),
    "cell_inplane_ratio": (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.025),
    "cell_outplane_ratio": (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 1),
}
HALF_STATIC_POINTWISE_STAGES = (1, 2, 3, 4, 5)


def mobilenetv2_small_input(model: nn.Module) -> None:
    """Stride 1 in the stem and in the first block of the second row: for 8x8 to 32x32 images."""
    model.conv_stem.stride = (1, 1)
    model.blocks[1][0].conv_dw.stride = (1, 1)
    shrink_feature_info(model, 4)


def _blocks(model: nn.Module):
    """(row, index in row, expansion, timm module path) of every inverted-residual block."""
    for row, (t, _, n, _) in enumerate(INVERTED_RESIDUAL_SETTING):
        for i in range(n):
            yield row, i, t, f"blocks.{row}.{i}"


def mobilenetv2_warehouse_keys(model: nn.Module, budget: Fraction | None = None) -> dict[str, str]:
    """Module path -> warehouse key (``stage{s}_layer{l}_{pw,dw}conv{c}``), reference layout."""
    half = budget == F(1, 2)
    static_pointwise = HALF_STATIC_POINTWISE_STAGES if half else ()
    keys = {"conv_stem": "stage0_conv0"}
    layer_idx = 0
    for row, i, t, prefix in _blocks(model):
        handover = i == 0 and row > 0 and WAREHOUSE_STAGE[row] != WAREHOUSE_STAGE[row - 1]
        stage = WAREHOUSE_STAGE[row] - (1 if handover else 0)
        pointwise = stage not in static_pointwise
        expand, project = ("conv_pw", "conv_pwl") if t != 1 else (None, "conv_pw")
        if expand and pointwise:
            keys[f"{prefix}.{expand}"] = f"stage{stage}_layer{layer_idx}_pwconv0"
        keys[f"{prefix}.conv_dw"] = f"stage{stage}_layer{layer_idx}_dwconv0"
        if pointwise:
            keys[f"{prefix}.{project}"] = f"stage{stage}_layer{layer_idx}_pwconv1"
        layer_idx = 0 if handover else layer_idx + 1
    keys["conv_head"] = f"stage{WAREHOUSE_STAGE[-1]}_layer{layer_idx}_pwconv1"
    if half and isinstance(model.classifier, nn.Linear):
        keys["classifier"] = "classifier"
    return keys


def mobilenetv2_plan_options(budget: Fraction) -> dict[str, Any]:
    if budget == F(1, 2):
        return dict(HALF)
    return {"sharing_range": ("layer",) if budget > 1 else ("layer", "pwconv")}


def mobilenetv2_reference_names(model: nn.Module) -> dict[str, str]:
    """Module path in torchvision's layout (the reference implementation's) -> timm's."""
    names = {"features.0.0": "conv_stem", "features.0.1": "bn1", "classifier.1": "classifier"}
    index = 1
    for _, _, t, prefix in _blocks(model):
        source = f"features.{index}.conv"
        if t == 1:
            parts = {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"}
        else:
            parts = {
                "0.0": "conv_pw",
                "0.1": "bn1",
                "1.0": "conv_dw",
                "1.1": "bn2",
                "2": "conv_pwl",
                "3": "bn3",
            }
        names.update({f"{source}.{k}": f"{prefix}.{v}" for k, v in parts.items()})
        index += 1
    names.update({f"features.{index}.0": "conv_head", f"features.{index}.1": "bn2"})
    return names


def _family(timm_name: str, title: str) -> Family:
    return Family(
        timm_name,
        mobilenetv2_warehouse_keys,
        mobilenetv2_plan_options,
        mobilenetv2_small_input,
        mobilenetv2_reference_names,
        feature_cfg={"flatten_sequential": True},
        title=title,
        description="(``small_input=True``: stride 1 in the stem and the second row)",
    )


MOBILENETV2_100 = _family("mobilenetv2_100", "MobileNetV2 1.0")
MOBILENETV2_050 = _family("mobilenetv2_050", "MobileNetV2 0.5")
# the stem is dynamic: its parameters are its warehouse's
default_cfgs = {
    "kw_mobilenetv2_100": default_cfg(MOBILENETV2_100, first_conv="conv_stem.warehouse"),
    "kw_mobilenetv2_050": default_cfg(MOBILENETV2_050, first_conv="conv_stem.warehouse"),
}


mobilenetv2_100, mobilenetv2_050, kw_mobilenetv2_100, kw_mobilenetv2_050 = register_zoo_models(
    __name__, mobilenetv2_100=MOBILENETV2_100, mobilenetv2_050=MOBILENETV2_050
)
