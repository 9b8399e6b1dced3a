"""Named training recipes: the paper's ImageNet recipes and the small one the demo uses.

Li & Yao (ICML 2024, Sec. 4 and appendix): ResNets train 100 epochs with SGD (lr 0.1, batch 256,
weight decay 1e-4), MobileNetV2 150 epochs (SGD, lr 0.05, weight decay 4e-5, cosine), ConvNeXt
300 epochs with AdamW and DeiT 300 epochs with AdamW, both with their papers' regularisation
(RandAugment, mixup, cutmix, random erasing, label smoothing, stochastic depth; EMA for ConvNeXt); the
temperature tau anneals linearly from 1 to 0 over the first 20 epochs
(15 for MobileNetV2). A command-line option given explicitly overrides the recipe's value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    step_epochs: int = 30
    warmup_epochs: int = 0
    temp_epochs: float = 20
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    rand_augment: str | None = None
    random_erasing: float = 0.0
    drop_path: float = 0.0
    ema: bool = False
    ema_decay: float = 0.9999
    image_size: int = 224

    def options(self) -> dict:
        """The training options the recipe sets (everything but name and description)."""
        options = asdict(self)
        del options["name"], options["description"]
        return options


# ConvNeXt (Liu et al., 2022, Table 5) and DeiT (Touvron et al., 2021, Table 9) train with the same set
IMAGENET_REGULARISATION = dict(rand_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, random_erasing=0.25,
                               label_smoothing=0.1, drop_path=0.1)

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("resnet", "ResNet18/50 on ImageNet: 100 epochs, SGD lr 0.1 (x0.1 every 30 epochs), batch 256, "
                     "wd 1e-4, tau over 20 epochs",
           scheduler="step"),
    Recipe("mobilenetv2", "MobileNetV2 on ImageNet: 150 epochs, SGD lr 0.05 cosine, batch 256, wd 4e-5, "
                          "tau over 15 epochs",
           epochs=150, lr=0.05, weight_decay=4e-5, temp_epochs=15),
    Recipe("convnext", "ConvNeXt-Tiny on ImageNet: 300 epochs, AdamW lr 4e-3 cosine, 20 warm-up epochs, "
                       "batch 4096, wd 0.05, RandAugment m9, mixup 0.8, cutmix 1.0, random erasing 0.25, "
                       "label smoothing 0.1, drop path 0.1, EMA 0.9999, tau over 20 epochs",
           epochs=300, batch_size=4096, lr=4e-3, optimizer="adamw", weight_decay=0.05, warmup_epochs=20,
           **IMAGENET_REGULARISATION, ema=True),
    Recipe("deit", "DeiT-Tiny/Small on ImageNet: 300 epochs, AdamW lr 1e-3 (5e-4 x batch/512) cosine, 5 warm-up "
                   "epochs, batch 1024, wd 0.05, RandAugment m9, mixup 0.8, cutmix 1.0, random erasing 0.25, "
                   "label smoothing 0.1, drop path 0.1, no EMA, tau over 20 epochs",
           epochs=300, batch_size=1024, lr=1e-3, optimizer="adamw", weight_decay=0.05, warmup_epochs=5,
           **IMAGENET_REGULARISATION),
    Recipe("digits", "the demo: 8x8 digits, 10 epochs, SGD lr 0.1 cosine, batch 64, wd 5e-4, tau over 2 epochs "
                     "(the paper's 20 % of training)",
           epochs=10, batch_size=64, lr=0.1, weight_decay=5e-4, temp_epochs=2, image_size=8),
)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name]
