"""Data: datasets register themselves; all are served as device-resident uint8 batches."""

from . import digits  # noqa: F401  (registers)
from .base import (
    ArrayDataset,
    Batch,
    DeviceLoader,
    Loaders,
    Normalize,
    Splits,
    dataset_names,
    load_dataset,
    make_loaders,
    random_crop_flip,
    register_dataset,
    split,
    stratified_split,
)

__all__ = [
    "ArrayDataset",
    "Batch",
    "DeviceLoader",
    "Loaders",
    "Normalize",
    "Splits",
    "dataset_names",
    "load_dataset",
    "make_loaders",
    "random_crop_flip",
    "register_dataset",
    "split",
    "stratified_split",
]
