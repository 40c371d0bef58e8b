"""What the benchmarks share: the pairs, random teachers, engine specs, CIFAR-format files.

Throughput does not depend on what the weights are, so every teacher here is a freshly
initialised network saved to a temporary file (the engine only accepts a checkpoint), and
every image is synthetic: nothing is downloaded and every benchmark runs offline.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import pickle
import platform
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from searchkd.models import build_model
from searchkd.spec import Spec


@dataclass(frozen=True)
class Pair:
    """A teacher → student pair of the CRD benchmark table and the objective it is run with."""

    objective: str
    teacher: str
    student: str

    @property
    def label(self) -> str:
        return f"{self.teacher} -> {self.student}"


# The two pairs issue 6 names: the largest teacher/student gap of the table (6× params) under
# the multi-scale objective, and the WRN pair under CRD with its 16384-negative memory bank.
PAIRS: dict[str, Pair] = {
    "msd": Pair("msd", "resnet32x4", "resnet8x4"),
    "crd": Pair("crd", "wrn_40_2", "wrn_16_2"),
}

# CIFAR-100: the dataset of the published table, so the classifier heads have their real size.
NUM_CLASSES = 100
# CIFAR-100's training set. Its size is part of the cost: CRD's memory banks hold one row per
# training image and it draws 16384 negatives from them (clamped to N − 1 on smaller sets),
# and the device-resident loader gathers every batch from the whole set.
TRAIN_SIZE = 50_000
# The CIFAR-100 KD recipe of the CRD paper (Tian et al., 2020) and its successors: batch 64, SGD
# lr 0.05, momentum 0.9, wd 5e-4.
BATCH_SIZE = 64
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5.0e-4
IMAGE_SIZE = 32  # CIFAR


def parse_pairs(text: str) -> list[Pair]:
    """`msd,crd` → the pairs; an unknown name is a one-line error naming the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PAIRS]
    if unknown or not names:
        raise SystemExit(
            f"unknown pair {unknown[0] if unknown else text!r}; known: {', '.join(PAIRS)}"
        )
    return [PAIRS[n] for n in names]


def pick_device(requested: str | None) -> torch.device:
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    """What the figure was measured on, in words: GPU model, or CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model}, {os.cpu_count()} cores"


def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions, command and date: RESULTS.md gives every figure with these."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),  # of the process that measured (CPU runs)
        "command": shlex.join(["python", *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # Other work on the machine skews CPU figures; the 1-minute load average says how much.
        "load_average_1m": os.getloadavg()[0],
    }


def write_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def finish(payload: dict[str, Any], path: str | Path | None) -> int:
    """The closing line every benchmark prints, and its JSON record."""
    print(f"device: {payload['device']}; torch {payload['torch']}; {payload['date']}")
    write_json(path, payload)
    return 0


def random_teacher(arch: str, num_classes: int, folder: Path) -> Path:
    """A freshly initialised teacher saved as a plain state_dict (throughput ignores weights)."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=num_classes, image_size=IMAGE_SIZE)
    path = folder / f"{arch}-random.pt"
    torch.save(model.state_dict(), path)
    return path


def synthetic_data(train_images: int, num_classes: int) -> dict[str, Any]:
    """A `data:` section whose training split holds at least `train_images` images.

    The synthetic set has the same number of images per class and the stratified split holds
    out round(n_c · val_fraction) per class; k + 1 per class with val_fraction = 1/(k+1) leaves
    exactly k per class for training and one for validation (the engine needs a val batch).
    """
    per_class = max(1, math.ceil(train_images / num_classes))
    return {
        "dataset": "synthetic",
        "val_fraction": 1.0 / (per_class + 1),
        "options": {
            "train_size": (per_class + 1) * num_classes,
            "test_size": num_classes,
            "num_classes": num_classes,
            "image_size": IMAGE_SIZE,
        },
    }


class FirstSteps:
    """The first `steps` batches of each epoch of a loader (the engine's BatchLoader protocol).

    It lets the benchmarks time a given number of the engine's own training steps over a
    full-size training set: the objective still sees every training image (memory banks
    sized to N), only the epoch is cut short.
    """

    def __init__(self, loader: Any, steps: int) -> None:
        self.loader, self.steps = loader, steps

    @property
    def num_samples(self) -> int:
        return int(self.loader.num_samples)

    def __len__(self) -> int:
        return min(self.steps, len(self.loader))

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), len(self))


class OpCounter(TorchDispatchMode):
    """Counts the aten operators a block of code dispatches (backward included).

    At small batches a GPU step is bound by the host launching kernels one by one, so the
    operator count per step, times a few microseconds each, bounds the throughput of a loop
    in eager mode; the benchmarks report it beside each figure. It counts eager operators:
    torch.compile steps aside while a dispatch mode is active.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def train_steps(engine: Any, steps: int) -> dict[str, Any]:
    """`steps` steps of the engine's own train_epoch, as one (short) epoch.

    Called once with a few steps to warm up (cudnn autotuning, torch.compile, the allocator's
    first growth), then with the measured steps: the figure is what train_epoch itself
    reports (it synchronises the device before reading the clock and reads the losses once).
    """
    full = engine.loaders.train
    try:
        engine.loaders.train = FirstSteps(full, steps)
        row = engine.train_epoch()
        done = len(engine.loaders.train)
    finally:
        engine.loaders.train = full
    return {
        "img_s": row["images_per_second"],
        "steps": done,
        "seconds": row["epoch_seconds"],
        "loss": row["train_loss"],
    }


def engine_space(
    pair: Pair,
    teacher_checkpoint: Path,
    data: dict[str, Any],
    batch_size: int,
    epochs: int = 10_000,
    compile: bool = False,
    name: str = "bench",
) -> dict[str, Any]:
    """The space of one pair, as a space file holds it: the literature's recipe, default loss
    weights, nothing searched. The benchmarks time short "epochs" of a few steps each
    (`train_steps`), many per engine: the epoch count is far beyond what they take, since a
    finished engine trains no more."""
    return {
        "name": name,
        "objective": pair.objective,
        "data": data,
        "teacher": {"arch": pair.teacher, "checkpoint": str(teacher_checkpoint)},
        "student": {"arch": pair.student},
        "train": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": LR,
            "momentum": MOMENTUM,
            "weight_decay": WEIGHT_DECAY,
            "precision": "bf16",
            "compile": compile,
        },
    }


def engine_spec(*args: Any, **kwargs: Any) -> Spec:
    """`engine_space`, validated: what the benchmarks build an Engine from."""
    return Spec.model_validate(engine_space(*args, **kwargs))


# ------------------------------------------------------------------ CIFAR python format


def _dump(path: Path, obj: dict[str, Any]) -> None:
    # Protocol 2 with str keys: what torchvision's pickle.load(f, encoding="latin1") makes of
    # the real files' Python 2 strings.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(n: int, seed: int) -> np.ndarray:
    """n CIFAR rows (3072 uint8: 1024 R, 1024 G, 1024 B): what the real files hold."""
    return np.random.default_rng(seed).integers(
        0, 256, (n, 3 * IMAGE_SIZE * IMAGE_SIZE), dtype=np.uint8
    )


def _labels(n: int, num_classes: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes).tolist()


@dataclass
class CifarFiles:
    """CIFAR files written to `root`, with the md5s torchvision must be told to expect."""

    root: Path
    cls: type
    registered: dict[str, Any]

    @contextlib.contextmanager
    def accepted(self) -> Iterator[None]:
        """torchvision checks each file's md5 against the real archive's; for these files
        register their own md5s for as long as the benchmark opens them, then restore."""
        saved = {k: getattr(self.cls, k) for k in self.registered}
        for k, v in self.registered.items():
            setattr(self.cls, k, v)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(self.cls, k, v)


def write_cifar(root: Path, num_train: int, num_classes: int, num_test: int = 100) -> CifarFiles:
    """Synthetic images in the real on-disk format: CIFAR-100 (`cifar-100-python/`) for 100
    classes, CIFAR-10 (`cifar-10-batches-py/`) for 10, so the reference loop reads them with
    torchvision's own dataset class exactly as the classic KD codebases do."""
    from torchvision.datasets import CIFAR10, CIFAR100

    if num_classes == 100:
        folder = root / CIFAR100.base_folder
        folder.mkdir(parents=True, exist_ok=True)
        for split, n, seed in (("train", num_train, 1), ("test", num_test, 2)):
            y = _labels(n, num_classes, seed)
            _dump(
                folder / split,
                {
                    "filenames": [f"{split}_{i}.png" for i in range(n)],
                    "batch_label": f"{split} batch",
                    "fine_labels": y,
                    "coarse_labels": [v // 5 for v in y],
                    "data": _images(n, seed),
                },
            )
        _dump(
            folder / "meta",
            {
                "fine_label_names": [f"fine_{i}" for i in range(100)],
                "coarse_label_names": [f"coarse_{i}" for i in range(20)],
            },
        )
        return CifarFiles(
            root,
            CIFAR100,
            {
                "train_list": [["train", _md5(folder / "train")]],
                "test_list": [["test", _md5(folder / "test")]],
                "meta": {**CIFAR100.meta, "md5": _md5(folder / "meta")},
            },
        )
    if num_classes == 10:
        folder = root / CIFAR10.base_folder
        folder.mkdir(parents=True, exist_ok=True)
        per_batch = math.ceil(num_train / 5)  # the real training set comes as 5 batch files
        batches = [f"data_batch_{b}" for b in range(1, 6)]
        for b, name in enumerate(batches):
            n = min(per_batch, max(0, num_train - b * per_batch))
            _dump(
                folder / name,
                {
                    "batch_label": name,
                    "labels": _labels(n, 10, 10 + b),
                    "data": _images(n, 10 + b),
                    "filenames": [f"{name}_{i}" for i in range(n)],
                },
            )
        _dump(
            folder / "test_batch",
            {
                "batch_label": "test",
                "labels": _labels(num_test, 10, 3),
                "data": _images(num_test, 3),
                "filenames": [f"t_{i}" for i in range(num_test)],
            },
        )
        _dump(
            folder / "batches.meta",
            {
                "num_cases_per_batch": per_batch,
                "num_vis": 3072,
                "label_names": [f"class_{i}" for i in range(10)],
            },
        )
        return CifarFiles(
            root,
            CIFAR10,
            {
                "train_list": [[f, _md5(folder / f)] for f in batches],
                "test_list": [["test_batch", _md5(folder / "test_batch")]],
                "meta": {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")},
            },
        )
    raise SystemExit(
        f"--num-classes must be 100 (CIFAR-100 files) or 10 (CIFAR-10), got {num_classes}"
    )
