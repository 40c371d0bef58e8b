"""Datasets as uint8 tensors, split train / val / test, served by batches on the device.

Small datasets (digits, CIFAR) live on the device as uint8 N×C×H×W tensors. Every batch is
augmented there (random crop from a zero-padded image, optional horizontal flip), converted
to float, normalised and made channels_last in a few whole-batch ops: no per-sample Python
in the hot loop. Each batch also carries the sample indices that memory-bank objectives need.

Datasets too big for the device (ImageFolder / ImageNet) return a `StreamingDataset` that
builds its own `Loaders` with the same batch protocol; `build_loaders` hides the difference
from the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..registry import Registry

# Where datasets are looked for (and downloaded to) when the config names no root: a user
# cache, so every search on the machine shares one copy.
DEFAULT_ROOT = "~/.cache/searchkd/data"

# The train / val split depends on the data only, never on the trial's seed, so every trial
# of a search (and every search) is compared on the same validation images.
SPLIT_SEED = 0
EPOCH_STRIDE = 1_000_003  # (seed, epoch) -> one generator seed


def mix_seed(seed: int, k: int, stride: int = EPOCH_STRIDE) -> int:
    """One generator seed from (seed, k), e.g. (a search seed, an epoch): wrapped to 64 bits,
    the most torch's generators take, so any seed a space may hold (below 2**64) works; for
    seeds below 2**64 / stride it is seed * stride + k, unchanged."""
    return (seed * stride + k) % 2**64


def resolve_root(root: str | Path | None) -> Path:
    """The data root as an absolute path: None means DEFAULT_ROOT, `~` is expanded."""
    return Path(root if root is not None else DEFAULT_ROOT).expanduser().absolute()


@dataclass
class ArrayDataset:
    """A dataset as it comes from its source: uint8 images and int64 labels, train and test."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool
    # At most this many training images (None: all): a seeded, class-stratified subset of the
    # training split taken *after* the validation split is carved, so capping what a CPU run
    # trains on leaves the validation split (and the test split) as large as without it.
    train_images: int | None = None


@dataclass
class Splits:
    """train (trained on), val (searched on), test (reported, never searched on)."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool

    @property
    def channels(self) -> int:
        return int(self.train[0].shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train[0].shape[-1])

    def to(self, device: torch.device | str) -> Splits:
        move = lambda xy: (xy[0].to(device), xy[1].to(device))  # noqa: E731
        return Splits(
            move(self.train),
            move(self.val),
            move(self.test),
            self.num_classes,
            self.mean,
            self.std,
            self.crop_padding,
            self.flip,
        )


def stratified_split(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (keep, held_out) with `fraction` of each class held out, deterministic in `seed`.

    The split is the same for every trial of a search (it depends on the data, not the trial),
    so all trials are compared on the same validation samples.
    """
    g = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = int(round(len(idx) * fraction))
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


def stratified_subset(y: Tensor, n: int, seed: int) -> Tensor:
    """Sorted indices of `n` samples with each class in its share of `y` (largest remainders
    get the rounding), deterministic in `seed`; all of them when `n >= len(y)`."""
    if n >= len(y):
        return torch.arange(len(y))
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * n / len(y)
    take = exact.floor().long()
    short = n - int(take.sum())
    take[torch.argsort(exact - take, descending=True, stable=True)[:short]] += 1
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        idx = torch.nonzero(y == c).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.sort(torch.cat(picked)).values


def split(ds: ArrayDataset, val_fraction: float, seed: int = SPLIT_SEED) -> Splits:
    """train / val / test: val is a stratified `val_fraction` of the training images, then
    the rest is capped at `ds.train_images` (stratified, the same seed); test is untouched."""
    keep, held = stratified_split(ds.train_y, val_fraction, seed)
    if ds.train_images is not None:
        keep = keep[stratified_subset(ds.train_y[keep], ds.train_images, seed)]
    return Splits(
        train=(ds.train_x[keep], ds.train_y[keep]),
        val=(ds.train_x[held], ds.train_y[held]),
        test=(ds.test_x, ds.test_y),
        num_classes=ds.num_classes,
        mean=ds.mean,
        std=ds.std,
        crop_padding=ds.crop_padding,
        flip=ds.flip,
    )


def random_crop_flip(x: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Per-sample random crop (from a zero-padded image) and flip, for a whole uint8 batch."""
    b, c, h, w = x.shape
    dev = x.device
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        # Drawn where the batch lives (the generator's device): no host round trip per batch.
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = padded[
            torch.arange(b, device=dev)[:, None, None, None],
            torch.arange(c, device=dev)[None, :, None, None],
            rows,
            cols,
        ]
    if flip:
        mask = torch.rand(b, generator=generator, device=dev) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


class Normalize:
    """uint8 batch → normalised float batch in channels_last."""

    def __init__(
        self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
    ) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0

    def __call__(self, x: Tensor) -> Tensor:
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


Batch = tuple[Tensor, Tensor, Tensor]  # images (float, normalised), labels, sample indices


class DeviceLoader:
    """Batches of a device-resident split; a new permutation per epoch from (seed, epoch).

    Deriving the permutation from the epoch number (rather than carrying generator state)
    makes a resumed trial see exactly the batches it would have seen.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        normalize: Normalize,
        train: bool,
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.normalize = normalize
        self.train = train
        self.crop_padding, self.flip = crop_padding, flip
        self.seed = seed
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    def __len__(self) -> int:
        n = self.num_samples
        return (
            n // self.batch_size
            if self.train and n >= self.batch_size
            else -(-n // self.batch_size)
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        n = self.num_samples
        dev = self.x.device
        if self.train:
            g = torch.Generator(device=dev).manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=g, device=dev)
        else:
            g = None
            order = torch.arange(n, device=dev)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            xb = self.x[idx]
            if self.train and g is not None:
                xb = random_crop_flip(xb, self.crop_padding, self.flip, g)
            yield self.normalize(xb), self.y[idx], idx


class BatchLoader(Protocol):
    """What DeviceLoader and a streaming loader both are, so the engine need not care which.

    Iterating yields `Batch`es on the device; the training order and augmentation are a
    function of (seed, epoch) set through `set_epoch`, so a resumed trial sees the same batches.
    """

    @property
    def num_samples(self) -> int: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[Batch]: ...


@dataclass
class Loaders:
    """What the engine trains and evaluates on; each loader yields `Batch`es on the device.

    `train_labels`: the training split's labels in sample-index order (the indices batches
    carry), known before the first batch; objectives that draw negatives of other classes
    need them from the start.
    """

    train: BatchLoader
    val: BatchLoader
    test: BatchLoader
    num_classes: int
    channels: int
    image_size: int
    train_labels: Tensor | None = None

    @property
    def num_train(self) -> int:
        return self.train.num_samples


def make_loaders(
    splits: Splits, batch_size: int, device: torch.device, seed: int, eval_batch_size: int = 1024
) -> Loaders:
    """Device-resident loaders for a split dataset (augmentation on the training split only)."""
    splits = splits.to(device)
    norm = Normalize(splits.mean, splits.std, device)
    return Loaders(
        train=DeviceLoader(
            *splits.train,
            batch_size,
            norm,
            train=True,
            crop_padding=splits.crop_padding,
            flip=splits.flip,
            seed=seed,
        ),
        val=DeviceLoader(*splits.val, eval_batch_size, norm, train=False),
        test=DeviceLoader(*splits.test, eval_batch_size, norm, train=False),
        num_classes=splits.num_classes,
        channels=splits.channels,
        image_size=splits.image_size,
        train_labels=splits.train[1],
    )


@runtime_checkable
class StreamingDataset(Protocol):
    """A dataset that cannot live on the device and so builds its own (streaming) loaders."""

    def loaders(
        self, batch_size: int, device: torch.device, seed: int, val_fraction: float
    ) -> Loaders: ...


DatasetBuilder = Callable[..., "ArrayDataset | StreamingDataset"]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")
# `builder(root, download, **options) -> ArrayDataset | StreamingDataset`, under its name.
register_dataset = DATASETS.register
dataset_names = DATASETS.names


def dataset_options(name: str) -> set[str]:
    """The `data.options` a dataset takes: its builder's keyword parameters beyond root and
    download (checked when a space is validated, not when a trial first builds the data)."""
    import inspect

    params = inspect.signature(DATASETS.get(name)).parameters
    return {p for p in params if p not in ("root", "download")}


def check_dataset_option(name: str, key: str, value: object) -> object:
    """`value` as dataset `name`'s builder declares option `key` (its type hint, constraints
    included, checked by pydantic); ValueError with one line when it does not fit, so a bad
    value is refused when the space is validated, not when the first trial loads the data."""
    import typing

    from pydantic import TypeAdapter, ValidationError

    hint = typing.get_type_hints(DATASETS.get(name), include_extras=True).get(key)
    if hint is None:
        return value
    try:
        return TypeAdapter(hint).validate_python(value, strict=True)
    except ValidationError as exc:
        errors = exc.errors()
        # A `T | None` hint reports once per member; the non-None member says what is wanted.
        first = next((e for e in errors if e["type"] != "none_required"), errors[0])
        raise ValueError(f"{first['msg']}, got {value!r}") from None


def load_dataset(
    name: str, root: str | Path | None = None, download: bool = False, **options: object
) -> ArrayDataset | StreamingDataset:
    return DATASETS.get(name)(root=root, download=download, **options)


def build_loaders(
    name: str,
    root: str | Path | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    seed: int = 0,
    **options: object,
) -> Loaders:
    """The engine's one entry point: any registered dataset, split and served on `device`.

    `seed` orders and augments the training batches; the train / val split itself uses
    SPLIT_SEED so it is the same for every trial. Raises DatasetNotFound (one line) when the
    data is not on disk and cannot be downloaded.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    device = torch.device(device)
    ds = load_dataset(name, root=root, download=download, **options)
    if isinstance(ds, ArrayDataset):
        return make_loaders(split(ds, val_fraction), batch_size, device, seed)
    if isinstance(ds, StreamingDataset):
        return ds.loaders(batch_size, device, seed, val_fraction)
    raise TypeError(f"dataset {name!r} built a {type(ds).__name__}, not a dataset")
