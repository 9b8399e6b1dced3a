"""The configuration of a training run: everything that defines it, stored in every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in every checkpoint as ``config``."""

    model: str
    data: str = "digits"
    budget: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    step_epochs: int = 30
    warmup_epochs: float = 0.0
    temp_epochs: float = 20.0
    baseline_temp_epochs: float | None = None  # DY-Conv / ODConv temperature 30 -> 1; None: temp_epochs
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    rand_augment: str | None = None
    random_erasing: float = 0.0
    drop_path: float = 0.0
    ema: bool = False
    ema_decay: float = 0.9999
    amp: bool = False
    channels_last: bool = False
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    output: str = "runs/train"
    recipe: str | None = None
    image_size: int | None = None
    limit_train: int | None = None
    limit_val: int | None = None
    deterministic: bool = True
    log_interval: int = 10
    skip_unreadable: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("epochs", self.epochs >= 1),
            ("batch_size", self.batch_size >= 1),
            ("lr", self.lr > 0),
            ("weight_decay", self.weight_decay >= 0),
            ("temp_epochs", self.temp_epochs >= 0),
            ("baseline_temp_epochs", self.baseline_temp_epochs is None or self.baseline_temp_epochs >= 0),
            ("warmup_epochs", self.warmup_epochs >= 0),
            ("workers", self.workers >= 0),
            ("label_smoothing", 0 <= self.label_smoothing < 1),
            ("drop_path", 0 <= self.drop_path < 1),
            ("mixup", self.mixup >= 0),
            ("cutmix", self.cutmix >= 0),
            ("random_erasing", 0 <= self.random_erasing <= 1),
            ("step_epochs", self.step_epochs >= 1),
            ("log_interval", self.log_interval >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} is out of range: {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be cpu, cuda or auto, got {self.device!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
