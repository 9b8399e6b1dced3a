"""Named training recipes: the paper's ImageNet recipes and the small one the demo uses.

Li & Yao (ICML 2024, Sec. 4 and appendix): ResNets train 100 epochs with SGD (lr 0.1, batch 256,
weight decay 1e-4), MobileNetV2 150 epochs (SGD, lr 0.05, weight decay 4e-5, cosine), ConvNeXt
300 epochs with AdamW and DeiT 300 epochs with AdamW, both with their papers' regularisation
(RandAugment, mixup, cutmix, random erasing, label smoothing, stochastic depth; EMA for ConvNeXt); the
temperature tau anneals linearly from 1 to 0 over the first 20 epochs
(15 for MobileNetV2). A command-line option given explicitly overrides the recipe's value.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

from .config import TrainConfig

#: the options a recipe may set: how to train, not what (model, data) or where (device, output)
RECIPE_FIELDS = (
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "scheduler",
    "step_epochs",
    "warmup_epochs",
    "temp_epochs",
    "label_smoothing",
    "mixup",
    "cutmix",
    "rand_augment",
    "random_erasing",
    "drop_path",
    "ema",
    "ema_decay",
    "image_size",
)
_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


@dataclass(frozen=True)
class Recipe:
    """A named set of overrides of :class:`~kernelwarehouse.train.TrainConfig`'s training options."""

    name: str
    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.overrides) - set(RECIPE_FIELDS))
        if unknown:
            raise ValueError(
                f"recipe {self.name!r} sets {unknown}, which are not training options "
                f"({', '.join(RECIPE_FIELDS)})"
            )
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))

    def options(self) -> dict[str, Any]:
        """Every training option as the recipe has it: its overrides over TrainConfig's defaults."""
        return {name: self.overrides.get(name, _DEFAULTS[name]) for name in RECIPE_FIELDS}


# what every ImageNet recipe of the paper shares: 100 epochs of SGD (lr 0.1, momentum 0.9, wd 1e-4, batch
# 256) on 224x224 images, tau over the first 20 epochs; each recipe overrides part of it
IMAGENET = dict(
    epochs=100,
    batch_size=256,
    lr=0.1,
    optimizer="sgd",
    momentum=0.9,
    weight_decay=1e-4,
    temp_epochs=20,
    image_size=224,
)
# ConvNeXt (Liu et al., 2022, Table 5) and DeiT (Touvron et al., 2021, Table 9) both train 300 epochs with
# AdamW (wd 0.05) and the same regularisation; their batch, learning rate and warm-up differ
IMAGENET_ADAMW = dict(
    IMAGENET,
    epochs=300,
    optimizer="adamw",
    weight_decay=0.05,
    rand_augment="rand-m9-mstd0.5-inc1",
    mixup=0.8,
    cutmix=1.0,
    random_erasing=0.25,
    label_smoothing=0.1,
    drop_path=0.1,
)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "resnet",
            "ResNet18/50 on ImageNet: 100 epochs, SGD lr 0.1 (x0.1 every 30 epochs), batch 256, "
            "wd 1e-4, tau over 20 epochs",
            dict(IMAGENET, scheduler="step"),
        ),
        Recipe(
            "mobilenetv2",
            "MobileNetV2 on ImageNet: 150 epochs, SGD lr 0.05 cosine, batch 256, wd 4e-5, tau over 15 epochs",
            dict(IMAGENET, epochs=150, lr=0.05, weight_decay=4e-5, temp_epochs=15),
        ),
        Recipe(
            "convnext",
            "ConvNeXt-Tiny on ImageNet: 300 epochs, AdamW lr 4e-3 cosine, 20 warm-up epochs, "
            "batch 4096, wd 0.05, RandAugment m9, mixup 0.8, cutmix 1.0, random erasing 0.25, "
            "label smoothing 0.1, drop path 0.1, EMA 0.9999, tau over 20 epochs",
            dict(IMAGENET_ADAMW, batch_size=4096, lr=4e-3, warmup_epochs=20, ema=True),
        ),
        Recipe(
            "deit",
            "DeiT-Tiny/Small on ImageNet: 300 epochs, AdamW lr 1e-3 (5e-4 x batch/512) cosine, 5 warm-up "
            "epochs, batch 1024, wd 0.05, RandAugment m9, mixup 0.8, cutmix 1.0, random erasing 0.25, "
            "label smoothing 0.1, drop path 0.1, no EMA, tau over 20 epochs",
            dict(IMAGENET_ADAMW, batch_size=1024, lr=1e-3, warmup_epochs=5),
        ),
        Recipe(
            "digits",
            "the demo: 8x8 digits, 10 epochs, SGD lr 0.1 cosine, batch 64, wd 5e-4, tau over 2 epochs "
            "(the paper's 20 % of training)",
            dict(epochs=10, batch_size=64, lr=0.1, weight_decay=5e-4, temp_epochs=2, image_size=8),
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name]
