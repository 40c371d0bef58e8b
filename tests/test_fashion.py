"""Fashion-MNIST: the real IDX files, written small in tmp_path, found in the documented order.

The fixtures write the genuine IDX layout (big-endian magic and sizes, then raw uint8) that
torchvision's reader parses, plain as torchvision keeps them and gzip'd as the Debian package
and the original release ship them. The Debian directory is pointed at a tmp folder through
SEARCHKD_FASHION_MNIST_DIR, so no test depends on what the machine has installed, except the
one that reads the installed copy on purpose.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from searchkd.data import (
    ArrayDataset,
    DatasetNotFound,
    build_loaders,
    load_dataset,
    split,
    stratified_subset,
)
from searchkd.data import fashion as F

# The first ten labels of the original release (Xiao, Rasul & Vollgraf 2017), train and test.
FIRST_TRAIN_LABELS = [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
FIRST_TEST_LABELS = [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def _idx(array: np.ndarray) -> bytes:
    """An IDX file: 0x00 0x00, type 0x08 (uint8), the number of dims, each size (>i4), data."""
    head = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    return head + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, n_train: int, n_test: int, seed: int, gz: bool) -> dict:
    """The four Fashion-MNIST files, balanced labels, random 28×28 images; returns the arrays."""
    rng = np.random.default_rng(seed)
    want = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.permutation(np.arange(n_train) % 10).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.permutation(np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, key in zip(F.FILES, ("train_x", "train_y", "test_x", "test_y"), strict=True):
        data = _idx(want[key])
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)
    return want


def _raw(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture
def debian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty stand-in for /usr/share/datasets/fashion-mnist."""
    folder = tmp_path / "usr-share-fashion-mnist"
    folder.mkdir()
    monkeypatch.setenv(F.DEBIAN_ENV, str(folder))
    return folder


def _same(ds: ArrayDataset, want: dict) -> None:
    assert ds.train_x.shape == (len(want["train_y"]), 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert torch.equal(ds.train_x[:, 0], torch.from_numpy(want["train_x"]))
    assert torch.equal(ds.test_x[:, 0], torch.from_numpy(want["test_x"]))
    assert torch.equal(ds.train_y, torch.from_numpy(want["train_y"]).long())
    assert torch.equal(ds.test_y, torch.from_numpy(want["test_y"]).long())
    assert ds.train_y.dtype == torch.int64 and ds.num_classes == 10


def test_root_in_torchvision_layout_is_read_pixel_exact(tmp_path: Path, debian: Path) -> None:
    want = write_idx(_raw(tmp_path / "data"), 50, 20, seed=1, gz=False)
    ds = load_dataset("fashion_mnist", root=tmp_path / "data")
    assert isinstance(ds, ArrayDataset)
    _same(ds, want)
    assert ds.crop_padding == 4 and ds.flip
    # the statistics are those of these training images, exactly (not published constants)
    pixels = torch.from_numpy(want["train_x"]).double() / 255
    assert ds.mean == pytest.approx((float(pixels.mean()),), abs=1e-9)
    assert ds.std == pytest.approx((float(pixels.std()),), abs=1e-9)


def test_gzipped_copies_in_the_root_are_unpacked_beside_them(tmp_path: Path, debian: Path) -> None:
    want = write_idx(_raw(tmp_path), 30, 10, seed=2, gz=True)  # torchvision's download keeps .gz
    _same(load_dataset("fashion_mnist", root=tmp_path), want)
    assert all((_raw(tmp_path) / name).is_file() for name in F.FILES)


def test_root_comes_before_the_debian_copy(tmp_path: Path, debian: Path) -> None:
    write_idx(debian, 30, 10, seed=3, gz=True)
    mine = write_idx(_raw(tmp_path / "data"), 40, 10, seed=4, gz=False)
    _same(load_dataset("fashion_mnist", root=tmp_path / "data"), mine)


def test_the_debian_copy_is_unpacked_once_and_never_modified(tmp_path: Path, debian: Path) -> None:
    want = write_idx(debian, 30, 10, seed=5, gz=True)
    before = _snapshot(debian)
    root = tmp_path / "data"
    _same(load_dataset("fashion_mnist", root=root), want)
    unpacked = _snapshot(_raw(root))
    assert set(unpacked) == set(F.FILES)  # the four files, no temporary left behind
    _same(load_dataset("fashion_mnist", root=root), want)
    assert _snapshot(_raw(root)) == unpacked  # the second load read them, wrote nothing
    assert _snapshot(debian) == before
    assert all(os.stat(_raw(root) / n).st_mode & 0o044 for n in F.FILES)  # readable by others


def test_an_interrupted_unpack_leaves_no_file(
    tmp_path: Path, debian: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_idx(debian, 30, 10, seed=6, gz=True)

    def killed(src: object, dst: object, length: int = 0) -> None:
        dst.write(b"\x00\x00\x08")  # type: ignore[attr-defined]  # a few bytes, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(F.shutil, "copyfileobj", killed)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("fashion_mnist", root=tmp_path / "data")
    assert list(_raw(tmp_path / "data").iterdir()) == []  # neither a target nor a .part


def test_nothing_found_is_one_line_naming_three_ways_and_writes_nothing(
    tmp_path: Path, debian: Path
) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFound) as e:
        build_loaders("fashion_mnist", root=root)
    msg = str(e.value)
    assert "\n" not in msg and str(root) in msg
    assert "FashionMNIST/raw/" in msg  # 1. the root's layout
    assert f"apt-get install dataset-fashion-mnist; read from {debian}" in msg  # 2. the package
    assert "data.download: true" in msg  # 3. the download
    assert not root.exists()


def test_an_incomplete_debian_copy_is_not_used(tmp_path: Path, debian: Path) -> None:
    write_idx(debian, 30, 10, seed=7, gz=True)
    (debian / f"{F.FILES[0]}.gz").unlink()
    with pytest.raises(DatasetNotFound, match="not found"):
        load_dataset("fashion_mnist", root=tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_a_failed_download_is_one_line(
    tmp_path: Path, debian: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFound, match="could not be put under") as e:
        load_dataset("fashion_mnist", root=tmp_path / "data", download=True)
    assert "\n" not in str(e.value) and "name resolution" in str(e.value)


def test_a_damaged_file_is_one_line(tmp_path: Path, debian: Path) -> None:
    write_idx(_raw(tmp_path), 30, 10, seed=8, gz=False)
    (_raw(tmp_path) / F.FILES[0]).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 7)  # cut short
    with pytest.raises(DatasetNotFound, match="unreadable") as e:
        load_dataset("fashion_mnist", root=tmp_path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- the training subset


def test_the_subset_is_stratified_seeded_and_leaves_val_and_test_alone(
    tmp_path: Path, debian: Path
) -> None:
    write_idx(_raw(tmp_path), 400, 50, seed=9, gz=False)
    full = split(load_dataset("fashion_mnist", root=tmp_path), 0.25)
    capped_ds = load_dataset("fashion_mnist", root=tmp_path, train_images=53)
    capped = split(capped_ds, 0.25)
    assert len(full.train[1]) == 300 and len(capped.train[1]) == 53
    counts = torch.bincount(capped.train[1], minlength=10)
    assert counts.sum() == 53 and counts.max() - counts.min() <= 1  # stratified
    # the validation split is carved first: the cap leaves it, and the test split, unchanged
    assert torch.equal(capped.val[0], full.val[0]) and torch.equal(capped.val[1], full.val[1])
    assert torch.equal(capped.test[0], full.test[0]) and len(capped.test[1]) == 50
    rows = lambda x: {bytes(r) for r in x.reshape(len(x), -1).numpy()}  # noqa: E731
    assert rows(capped.train[0]) <= rows(full.train[0])  # a subset of train, disjoint from val
    assert not rows(capped.train[0]) & rows(capped.val[0])
    again = split(load_dataset("fashion_mnist", root=tmp_path, train_images=53), 0.25)
    assert torch.equal(again.train[0], capped.train[0])  # the same for every trial
    loaders = build_loaders("fashion_mnist", root=tmp_path, val_fraction=0.25, train_images=53)
    assert (loaders.num_train, loaders.val.num_samples, loaders.test.num_samples) == (53, 100, 50)
    assert (loaders.channels, loaders.image_size) == (1, 28)
    big = split(load_dataset("fashion_mnist", root=tmp_path, train_images=10_000), 0.25)
    assert torch.equal(big.train[0], full.train[0])  # a cap above the split keeps it all


def test_stratified_subset_follows_unequal_classes() -> None:
    y = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    idx = stratified_subset(y, 10, seed=0)
    assert torch.bincount(y[idx]).tolist() == [6, 3, 1] and len(set(idx.tolist())) == 10
    assert torch.equal(idx, stratified_subset(y, 10, seed=0))
    assert not torch.equal(idx, stratified_subset(y, 10, seed=1))


def test_a_bad_train_images_is_one_line_when_the_space_is_validated(space_file) -> None:
    from searchkd.api import load_space
    from searchkd.spec import SpecError

    for value, msg in ((0, "greater than 0"), ("many", "valid integer"), (2.5, "valid integer")):
        data = {"dataset": "fashion_mnist", "options": {"train_images": value}}
        want = rf"data\.options\.train_images: Input should be .*{msg}"
        with pytest.raises(SpecError, match=want):
            load_space(space_file(data=data))
    with pytest.raises(SpecError, match=r"not an option of dataset fashion_mnist; valid: train_"):
        load_space(space_file(data={"dataset": "fashion_mnist", "options": {"train_image": 5}}))
    ok = load_space(space_file(data={"dataset": "fashion_mnist", "options": {"train_images": 5}}))
    assert ok.data.options == {"train_images": 5}


# ---------------------------------------------------------------- the installed package


def test_the_installed_debian_copy_is_the_original_release(tmp_path: Path) -> None:
    if not F.has_files(F.DEBIAN_DIR, ".gz"):
        pytest.skip(
            f"the Debian package is not installed ({F.DEBIAN_DIR} lacks the four .gz files): "
            f"apt-get install {F.DEBIAN_PACKAGE} (.ci/run does, as root)"
        )
    ds = load_dataset("fashion_mnist", root=tmp_path)
    assert isinstance(ds, ArrayDataset)
    assert ds.train_x.shape == (60_000, 1, 28, 28) and ds.test_x.shape == (10_000, 1, 28, 28)
    assert torch.bincount(ds.train_y).tolist() == [6_000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1_000] * 10
    assert ds.train_y[:10].tolist() == FIRST_TRAIN_LABELS
    assert ds.test_y[:10].tolist() == FIRST_TEST_LABELS
    assert ds.mean == pytest.approx((0.2860,), abs=1e-4)  # the figures usually quoted
    assert ds.std == pytest.approx((0.3530,), abs=1e-4)


def test_tune_without_the_data_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, debian: Path, space_file, capsys: pytest.CaptureFixture[str]
) -> None:
    from searchkd.cli import main

    space = space_file(data={"dataset": "fashion_mnist", "root": str(tmp_path / "data")})
    trials = tmp_path / "trials"
    with pytest.raises(SystemExit) as code:
        main(["tune", str(space), "--trials-dir", str(trials)])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("searchkd: error: ")
    assert "data.dataset: fashion_mnist not found under" in err and "apt-get install" in err
    assert not (tmp_path / "data").exists() and not (trials / "tiny").exists()
