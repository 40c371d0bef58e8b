"""Random images in CIFAR's shape, for benchmarks and smoke tests that must not touch disk.

Each class has its own mean colour and every pixel adds Gaussian noise, so a model can learn
the labels (a smoke test sees accuracy rise) while the cost per batch is exactly that of a
real dataset of the same shape. Everything is a function of `seed`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import ArrayDataset, mix_seed, register_dataset

# Class colours are drawn in the middle of the 0..255 range so that colour plus noise is
# rarely clipped; noise of std 64 hides the colour in any one pixel, not in the image mean.
COLOUR_LOW, COLOUR_HIGH = 64.0, 192.0
NOISE_STD = 64.0
CHUNK = 4096  # images generated at once: bounds the float32 scratch memory to ~50 MB at 32×32
STATS_SAMPLES = 10_000  # images the mean / std are measured on: plenty for 3 significant digits


def _images(
    labels: torch.Tensor, colours: torch.Tensor, image_size: int, g: torch.Generator
) -> torch.Tensor:
    """uint8 images of class colour plus noise, made in chunks to keep memory flat."""
    channels = colours.shape[1]
    out = torch.empty(len(labels), channels, image_size, image_size, dtype=torch.uint8)
    for start in range(0, len(labels), CHUNK):
        y = labels[start : start + CHUNK]
        noise = torch.randn(len(y), channels, image_size, image_size, generator=g) * NOISE_STD
        out[start : start + CHUNK] = (colours[y][:, :, None, None] + noise).round_().clamp_(0, 255)
    return out


def _labels(n: int, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """Balanced labels in random order, so the stratified val split has every class."""
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]


@register_dataset("synthetic")
def synthetic(
    root: str | Path | None = None,
    download: bool = False,
    num_classes: int = 10,
    train_size: int = 50_000,
    test_size: int = 10_000,
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> ArrayDataset:
    """`root` and `download` are accepted (the registry passes them) and ignored."""
    if num_classes < 1 or train_size < 1 or test_size < 1 or image_size < 1 or channels < 1:
        raise ValueError(
            "synthetic: num_classes, train_size, test_size, image_size and "
            "channels must all be positive"
        )
    # Three independent streams, so changing train_size leaves the colours and test set alone.
    g_colours, g_train, g_test = (
        torch.Generator().manual_seed(mix_seed(seed, k, 3)) for k in range(3)
    )
    colours = COLOUR_LOW + (COLOUR_HIGH - COLOUR_LOW) * torch.rand(
        num_classes, channels, generator=g_colours
    )
    train_y = _labels(train_size, num_classes, g_train)
    train_x = _images(train_y, colours, image_size, g_train)
    test_y = _labels(test_size, num_classes, g_test)
    test_x = _images(test_y, colours, image_size, g_test)
    sample = train_x[:STATS_SAMPLES].float() / 255.0
    mean = tuple(float(v) for v in sample.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in sample.std(dim=(0, 2, 3)))
    return ArrayDataset(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=num_classes,
        mean=mean,
        std=std,
        crop_padding=image_size // 8,  # CIFAR's 4 px of 32, so augmentation costs the same
        flip=True,
    )
