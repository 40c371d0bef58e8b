"""Data: datasets register themselves; `build_loaders` serves any of them on the device."""

from ..registry import load_package
from .base import (
    DATASETS,
    DEFAULT_ROOT,
    ArrayDataset,
    Batch,
    BatchLoader,
    DeviceLoader,
    Loaders,
    Normalize,
    Splits,
    StreamingDataset,
    build_loaders,
    check_dataset_option,
    dataset_names,
    dataset_options,
    load_dataset,
    make_loaders,
    random_crop_flip,
    register_dataset,
    resolve_root,
    split,
    stratified_split,
    stratified_subset,
)
from .errors import DatasetNotFound
from .imagefolder import StreamingLoader

load_package(__name__, __path__)

__all__ = [
    "DATASETS",
    "DEFAULT_ROOT",
    "ArrayDataset",
    "Batch",
    "BatchLoader",
    "DatasetNotFound",
    "DeviceLoader",
    "Loaders",
    "Normalize",
    "Splits",
    "StreamingDataset",
    "StreamingLoader",
    "build_loaders",
    "check_dataset_option",
    "dataset_names",
    "dataset_options",
    "load_dataset",
    "make_loaders",
    "random_crop_flip",
    "register_dataset",
    "resolve_root",
    "split",
    "stratified_split",
    "stratified_subset",
]
