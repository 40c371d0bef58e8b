"""Data layer: real on-disk formats written small in tmp_path, no network, a few seconds.

CIFAR fixtures are the genuine python-pickle layout torchvision reads. torchvision checks
each file's md5 against the real archive's; rather than weaken that check in production
code (it is what catches a truncated download), the fixture registers the md5s of the files
it wrote on torchvision's classes, for the test only, so the real check still runs.
"""

from __future__ import annotations

import hashlib
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

from searchkd.data import (
    ArrayDataset,
    DatasetNotFound,
    DeviceLoader,
    Normalize,
    StreamingLoader,
    build_loaders,
    load_dataset,
    random_crop_flip,
    split,
)
from searchkd.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

CPU = torch.device("cpu")


# ---------------------------------------------------------------- CIFAR fixtures


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(n: int, mean: tuple[float, ...], std: tuple[float, ...], seed: int) -> np.ndarray:
    """N×3×32×32 uint8 with CIFAR's per-channel statistics, so normalising gives ~N(0, 1)."""
    rng = np.random.default_rng(seed)
    m = np.array(mean)[None, :, None, None] * 255
    s = np.array(std)[None, :, None, None] * 255
    return np.clip(np.round(m + s * rng.standard_normal((n, 3, 32, 32))), 0, 255).astype(np.uint8)


def _balanced(n: int, classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % classes).astype(np.int64)


def _dump(path: Path, obj: dict) -> None:
    # Protocol 2 and str keys: what torchvision's pickle.load(f, encoding="latin1") makes of
    # the real files' Python 2 strings (with encoding="bytes" they read as b"data", b"labels").
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(
    root: Path, monkeypatch: pytest.MonkeyPatch, per_batch: int = 20, n_test: int = 100
) -> dict[str, np.ndarray]:
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, md5s registered."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x = _images(5 * per_batch, CIFAR10_MEAN, CIFAR10_STD, seed=1)
    train_y = _balanced(5 * per_batch, 10, seed=2)
    test_x = _images(n_test, CIFAR10_MEAN, CIFAR10_STD, seed=3)
    test_y = _balanced(n_test, 10, seed=4)
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        _dump(
            folder / f"data_batch_{b + 1}",
            {
                "batch_label": f"training batch {b + 1} of 5",
                "labels": train_y[sl].tolist(),
                "data": train_x[sl].reshape(per_batch, 3072),  # rows: 1024 R, 1024 G, 1024 B
                "filenames": [f"img_{i}.png" for i in range(sl.start, sl.stop)],
            },
        )
    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_y.tolist(),
            "data": test_x.reshape(n_test, 3072),
            "filenames": [f"t_{i}.png" for i in range(n_test)],
        },
    )
    _dump(
        folder / "batches.meta",
        {
            "num_cases_per_batch": per_batch,
            "num_vis": 3072,
            "label_names": [
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ],
        },
    )
    batches = [f"data_batch_{b}" for b in range(1, 6)]
    monkeypatch.setattr(CIFAR10, "train_list", [[f, _md5(folder / f)] for f in batches])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def write_cifar100(
    root: Path, monkeypatch: pytest.MonkeyPatch, n_train: int = 500, n_test: int = 100
) -> dict[str, np.ndarray]:
    """cifar-100-python/{train, test, meta}, md5s registered."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    data = {
        "train_x": _images(n_train, CIFAR100_MEAN, CIFAR100_STD, seed=5),
        "train_y": _balanced(n_train, 100, seed=6),
        "test_x": _images(n_test, CIFAR100_MEAN, CIFAR100_STD, seed=7),
        "test_y": _balanced(n_test, 100, seed=8),
    }
    for name in ("train", "test"):
        x, y = data[f"{name}_x"], data[f"{name}_y"]
        _dump(
            folder / name,
            {
                "filenames": [f"{name}_{i}.png" for i in range(len(y))],
                "batch_label": f"{name}ing batch 1 of 1",
                "fine_labels": y.tolist(),
                "coarse_labels": (y // 5).tolist(),
                "data": x.reshape(len(y), 3072),
            },
        )
    _dump(
        folder / "meta",
        {
            "fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)],
        },
    )
    monkeypatch.setattr(CIFAR100, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": _md5(folder / "meta")})
    return data


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in x.reshape(len(x), -1).numpy()}


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize(
    "name, writer, classes",
    [
        ("cifar10", write_cifar10, 10),
        ("cifar100", write_cifar100, 100),
    ],
)
def test_cifar_round_trips_images_and_labels(tmp_path, monkeypatch, name, writer, classes):
    want = writer(tmp_path, monkeypatch)
    ds = load_dataset(name, root=tmp_path)
    assert isinstance(ds, ArrayDataset)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_x.shape == (len(want["train_y"]), 3, 32, 32)
    assert ds.test_x.shape == (len(want["test_y"]), 3, 32, 32)
    assert torch.equal(ds.train_x, torch.from_numpy(want["train_x"]))  # pixel-exact, C×H×W
    assert torch.equal(ds.test_x, torch.from_numpy(want["test_x"]))
    assert torch.equal(ds.train_y, torch.from_numpy(want["train_y"]))
    assert torch.equal(ds.test_y, torch.from_numpy(want["test_y"]))
    assert ds.num_classes == classes
    assert ds.crop_padding == 4 and ds.flip
    assert len(ds.mean) == len(ds.std) == 3


def test_cifar_root_expands_home_and_defaults_to_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_cifar10(tmp_path / ".cache" / "searchkd" / "data", monkeypatch)
    assert load_dataset("cifar10").train_x.shape[0] == 100  # root=None → ~/.cache/searchkd/data
    assert load_dataset("cifar10", root="~/.cache/searchkd/data").test_x.shape[0] == 100


@pytest.mark.parametrize(
    "name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_missing_cifar_is_one_line_naming_the_place(tmp_path, name, folder):
    with pytest.raises(DatasetNotFound) as e:
        build_loaders(name, root=tmp_path / "nowhere", download=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "nowhere") in msg and folder in msg and "download" in msg


def test_corrupted_cifar_says_so(tmp_path, monkeypatch):
    write_cifar100(tmp_path, monkeypatch)
    with open(tmp_path / "cifar-100-python" / "train", "ab") as f:
        f.write(b"x")  # md5 no longer matches
    with pytest.raises(DatasetNotFound, match="corrupted") as e:
        load_dataset("cifar100", root=tmp_path)
    assert str(tmp_path / "cifar-100-python") in str(e.value) and "\n" not in str(e.value)


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFound, match="could not be downloaded") as e:
        load_dataset("cifar10", root=tmp_path / "empty", download=True)
    assert str(tmp_path / "empty") in str(e.value) and "\n" not in str(e.value)
    write_cifar10(tmp_path / "full", monkeypatch)  # a valid copy is used, not re-downloaded
    assert load_dataset("cifar10", root=tmp_path / "full", download=True).train_x.shape[0] == 100


def test_cifar_split_sizes_and_disjointness(tmp_path, monkeypatch):
    write_cifar100(tmp_path, monkeypatch)  # 5 train images per class
    ds = load_dataset("cifar100", root=tmp_path)
    assert isinstance(ds, ArrayDataset)
    s = split(ds, 0.2)
    assert len(s.train[1]) == 400 and len(s.val[1]) == 100 and len(s.test[1]) == 100
    assert torch.equal(torch.bincount(s.val[1], minlength=100), torch.ones(100, dtype=torch.int64))
    train_rows, val_rows = _rows(s.train[0]), _rows(s.val[0])
    assert not train_rows & val_rows
    assert train_rows | val_rows == _rows(ds.train_x)
    # the same split for every trial: it does not depend on the trial's seed
    a = build_loaders("cifar100", root=tmp_path, val_fraction=0.2, batch_size=32, seed=1)
    b = build_loaders("cifar100", root=tmp_path, val_fraction=0.2, batch_size=32, seed=2)
    val_a, val_b = a.val, b.val
    assert isinstance(val_a, DeviceLoader) and isinstance(val_b, DeviceLoader)
    assert torch.equal(val_a.y, val_b.y) and torch.equal(val_a.x, val_b.x)
    assert (a.train.num_samples, a.val.num_samples, a.test.num_samples) == (400, 100, 100)
    assert (a.num_classes, a.channels, a.image_size, a.num_train) == (100, 3, 32, 400)


def test_cifar_loaders_normalise_augment_and_are_deterministic(tmp_path, monkeypatch):
    want = write_cifar10(tmp_path, monkeypatch)
    L = build_loaders(
        "cifar10", root=tmp_path, val_fraction=0.1, batch_size=16, device="cpu", seed=3
    )
    xs, ys, idxs = zip(*L.test, strict=True)  # evaluation: in order, unaugmented
    x = torch.cat(xs)
    assert torch.equal(torch.cat(ys), torch.from_numpy(want["test_y"]))
    assert torch.equal(torch.cat(idxs), torch.arange(100))
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.05  # the standard statistics, per channel
    assert ((x.std(dim=(0, 2, 3)) - 1).abs() < 0.1).all()

    assert len(L.train) == 90 // 16  # the last partial training batch is dropped
    L.train.set_epoch(0)
    first = list(L.train)
    again = list(L.train)
    L.train.set_epoch(1)
    other = list(L.train)
    for (xa, ya, ia), (xb, yb, ib) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
        assert xa.shape == (16, 3, 32, 32) and xa.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(ya, L.train.y[ia])  # type: ignore[attr-defined]
    assert not torch.equal(first[0][2], other[0][2])  # another permutation next epoch
    # augmentation moves pixels: the training view differs from the plain normalised image
    x0, _, i0 = first[0]
    plain = L.train.normalize(L.train.x[i0])  # type: ignore[attr-defined]
    assert not torch.equal(x0, plain)


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_shaped():
    opts = dict(num_classes=5, train_size=200, test_size=50, image_size=16, channels=3)
    a = load_dataset("synthetic", seed=7, **opts)
    b = load_dataset("synthetic", seed=7, **opts)
    c = load_dataset("synthetic", seed=8, **opts)
    assert all(isinstance(d, ArrayDataset) for d in (a, b, c))
    assert a.train_x.shape == (200, 3, 16, 16) and a.train_x.dtype == torch.uint8
    assert a.test_x.shape == (50, 3, 16, 16) and a.train_y.dtype == torch.int64
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert torch.equal(torch.bincount(a.train_y), torch.full((5,), 40))
    d = load_dataset("synthetic", seed=7, **{**opts, "train_size": 100})
    assert isinstance(d, ArrayDataset) and torch.equal(d.test_x, a.test_x)  # test set is stable
    assert a.crop_padding == 2 and a.flip


def test_synthetic_is_learnable_and_normalises_to_zero_mean():
    L = build_loaders(
        "synthetic",
        val_fraction=0.1,
        batch_size=64,
        seed=0,
        num_classes=10,
        train_size=1000,
        test_size=200,
    )
    feats, labels = zip(*((x.mean(dim=(2, 3)), y) for x, y, _ in L.val), strict=True)
    f, y = torch.cat(feats), torch.cat(labels)
    centroids = torch.stack([f[y == c].mean(0) for c in range(10)])
    hits = total = 0
    for x, yt, _ in L.test:  # nearest class centroid of the mean colour
        pred = torch.cdist(x.mean(dim=(2, 3)), centroids).argmin(1)
        hits += int((pred == yt).sum())
        total += len(yt)
    assert hits / total > 0.9
    x = torch.cat([b[0] for b in L.val])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.1


# ---------------------------------------------------------------- imagefolder

CLASSES = {"cat": (200, 40, 40), "dog": (40, 200, 40), "eel": (40, 40, 200)}
SIZES = [(40, 30), (30, 44), (36, 36)]  # (width, height): crops and resizes really happen


def write_imagefolder(
    root: Path,
    train_per_class: int = 6,
    val_per_class: int = 2,
    val_classes: tuple[str, ...] = tuple(CLASSES),
) -> None:
    """root/train/<class>/*.png and root/val/<class>/*.png: class colour plus noise."""
    rng = np.random.default_rng(0)
    for split_name, per, classes in (
        ("train", train_per_class, tuple(CLASSES)),
        ("val", val_per_class, val_classes),
    ):
        for cls in classes:
            d = root / split_name / cls
            d.mkdir(parents=True)
            for i in range(per):
                w, h = SIZES[i % len(SIZES)]
                noise = rng.integers(-30, 31, (h, w, 3))
                img = np.clip(np.array(CLASSES[cls]) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{cls}_{i}.png")


def _colours(x: torch.Tensor) -> torch.Tensor:
    """Mean RGB (0..255) of normalised images: undoes ImageNet normalisation."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).mean(dim=(2, 3))


def test_imagefolder_splits_labels_and_shapes(tmp_path):
    write_imagefolder(tmp_path)
    L = build_loaders(
        "imagefolder",
        root=tmp_path,
        val_fraction=1 / 3,
        batch_size=4,
        device=CPU,
        seed=0,
        image_size=16,
        num_workers=0,
    )
    assert (L.num_classes, L.channels, L.image_size) == (3, 3, 16)
    assert (L.train.num_samples, L.val.num_samples, L.test.num_samples) == (12, 6, 6)
    assert len(L.train) == 3 and len(L.test) == 2  # train drops partial batches, eval keeps them
    colours = torch.tensor(list(CLASSES.values()), dtype=torch.float32)
    for loader in (L.train, L.val, L.test):
        for x, y, idx in loader:
            assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32
            assert x.is_contiguous(memory_format=torch.channels_last)
            assert y.dtype == torch.int64 and idx.dtype == torch.int64
            # labels round-trip: each image's mean colour is its class's colour
            assert torch.equal(torch.cdist(_colours(x), colours).argmin(1), y)
    ys = torch.cat([y for _, y, _ in L.test])
    assert torch.equal(ys, torch.tensor([0, 0, 1, 1, 2, 2]))  # val/ in order
    assert sorted(torch.cat([i for _, _, i in L.val]).tolist()) == list(range(6))
    val_y = torch.cat([y for _, y, _ in L.val])
    assert torch.equal(torch.bincount(val_y), torch.tensor([2, 2, 2]))  # stratified
    # val and train are disjoint and together make train/
    loaders = (L.train, L.val)
    assert all(isinstance(ld, StreamingLoader) for ld in loaders)
    paths = [{p for p, _ in ld.loader.dataset.samples} for ld in loaders]  # type: ignore
    assert not paths[0] & paths[1] and len(paths[0] | paths[1]) == 18


def test_imagefolder_augmentation_is_deterministic_per_seed_and_epoch(tmp_path):
    write_imagefolder(tmp_path)

    def epoch_batches(seed: int, epoch: int, workers: int) -> list[tuple[torch.Tensor, ...]]:
        L = build_loaders(
            "imagefolder",
            root=tmp_path,
            val_fraction=0.0,
            batch_size=6,
            seed=seed,
            image_size=16,
            num_workers=workers,
        )
        L.train.set_epoch(epoch)
        return list(L.train)

    a = epoch_batches(0, 0, workers=0)
    assert len(a) == 3 and all(x.shape == (6, 3, 16, 16) for x, _, _ in a)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, epoch_batches(0, 0, workers=2), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    b = epoch_batches(0, 1, workers=0)
    assert not torch.equal(a[0][2], b[0][2])
    # the same sample at another epoch gets another crop
    xa = torch.cat([x for x, _, _ in a])[torch.cat([i for _, _, i in a]).argsort()]
    xb = torch.cat([x for x, _, _ in b])[torch.cat([i for _, _, i in b]).argsort()]
    assert not torch.equal(xa, xb)
    # ...and the caller's RNG is left alone
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    epoch_batches(5, 0, workers=0)
    assert torch.equal(torch.rand(3), expected)


def test_imagefolder_eval_is_resize_and_centre_crop(tmp_path):
    write_imagefolder(tmp_path)
    L = build_loaders(
        "imagefolder", root=tmp_path, val_fraction=0.0, batch_size=8, image_size=16, num_workers=0
    )
    first = torch.cat([x for x, _, _ in L.test])
    assert torch.equal(first, torch.cat([x for x, _, _ in L.test]))  # no randomness


def test_imagefolder_val_with_fewer_classes_keeps_train_labels(tmp_path):
    write_imagefolder(tmp_path, val_classes=("dog", "eel"))
    L = build_loaders(
        "imagefolder", root=tmp_path, val_fraction=0.0, batch_size=8, image_size=16, num_workers=0
    )
    assert torch.equal(torch.cat([y for _, y, _ in L.test]), torch.tensor([1, 1, 2, 2]))


def test_imagefolder_missing_or_misshapen_is_one_line(tmp_path):
    with pytest.raises(DatasetNotFound) as e:
        build_loaders("imagefolder", root=tmp_path / "imagenet")
    assert str(tmp_path / "imagenet" / "train") in str(e.value) and "\n" not in str(e.value)

    write_imagefolder(tmp_path)
    for f in (tmp_path / "val").rglob("*.png"):  # ImageNet's raw val/: one flat folder
        f.rename(tmp_path / "val" / f.name)
    for d in (tmp_path / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    with pytest.raises(DatasetNotFound, match="class folders") as e:
        build_loaders("imagefolder", root=tmp_path)
    assert str(tmp_path / "val") in str(e.value) and "\n" not in str(e.value)

    (tmp_path / "val" / "yak").mkdir()
    with pytest.raises(DatasetNotFound, match="yak"):
        build_loaders("imagefolder", root=tmp_path)


# ---------------------------------------------------------------- digits and the basics


def test_digits():
    ds = load_dataset("digits")
    assert isinstance(ds, ArrayDataset)
    assert ds.train_x.shape[1:] == (1, 8, 8) and ds.train_x.dtype == torch.uint8
    assert len(ds.train_y) + len(ds.test_y) == 1797
    assert abs(len(ds.test_y) - 0.2 * 1797) < 10
    assert int(ds.train_x.max()) == 255 and ds.num_classes == 10
    assert torch.equal(torch.unique(ds.test_y), torch.arange(10))
    assert not _rows(ds.test_x) <= _rows(ds.train_x)  # a real held-out set
    L = build_loaders("digits", val_fraction=0.1, batch_size=64)
    assert L.train.num_samples + L.val.num_samples == len(ds.train_y)
    x = torch.cat([b[0] for b in L.val])
    assert abs(float(x.mean())) < 0.1  # statistics measured on the training images


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 6, 5), generator=g, dtype=torch.uint8)  # no zeros
    p = 2
    out = random_crop_flip(x, p, False, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets = set()
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 5])
        ]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets really vary per sample
    again = random_crop_flip(x, p, False, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_random_flip_really_flips():
    x = torch.randint(
        0, 256, (64, 3, 4, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    out = random_crop_flip(x, 0, True, torch.Generator().manual_seed(2))
    mirrored = x[..., [4, 3, 2, 1, 0]]
    same = [torch.equal(out[i], x[i]) for i in range(64)]
    flipped = [torch.equal(out[i], mirrored[i]) for i in range(64)]
    assert all(s != f for s, f in zip(same, flipped, strict=True))  # exactly one of the two
    assert 10 < sum(flipped) < 54  # about half


def test_normalize_and_loader_edges():
    norm = Normalize((0.5, 0.25), (0.1, 0.2), CPU)
    x = torch.empty(2, 2, 3, 3, dtype=torch.uint8)
    x[:, 0], x[:, 1] = round(0.5 * 255), round(0.25 * 255)
    y = norm(x)
    assert y.abs().max() < 0.05 and y.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="val_fraction"):
        build_loaders("digits", val_fraction=1.0)
    with pytest.raises(KeyError, match="unknown dataset"):
        build_loaders("mnist")


def test_any_seed_a_space_may_hold_orders_batches() -> None:
    """search.seed may be anything below 2**64 (the spec refuses the rest): the epoch's order
    is drawn from (seed, epoch) wrapped to 64 bits, and small seeds keep their order."""
    L = build_loaders("digits", val_fraction=0.1, batch_size=64, seed=2**64 - 1)
    L.train.set_epoch(3)
    assert len(list(L.train)) == len(L.train) > 0
    from searchkd.data.base import mix_seed

    assert mix_seed(7, 3) == 7 * 1_000_003 + 3
