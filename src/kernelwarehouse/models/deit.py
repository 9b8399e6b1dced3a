"""DeiT (Touvron et al., ICML 2021): timm's ``deit_tiny_patch16_224`` / ``deit_small_patch16_224`` and
their KernelWarehouse versions.

KernelWarehouse DeiT (Li & Yao, ICML 2024, who report DeiT-Tiny results) makes the four linear
layers of every transformer block dynamic. Warehouses are shared across the blocks by layer kind:
``qkv`` (12 layers), ``proj``, ``fc1`` and ``fc2``; cells are ``dim x dim``, so a block's qkv has
3 cells, proj 1, fc1 and fc2 4 each. The attention of each layer pools over all tokens, class
token included. Patch embedding, norms and the classifier stay static. ``small_input=True`` builds
the model for 32x32 images with 4x4 patches.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch.nn as nn

from .factory import Family, default_cfg, register_zoo_models

KINDS = ("qkv", "proj", "fc1", "fc2")
PARTS = (("attn", KINDS[:2]), ("mlp", KINDS[2:]))


def deit_warehouse_keys(model: nn.Module, budget: Fraction | None = None) -> dict[str, str]:
    """Module path -> warehouse: one warehouse per linear kind, shared by all blocks."""
    return {
        f"blocks.{i}.{part}.{kind}": kind
        for i in range(len(model.blocks))
        for part, kinds in PARTS
        for kind in kinds
    }


def deit_plan_options(budget: Fraction) -> dict[str, Any]:
    # cells of dim x dim: qkv (3 dim x dim) and fc1 (4 dim x dim) cut their outputs, fc2 its inputs
    return {
        "cell_outplane_ratio": {"qkv": 1 / 3, "fc1": 1 / 4},
        "cell_inplane_ratio": {"fc2": 1 / 4},
        "norm": "layer",
    }


def _family(timm_name: str, title: str) -> Family:
    return Family(
        timm_name,
        deit_warehouse_keys,
        deit_plan_options,
        feature_cfg={"feature_cls": "getter"},
        small_input_kwargs={"img_size": 32, "patch_size": 4},
        title=title,
        description=f"``{timm_name}``",
        dynamic_layers="linears",
    )


DEIT_TINY = _family("deit_tiny_patch16_224", "DeiT-Tiny")
DEIT_SMALL = _family("deit_small_patch16_224", "DeiT-Small")
default_cfgs = {"kw_deit_tiny": default_cfg(DEIT_TINY), "kw_deit_small": default_cfg(DEIT_SMALL)}


deit_tiny, deit_small, kw_deit_tiny, kw_deit_small = register_zoo_models(
    __name__, deit_tiny=DEIT_TINY, deit_small=DEIT_SMALL
)
