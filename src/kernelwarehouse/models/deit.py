"""DeiT (Touvron et al., ICML 2021) and its KernelWarehouse version.

The static models follow timm's ``deit_tiny_patch16_224`` / ``deit_small_patch16_224`` parameter
for parameter and name for name, so a timm state dict loads into them unchanged.

KernelWarehouse DeiT (Li & Yao, ICML 2024, who report DeiT-Tiny results) makes the four linear
layers of every transformer block dynamic. Warehouses are shared across the blocks by layer kind:
``qkv`` (12 layers), ``proj``, ``fc1`` and ``fc2``; cells are ``dim x dim``, so a block's qkv has
3 cells, proj 1, fc1 and fc2 4 each. The attention of each layer pools over all tokens, class
token included. Patch embedding, norms and the classifier stay static.
"""
from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.build import build_kernelwarehouse
from ..core.plan import RATIO_NAMES
from ._blocks import DropPath
from .registry import ModelEntry, register

KINDS = ("qkv", "proj", "fc1", "fc2")


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.img_size, self.num_patches = img_size, (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"DeiT built for {self.img_size}x{self.img_size} inputs, got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """A ViT with a class token (DeiT without distillation token). ``small_input`` builds it for
    32x32 images with 4x4 patches."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, num_classes: int = 1000,
                 in_chans: int = 3, img_size: int = 224, patch_size: int = 16, mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, small_input: bool = False) -> None:
        super().__init__()
        if small_input:
            img_size, patch_size = 32, 4
        self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, drop_path_rate * i / max(depth - 1, 1))
                                      for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x)[:, 0]))


def deit_tiny(**kwargs) -> VisionTransformer:
    return VisionTransformer(192, 12, 3, **kwargs)


def deit_small(**kwargs) -> VisionTransformer:
    return VisionTransformer(384, 12, 6, **kwargs)


def deit_warehouse_keys(model: VisionTransformer) -> dict[str, str]:
    """Module path -> warehouse: one warehouse per linear kind, shared by all blocks."""
    return {f"blocks.{i}.{part}.{kind}": kind for i in range(len(model.blocks))
            for part, kinds in (("attn", KINDS[:2]), ("mlp", KINDS[2:])) for kind in kinds}


def _kw_deit(static):
    def build(budget: Fraction = Fraction(1), num_classes: int = 1000, **overrides) -> VisionTransformer:
        options = {k: overrides.pop(k) for k in list(overrides) if k in RATIO_NAMES}
        model = static(num_classes=num_classes, **overrides)
        # cells of dim x dim: qkv (3 dim x dim) and fc1 (4 dim x dim) cut their outputs, fc2 its inputs
        options = {"cell_num_ratio": float(budget), "cell_outplane_ratio": {"qkv": 1 / 3, "fc1": 1 / 4},
                   "cell_inplane_ratio": {"fc2": 1 / 4}, "norm": "layer", **options}
        return build_kernelwarehouse(model, deit_warehouse_keys(model), **options)
    return build


kw_deit_tiny = _kw_deit(deit_tiny)
kw_deit_small = _kw_deit(deit_small)

for _name, _builder in (("deit_tiny", deit_tiny), ("deit_small", deit_small),
                        ("kw_deit_tiny", kw_deit_tiny), ("kw_deit_small", kw_deit_small)):
    register(ModelEntry(_name, _builder, _name.startswith("kw_")))
