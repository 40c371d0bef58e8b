"""Image folders in the ImageNet layout, decoded by DataLoader workers and streamed per batch.

    root/train/<class>/*.jpg|png|...   trained on; val is carved from it (stratified)
    root/val/<class>/*.jpg|png|...     the test split (ImageNet's official val set)

Such datasets do not fit on the device, so workers decode and augment each image
(RandomResizedCrop + flip for training, Resize + CenterCrop for evaluation) into a uint8
tensor — a quarter of the bytes of float — and the main process moves the batch to the
device, where it is normalised and made channels_last exactly as DeviceLoader does.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from .base import (
    SPLIT_SEED,
    Batch,
    Loaders,
    Normalize,
    mix_seed,
    register_dataset,
    resolve_root,
    stratified_split,
)
from .errors import DatasetNotFound, one_line

# torchvision's ImageNet statistics (per channel, 0..1 scale), used by every ImageNet recipe
# and pretrained model, so teachers trained elsewhere see the inputs they expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224  # the standard ImageNet training / evaluation resolution
RESIZE_RATIO = 256 / 224  # evaluation: short side to 256, then the central 224 (ratio 0.875)
MAX_DEFAULT_WORKERS = 8  # beyond ~8 decoders per GPU, JPEG decoding stops being the bottleneck
# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so (key, index) is
# hashed to 4 bytes rather than packed into one large integer (which would lose the key).
SAMPLE_SEED_BYTES = 4

Item = tuple[int, "int | None"]  # (sample index, augmentation key; None means no augmentation)


def default_workers() -> int:
    """min(8, CPUs this process may use): affinity, not cpu_count, so containers are honoured."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        cpus = os.cpu_count() or 1
    return min(MAX_DEFAULT_WORKERS, cpus)


def _sample_seed(key: int, index: int) -> int:
    """A 32-bit seed for one sample's augmentation, well spread over (key, index)."""
    digest = hashlib.blake2b(f"{key}:{index}".encode(), digest_size=SAMPLE_SEED_BYTES).digest()
    return int.from_bytes(digest, "little")


class _Images(Dataset):
    """One split's (path, label) list; item (index, key) → (uint8 C×H×W, label, index).

    With a key, the random crop and flip come from torch's RNG seeded by (key, index) inside
    a forked RNG state, so a sample's augmentation depends on (seed, epoch, index) only: not
    on which worker decodes it, how many workers there are, or the caller's RNG.
    """

    def __init__(
        self, samples: list[tuple[str, int]], loader: Callable[[str], Any], transform: Callable
    ) -> None:
        self.samples, self.loader, self.transform = samples, loader, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: Item) -> tuple[Tensor, int, int]:
        index, key = item
        path, label = self.samples[index]
        image = self.loader(path)
        if key is None:
            return self.transform(image), label, index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(key, index))
            return self.transform(image), label, index


class _EpochSampler(Sampler[Item]):
    """(index, key) items: for training a permutation and augmentation key from (seed, epoch)."""

    def __init__(self, n: int, shuffle: bool, seed: int) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Item]:
        if not self.shuffle:
            return ((i, None) for i in range(self.n))
        key = mix_seed(self.seed, self.epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(key)).tolist()
        return ((i, key) for i in order)


class StreamingLoader:
    """DeviceLoader's protocol over a worker-decoded dataset: batches on the device.

    Workers are not persistent: the three loaders of a trial take turns, so idle decoders
    would only hold memory, and respawning them is negligible next to an ImageNet epoch.
    """

    def __init__(
        self,
        dataset: _Images,
        batch_size: int,
        normalize: Normalize,
        device: torch.device,
        train: bool,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        self.normalize, self.device, self.train = normalize, device, train
        self.sampler = _EpochSampler(len(dataset), shuffle=train, seed=seed)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            drop_last=train and len(dataset) >= batch_size,  # DeviceLoader's rule
            # its own generator: DataLoader draws worker seeds from it each epoch, which would
            # otherwise advance the caller's global RNG (augmentation does not use them).
            generator=torch.Generator().manual_seed(seed),
        )

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        dev = self.device
        for x, y, idx in self.loader:
            yield (
                self.normalize(x.to(dev, non_blocking=True)),
                y.to(dev, non_blocking=True),
                idx.to(dev, non_blocking=True),
            )


@dataclass
class ImageFolderData:
    """The scanned folders; `loaders` splits val from train and builds streaming loaders."""

    train_samples: list[tuple[str, int]]
    test_samples: list[tuple[str, int]]
    classes: list[str]
    loader: Callable[[str], Any]
    image_size: int
    resize_size: int
    num_workers: int

    def loaders(
        self, batch_size: int, device: torch.device, seed: int, val_fraction: float
    ) -> Loaders:
        labels = torch.tensor([label for _, label in self.train_samples], dtype=torch.int64)
        keep, held = stratified_split(labels, val_fraction, SPLIT_SEED)
        train_tf = T.Compose(
            [
                T.RandomResizedCrop(self.image_size),
                T.RandomHorizontalFlip(),
                T.PILToTensor(),
            ]
        )
        eval_tf = T.Compose(
            [
                T.Resize(self.resize_size),
                T.CenterCrop(self.image_size),
                T.PILToTensor(),
            ]
        )
        norm = Normalize(IMAGENET_MEAN, IMAGENET_STD, device)

        def make(samples: list[tuple[str, int]], train: bool) -> StreamingLoader:
            ds = _Images(samples, self.loader, train_tf if train else eval_tf)
            return StreamingLoader(
                ds, batch_size, norm, device, train=train, seed=seed, num_workers=self.num_workers
            )

        return Loaders(
            train=make([self.train_samples[i] for i in keep.tolist()], train=True),
            val=make([self.train_samples[i] for i in held.tolist()], train=False),
            test=make(self.test_samples, train=False),
            num_classes=len(self.classes),
            channels=3,
            image_size=self.image_size,
            train_labels=labels[keep],
        )


LAYOUT = (
    "expected the ImageNet layout <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg, "
    "and imagefolder cannot be downloaded"
)


@register_dataset("imagefolder")
def imagefolder(
    root: str | Path | None = None,
    download: bool = False,
    image_size: int = IMAGE_SIZE,
    resize_size: int | None = None,
    num_workers: int | None = None,
) -> ImageFolderData:
    """Scan root/train and root/val; `download` is accepted and ignored (nothing to fetch)."""
    where = resolve_root(root)
    train_dir, val_dir = where / "train", where / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DatasetNotFound(f"imagefolder: {d} not found; {LAYOUT}")
    try:
        train = ImageFolder(str(train_dir))
    except FileNotFoundError as err:  # no class folders, or a class folder with no images
        raise DatasetNotFound(f"imagefolder: bad {train_dir} ({one_line(err)}); {LAYOUT}") from err
    try:
        val = ImageFolder(str(val_dir), allow_empty=True)
    except FileNotFoundError as err:  # typically ImageNet's flat val/ of 50,000 JPEGs
        raise DatasetNotFound(
            f"imagefolder: {val_dir} has no class folders ({one_line(err)}); sort its images "
            f"into one folder per class, named as in {train_dir}"
        ) from err
    unknown = sorted(set(val.classes) - set(train.classes))
    if unknown:
        raise DatasetNotFound(
            f"imagefolder: {val_dir} has classes that {train_dir} lacks: {', '.join(unknown[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        )
    if not val.samples:
        raise DatasetNotFound(f"imagefolder: no images under {val_dir}; {LAYOUT}")
    # Label val images by class *name*, so a val/ with fewer class folders is still right.
    test_samples = [(p, train.class_to_idx[val.classes[t]]) for p, t in val.samples]
    return ImageFolderData(
        train_samples=list(train.samples),
        test_samples=test_samples,
        classes=list(train.classes),
        loader=train.loader,
        image_size=image_size,
        resize_size=resize_size if resize_size is not None else round(image_size * RESIZE_RATIO),
        num_workers=default_workers() if num_workers is None else num_workers,
    )
