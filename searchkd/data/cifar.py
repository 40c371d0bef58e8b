"""CIFAR-10 and CIFAR-100 through torchvision, in their real on-disk (python pickle) format.

torchvision does the reading, the md5 checks and the optional download; this module only
turns its N×32×32×3 numpy arrays into uint8 N×3×32×32 tensors once, so the whole dataset
(180 MB) can sit on the device, and turns "not found or corrupted" into a DatasetNotFound
that says where it looked and how to get the data.
"""

from __future__ import annotations

from pathlib import Path

import torch
from filelock import FileLock
from torchvision.datasets import CIFAR10, CIFAR100

from .base import ArrayDataset, register_dataset, resolve_root
from .errors import DatasetNotFound, one_line

# Per-channel mean and std of each training set's 50,000 images on the 0..1 scale (the true
# pixel std, not the often-copied (0.2023, 0.1994, 0.2010), which is a mean of per-image stds).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

CROP_PADDING = 4  # the standard CIFAR recipe: random 32×32 crop of the image padded by 4 px
FLIP = True  # natural photos are mirror-symmetric, so horizontal flips are label-preserving


def _load(
    name: str,
    cls: type[CIFAR10],
    root: str | Path | None,
    download: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> ArrayDataset:
    where = resolve_root(root)
    folder = where / cls.base_folder
    how = (
        f"set data.download: true or download it with "
        f"torchvision.datasets.{cls.__name__}(root, download=True)"
    )
    try:
        if download:
            # Trials of one search start together and would all download into one folder;
            # the lock makes the first download and the others wait, then verify its copy.
            where.mkdir(parents=True, exist_ok=True)
            with FileLock(str(where / f".{name}.lock")):
                train = cls(str(where), train=True, download=True)
        else:
            train = cls(str(where), train=True, download=False)
        test = cls(str(where), train=False, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted ..."
        if download:  # the download ran but left no valid copy (e.g. a bad archive)
            raise DatasetNotFound(
                f"{name} could not be downloaded to {where} ({one_line(err)}); delete {folder} "
                f"and retry, or put {cls.base_folder}/ there by hand"
            ) from err
        if folder.is_dir():
            raise DatasetNotFound(
                f"{name} under {folder} is incomplete or corrupted (a file is missing or fails "
                f"its md5 check); delete {folder} and {how}"
            ) from err
        raise DatasetNotFound(
            f"{name} not found under {where} (expected {cls.base_folder}/); {how}"
        ) from err
    except OSError as err:  # the download itself failed (no network, disk full, ...)
        raise DatasetNotFound(
            f"{name} could not be downloaded to {where} ({one_line(err)}); put "
            f"{cls.base_folder}/ there by hand or download it with "
            f"torchvision.datasets.{cls.__name__}(root, download=True)"
        ) from err

    def tensors(ds: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # N×H×W×C → N×C×H×W
        return x, torch.as_tensor(ds.targets, dtype=torch.int64)

    train_x, train_y = tensors(train)
    test_x, test_y = tensors(test)
    return ArrayDataset(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=len(train.classes),
        mean=mean,
        std=std,
        crop_padding=CROP_PADDING,
        flip=FLIP,
    )


@register_dataset("cifar10")
def cifar10(root: str | Path | None = None, download: bool = False) -> ArrayDataset:
    return _load("cifar10", CIFAR10, root, download, CIFAR10_MEAN, CIFAR10_STD)


@register_dataset("cifar100")
def cifar100(root: str | Path | None = None, download: bool = False) -> ArrayDataset:
    return _load("cifar100", CIFAR100, root, download, CIFAR100_MEAN, CIFAR100_STD)
