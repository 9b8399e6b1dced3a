"""Datasets for ``kw train``: scikit-learn's digits, CIFAR-10/100 python-pickle folders, ImageFolder trees.

``load_data(source)`` returns the train and validation sets and a :class:`DataInfo` (classes,
channels, image size, whether the small-image stem applies). Nothing is downloaded: ``digits`` is
embedded in scikit-learn, anything else is a local path.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, Subset, TensorDataset

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_INPUT_MAX = 64  # images up to this size get the 3x3 stride-1 stem without max-pool


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation beyond crops and flips, for ImageFolder data of full-size images:
    timm's RandAugment (a policy string such as ``"rand-m9-mstd0.5-inc1"``) and random erasing
    (the probability per image)."""

    rand_augment: str | None = None
    random_erasing: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.rand_augment or self.random_erasing)


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know of a dataset."""

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    small_input: bool
    train_size: int
    val_size: int


def load_data(
    source: str,
    image_size: int | None = None,
    limit_train: int | None = None,
    limit_val: int | None = None,
    augment: Augmentation = Augmentation(),
    skip_unreadable: bool = False,
) -> tuple[Dataset, Dataset, DataInfo]:
    """(train set, validation set, info) for ``digits``, a CIFAR folder or an ImageFolder tree.

    ``limit_train`` / ``limit_val`` keep the first N samples of a fixed shuffle (for quick runs).
    Raises ValueError (or FileNotFoundError) naming the path and what is wrong with it. An unreadable
    image of an ImageFolder tree raises :class:`CorruptImageError` when it is loaded, or with
    ``skip_unreadable`` is dropped from its batch (see :func:`collate_readable`).
    """
    if source == "digits":
        train, val, info = _digits()
        _no_augmentation(augment, "digits")
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"data path {source!r} does not exist (expected 'digits', a CIFAR "
                f"python-pickle folder or an ImageFolder tree with train/ and val/)"
            )
        if not path.is_dir():
            raise ValueError(f"data path {source!r} is not a directory")
        cifar = _cifar_folder(path)
        if cifar is not None:
            train, val, info = _cifar(cifar, *_cifar_files(cifar))
            _no_augmentation(augment, "CIFAR")
        elif (path / "train").is_dir():
            train, val, info = _image_folder(path, image_size or 224, augment, skip_unreadable)
        else:
            raise ValueError(
                f"data path {source!r} is neither a CIFAR-10/100 python folder (data_batch_1.. "
                f"or train/test pickles) nor an ImageFolder tree (train/ and val/ class folders)"
            )
    train, val = _limit(train, limit_train, "train"), _limit(val, limit_val, "val")
    info = DataInfo(
        info.name, info.num_classes, info.in_chans, info.image_size, info.small_input, len(train), len(val)
    )
    return train, val, info


def _no_augmentation(augment: Augmentation, name: str) -> None:
    if augment:
        raise ValueError(
            f"--rand-augment and --random-erasing apply to ImageFolder data of full-size images, "
            f"not to {name}"
        )


def _limit(dataset: Dataset, limit: int | None, split: str) -> Dataset:
    if limit is None:
        return dataset
    if limit < 1:
        raise ValueError(f"--limit-{split} must be >= 1, got {limit}")
    if limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
    return Subset(dataset, sorted(order.tolist()))


def _digits() -> tuple[Dataset, Dataset, DataInfo]:
    """The 1797 8x8 handwritten digits of scikit-learn (UCI), a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    x_train, x_val, y_train, y_val = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    mean, std = float(x_train.mean()), float(x_train.std())

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy((x - mean) / std).unsqueeze(1), torch.from_numpy(y).long())

    info = DataInfo("digits", 10, 1, 8, True, len(y_train), len(y_val))
    return tensors(x_train, y_train), tensors(x_val, y_val), info


def _cifar_folder(path: Path) -> Path | None:
    """``path`` itself or its single ``cifar-10-batches-py`` / ``cifar-100-python`` child."""
    for candidate in (path, path / "cifar-10-batches-py", path / "cifar-100-python"):
        if (candidate / "data_batch_1").is_file() or (candidate / "train").is_file():
            return candidate
    return None


def _cifar_files(path: Path) -> tuple[list[Path], Path, str]:
    if (path / "train").is_file():
        return [path / "train"], path / "test", "cifar100"
    train = sorted(path.glob("data_batch_*"))
    return train, path / "test_batch", "cifar10"


def _read_pickle(file: Path) -> tuple[np.ndarray, np.ndarray]:
    if not file.is_file():
        raise FileNotFoundError(f"CIFAR folder {str(file.parent)!r} has no {file.name!r}")
    try:
        with open(file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"fine_labels"] if b"fine_labels" in batch else batch[b"labels"])
        images = data.reshape(-1, 3, 32, 32)
    except Exception as error:  # any unpickling or layout failure means the file is not CIFAR
        raise ValueError(
            f"{str(file)!r} is not a CIFAR python batch ({type(error).__name__}: {error})"
        ) from None
    if len(images) != len(labels):
        raise ValueError(f"{str(file)!r} holds {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def _cifar(
    path: Path, train_files: list[Path], test_file: Path, name: str
) -> tuple[Dataset, Dataset, DataInfo]:
    parts = [_read_pickle(f) for f in train_files]
    x_train, y_train = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x_val, y_val = _read_pickle(test_file)
    num_classes = 100 if name == "cifar100" else 10
    for labels, file in ((y_train, train_files[0]), (y_val, test_file)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{str(file)!r}: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
            )
    info = DataInfo(name, num_classes, 3, 32, True, len(y_train), len(y_val))
    return (CifarDataset(x_train, y_train, augment=True), CifarDataset(x_val, y_val, augment=False), info)


class CifarDataset(Dataset):
    """uint8 CIFAR images; training adds the usual 4-pixel-padded random crop and horizontal flip.

    Random choices use torch's generator (seeded per worker by the DataLoader), so a run is repeatable.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool) -> None:
        self.images, self.labels, self.augment = torch.from_numpy(images), torch.from_numpy(labels), augment
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].float().div_(255)
        if self.augment:
            padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            image = padded[:, top : top + 32, left : left + 32]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return (image - self.mean) / self.std, self.labels[index]


class CorruptImageError(ValueError):
    """An image of an ImageFolder tree that cannot be read."""


def image_folder_class(skip_unreadable: bool):
    """torchvision's ImageFolder whose unreadable images raise :class:`CorruptImageError` naming the
    file, or, with ``skip_unreadable``, come back as None (dropped by :func:`collate_readable`)."""
    from torchvision import datasets

    class CheckedImageFolder(datasets.ImageFolder):
        def __getitem__(self, index: int):
            try:
                return super().__getitem__(index)
            except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for truncated / foreign files
                if skip_unreadable:
                    return None
                raise CorruptImageError(
                    f"unreadable image {self.samples[index][0]}: {error} "
                    f"(--skip-unreadable skips such images and counts them)"
                ) from None

    return CheckedImageFolder


def collate_readable(samples: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A batch of the samples that could be read, and how many could not."""
    from torch.utils.data import default_collate

    readable = [s for s in samples if s is not None]
    skipped = len(samples) - len(readable)
    if not readable:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, labels = default_collate(readable)
    return images, labels, skipped


def _image_folder(
    path: Path, image_size: int, augment: Augmentation = Augmentation(), skip_unreadable: bool = False
) -> tuple[Dataset, Dataset, DataInfo]:
    from torchvision import transforms

    if not (path / "val").is_dir():
        raise FileNotFoundError(f"ImageFolder tree {str(path)!r} has train/ but no val/")
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    small = image_size <= SMALL_INPUT_MAX
    if small and augment:
        _no_augmentation(augment, f"{image_size}x{image_size} images")
    if small:
        train_tf = transforms.Compose(
            [
                transforms.Resize(image_size),
                transforms.CenterCrop(image_size),
                transforms.RandomCrop(image_size, padding=image_size // 8),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        )
        val_tf = transforms.Compose(
            [
                transforms.Resize(image_size),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                normalize,
            ]
        )
    else:  # timm's ImageNet pipeline: random resized crop, flip, RandAugment, erasing; 0.875 centre crop
        from timm.data import create_transform

        train_tf = create_transform(
            image_size,
            is_training=True,
            auto_augment=augment.rand_augment,
            re_prob=augment.random_erasing,
            interpolation="bicubic",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        val_tf = create_transform(
            image_size,
            is_training=False,
            interpolation="bicubic",
            crop_pct=0.875,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
    folder = image_folder_class(skip_unreadable)
    try:
        train = folder(str(path / "train"), transform=train_tf)
        val = folder(str(path / "val"), transform=val_tf)
    except (FileNotFoundError, RuntimeError) as error:
        raise ValueError(f"ImageFolder tree {str(path)!r}: {error}".splitlines()[0]) from None
    if train.classes != val.classes:
        raise ValueError(
            f"ImageFolder tree {str(path)!r}: train/ has {len(train.classes)} classes, val/ has "
            f"{len(val.classes)} (they must have the same class folders)"
        )
    info = DataInfo("imagefolder", len(train.classes), 3, image_size, small, len(train), len(val))
    return train, val, info


class EpochBatches(Sampler[list[int]]):
    """Batches of one process for one epoch, fixed by (seed, epoch): the same on every run and resume.

    Training shuffles, pads the order so that every rank gets ``ceil(N / world_size)`` samples (as
    DistributedSampler does), takes every ``world_size``-th index, and drops a last batch of one
    sample, which BatchNorm cannot train on. Evaluation keeps the order and shards without padding.
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if train:
            order = torch.randperm(length, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            per_rank = math.ceil(length / world_size)
            order = torch.cat([order, order[: per_rank * world_size - length]])
            indices = order[rank::world_size].tolist()
            if len(indices) % batch_size == 1 and len(indices) > 1:
                indices = indices[:-1]
        else:
            indices = list(range(rank, length, world_size))
        self.batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
