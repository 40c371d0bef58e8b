"""Fashion-MNIST (Zalando) through torchvision's own reader, in the real IDX format, offline.

The four files are found, in this order:

1. under `data.root` in torchvision's layout, `<root>/FashionMNIST/raw/*-ubyte` (what
   `torchvision.datasets.FashionMNIST(root, download=True)` leaves; its gzip'd copies alone
   are unpacked there too);
2. the Debian package's copy (`apt-get install dataset-fashion-mnist`, in `DEBIAN_DIR`):
   unpacked once into the data root under a lock, each file written atomically; the
   package's files are only read;
3. `data.download: true`: torchvision's download (machines with internet).

When none has them, a DatasetNotFound names all three ways and nothing is written.

The images stay what they are, 1×28×28 grey, as scikit-learn's digits stay 1×8×8: every
model of the zoo is built for the data's channels and size, and the published Fashion-MNIST
figures a user compares against are measured on the native images. Padding to 32×32 and
copying grey into three channels would add cost and no information.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import torch
from filelock import FileLock
from pydantic import Field
from torchvision.datasets import FashionMNIST

from .base import ArrayDataset, register_dataset, resolve_root
from .errors import DatasetNotFound, one_line

# Where the Debian package puts the gzip'd files; SEARCHKD_FASHION_MNIST_DIR overrides it
# (read at every load, so a test or a machine with the files elsewhere can point at them).
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_ENV = "SEARCHKD_FASHION_MNIST_DIR"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = tuple(name.removesuffix(".gz") for name, _ in FashionMNIST.resources)

# Standard augmentation: a random 28×28 crop of the image zero-padded by 4 px (the CIFAR
# recipe's shift, in pixels) and horizontal flips — clothes, bags and shoes are still what
# they are mirrored, unlike digits.
CROP_PADDING = 4
FLIP = True
NUM_CLASSES = 10


def debian_dir() -> Path:
    return Path(os.environ.get(DEBIAN_ENV) or DEBIAN_DIR)


def has_files(folder: Path, suffix: str = "") -> bool:
    """Whether `folder` holds all four files (with `suffix`: ".gz" for the gzip'd copies)."""
    return all((folder / f"{name}{suffix}").is_file() for name in FILES)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unpack(source: Path, raw: Path, lock: Path) -> None:
    """gunzip the four `source/*.gz` into `raw/`, once: under `lock`, each through a temporary
    file renamed into place, so a reader (or a killed unpack) never sees half a file."""
    raw.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        for name in FILES:
            target = raw / name
            if target.is_file():  # another trial unpacked it while this one waited
                continue
            fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{name}.", suffix=".part")
            try:
                with gzip.open(source / f"{name}.gz", "rb") as src, os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide a shared cache
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise


def _how(where: Path) -> str:
    return (
        f"put torchvision's FashionMNIST/raw/ there, or install the Debian package "
        f"(apt-get install {DEBIAN_PACKAGE}; read from {debian_dir()}), or set data.download: true"
    )


def _find(where: Path, download: bool) -> None:
    """Make `where/FashionMNIST/raw/` hold the four unpacked files, or raise DatasetNotFound."""
    raw = where / FashionMNIST.__name__ / "raw"
    lock = where / ".fashion_mnist.lock"
    if has_files(raw):
        return
    try:
        for source in (raw, debian_dir()):
            if has_files(source, ".gz"):
                _unpack(source, raw, lock)
                return
        if download:
            # Trials of one search start together: the first downloads, the others wait.
            where.mkdir(parents=True, exist_ok=True)
            with FileLock(str(lock)):
                FashionMNIST(str(where), train=True, download=True)
            return
    except (OSError, EOFError, RuntimeError) as err:  # unreadable gzip, disk full, no network
        raise DatasetNotFound(
            f"fashion_mnist could not be put under {raw} ({one_line(err)}); {_how(where)}"
        ) from err
    raise DatasetNotFound(
        f"fashion_mnist not found under {where} (expected FashionMNIST/raw/); {_how(where)}"
    )


def pixel_stats(x: torch.Tensor) -> tuple[float, float]:
    """Exact mean and std (0..1 scale) of uint8 images, from a 256-bin histogram: no float
    copy of the 47 MB training set."""
    counts = torch.bincount(x.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum()
    mean = (counts * values).sum() / n
    var = (counts * (values - mean) ** 2).sum() / (n - 1)
    return float(mean), float(var.sqrt())


@register_dataset("fashion_mnist")
def fashion_mnist(
    root: str | Path | None = None,
    download: bool = False,
    train_images: Annotated[int, Field(gt=0)] | None = None,
) -> ArrayDataset:
    """60,000 training and 10,000 test images; `train_images` caps the training split (see
    `ArrayDataset.train_images`: taken after the validation split is carved, so a CPU search
    trains on a few thousand images and is still chosen on thousands and tested on 10,000)."""
    where = resolve_root(root)
    _find(where, download)
    try:
        train = FashionMNIST(str(where), train=True, download=False)
        test = FashionMNIST(str(where), train=False, download=False)
    except (RuntimeError, ValueError, AssertionError, OSError) as err:
        folder = where / FashionMNIST.__name__
        raise DatasetNotFound(
            f"fashion_mnist under {folder} is unreadable ({one_line(err)}); delete {folder} "
            f"and {_how(where)}"
        ) from err
    train_x = train.data[:, None].contiguous()  # N×28×28 → N×1×28×28, uint8
    mean, std = pixel_stats(train_x)  # measured on the 60,000 training images, not copied
    return ArrayDataset(
        train_x=train_x,
        train_y=train.targets.to(torch.int64),
        test_x=test.data[:, None].contiguous(),
        test_y=test.targets.to(torch.int64),
        num_classes=NUM_CLASSES,
        mean=(mean,),
        std=(std,),
        crop_padding=CROP_PADDING,
        flip=FLIP,
        train_images=train_images,
    )
