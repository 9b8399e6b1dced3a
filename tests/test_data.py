"""Datasets of kw train: digits, CIFAR python folders, ImageFolder trees, and the epoch batches."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from kernelwarehouse.train.data import EpochBatches, load_data


def write_cifar(folder, num_classes=10, per_batch=20, batches=2, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    key = b"fine_labels" if num_classes == 100 else b"labels"

    def dump(name, n):
        labels = rng.integers(0, num_classes, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: labels}, f)

    if num_classes == 100:
        dump("train", per_batch * batches)
        dump("test", per_batch)
    else:
        for i in range(batches):
            dump(f"data_batch_{i + 1}", per_batch)
        dump("test_batch", per_batch)
    return folder


def write_image_folder(root, classes=("cat", "dog"), per_class=3, size=20):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_digits_are_the_real_data_with_a_fixed_stratified_split():
    train, val, info = load_data("digits")
    assert (info.num_classes, info.in_chans, info.image_size, info.small_input) == (10, 1, 8, True)
    assert (len(train), len(val)) == (1437, 360) == (info.train_size, info.val_size)
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    counts = Counter(val.tensors[1].tolist())
    assert sorted(counts) == list(range(10)) and min(counts.values()) >= 35  # stratified: about 36 per class
    assert abs(float(train.tensors[0].mean())) < 1e-5 and abs(float(train.tensors[0].std()) - 1) < 1e-3
    again, _, _ = load_data("digits")
    assert torch.equal(again.tensors[0], train.tensors[0])


def test_limits_keep_a_fixed_subset():
    train, val, info = load_data("digits", limit_train=100, limit_val=30)
    assert (len(train), len(val), info.train_size, info.val_size) == (100, 30, 100, 30)
    again, _, _ = load_data("digits", limit_train=100)
    assert again.indices == train.indices
    with pytest.raises(ValueError, match="limit-train"):
        load_data("digits", limit_train=0)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_folders(tmp_path, num_classes):
    folder = write_cifar(tmp_path / "cifar", num_classes)
    train, val, info = load_data(str(folder))
    assert (info.num_classes, info.in_chans, info.image_size, info.small_input) == (num_classes, 3, 32, True)
    assert (len(train), len(val)) == (40, 20)
    torch.manual_seed(0)
    x, y = train[3]
    assert x.shape == (3, 32, 32) and 0 <= int(y) < num_classes
    # validation images are the stored pixels, normalised, without augmentation
    raw = torch.from_numpy(val.images[0].numpy()).float() / 255
    assert torch.allclose(val[0][0] * val.std + val.mean, raw, atol=1e-6)


def test_cifar_parent_folder_is_found(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    assert load_data(str(tmp_path))[2].name == "cifar10"


def test_image_folder_tree(tmp_path):
    root = write_image_folder(tmp_path / "images")
    train, val, info = load_data(str(root), image_size=16)
    assert (info.num_classes, info.in_chans, info.image_size, info.small_input) == (2, 3, 16, True)
    assert (len(train), len(val)) == (6, 6)
    assert train[0][0].shape == val[0][0].shape == (3, 16, 16)
    assert load_data(str(root), image_size=96)[2].small_input is False


@pytest.mark.parametrize("case", ["missing", "file", "empty", "corrupt", "no_val", "bad_labels"])
def test_bad_data_paths_name_the_problem(tmp_path, case):
    path = tmp_path / "data"
    if case == "file":
        path.write_text("x")
    elif case == "empty":
        path.mkdir()
    elif case == "corrupt":
        write_cifar(path)
        (path / "data_batch_1").write_bytes(b"not a pickle")
    elif case == "no_val":
        write_image_folder(path)
        import shutil

        shutil.rmtree(path / "val")
    elif case == "bad_labels":
        path.mkdir()
        with open(path / "data_batch_1", "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, f)
        with open(path / "test_batch", "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load_data(str(path))
    assert "data" in str(error.value)
    assert "\n" not in str(error.value)


def test_epoch_batches_are_fixed_by_seed_and_epoch():
    a = list(EpochBatches(50, 8, seed=1, epoch=2))
    assert a == list(EpochBatches(50, 8, seed=1, epoch=2))
    assert a != list(EpochBatches(50, 8, seed=1, epoch=3))
    assert a != list(EpochBatches(50, 8, seed=2, epoch=2))
    assert sorted(i for b in a for i in b) == list(range(50))


def test_epoch_batches_shard_ranks_and_drop_a_last_batch_of_one():
    ranks = [list(EpochBatches(21, 5, seed=0, epoch=0, rank=r, world_size=2)) for r in range(2)]
    # 21 samples, padded to 22, 11 per rank: batches 5, 5 and the last single sample dropped
    assert [[len(b) for b in batches] for batches in ranks] == [[5, 5], [5, 5]]
    covered = {i for batches in ranks for b in batches for i in b}
    assert len(covered) >= 19
    assert [len(b) for b in EpochBatches(13, 4)] == [4, 4, 4]
    assert [len(b) for b in EpochBatches(14, 4)] == [4, 4, 4, 2]
    val = [list(EpochBatches(7, 3, rank=r, world_size=2, train=False)) for r in range(2)]
    assert val == [[[0, 2, 4], [6]], [[1, 3, 5]]]
