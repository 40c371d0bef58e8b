"""Real-scale parts end to end: CIFAR-100 on disk → resnet32x4 → resnet8x4, and an ImageFolder
tree → resnet34 → resnet18, with teachers saved in the public `{'model': state_dict}` format."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_space
from test_data import write_cifar100, write_imagefolder

from searchkd.api import load_space
from searchkd.cli import main
from searchkd.engine import Engine
from searchkd.models import build_model
from searchkd.record import RESULTS_FILE
from searchkd.trial import trial_spec


def public_teacher(path: Path, arch: str, num_classes: int, **kw: object) -> Path:
    """A teacher file exactly as the public CIFAR zoo ships them: {'model': state_dict, ...}."""
    model = build_model(arch, num_classes, **kw)
    torch.save({"model": model.state_dict(), "epoch": 240, "best_acc": 79.42}, path)
    return path


def test_cifar100_resnet32x4_to_resnet8x4_one_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(2)
    write_cifar100(tmp_path / "data", monkeypatch, n_train=300, n_test=100)
    teacher = public_teacher(tmp_path / "ckpt_epoch_240.pth", "resnet32x4", 100)
    space = write_space(
        tmp_path / "c100.yaml",
        {
            "name": "c100",
            "objective": "msd",
            "data": {"dataset": "cifar100", "root": str(tmp_path / "data"), "val_fraction": 0.34},
            "teacher": {"arch": "resnet32x4", "checkpoint": str(teacher)},
            "student": {"arch": "resnet8x4", "width": 1.0},
            "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "lr_milestones": [150, 180, 210]},
            "loss": {"scales": [1, 2], "dim": 32},
            "params": {"student.width": {"choice": [0.5, 1.0]}, "loss.tau": {"float": [0.05, 0.2]}},
        },
    )
    spec = load_space(space)
    config = {"student.width": 0.5, "loss.tau": 0.1, "seed": 3, "trial_number": 0}
    engine = Engine(
        trial_spec(spec.model_dump(mode="json", by_alias=True), config),
        seed=3,
        teacher_checkpoint=spec.teacher.checkpoint,
        device="cpu",
    )
    assert engine.loaders.num_classes == 100 and engine.loaders.image_size == 32
    assert engine.loaders.num_train == 200  # 300 minus one val image per class
    row = engine.run_epoch()
    assert row["epoch"] == 1 and row["loss_msd"] > 0 and 0 <= row["val_acc"] <= 1
    half = build_model("resnet8x4", 100, width=0.5)
    assert row["student_params"] == sum(p.numel() for p in half.parameters())


@pytest.mark.integration
def test_imagefolder_resnet34_to_resnet18_through_the_search(
    ray_session, tmp_path: Path, capsys
) -> None:
    write_imagefolder(tmp_path / "imagenet", train_per_class=8, val_per_class=2)
    classes = len(list((tmp_path / "imagenet" / "train").iterdir()))
    teacher = public_teacher(tmp_path / "resnet34.pth", "resnet34", classes)
    space = write_space(
        tmp_path / "inet.yaml",
        {
            "name": "inet",
            "objective": "kd",
            "data": {
                "dataset": "imagefolder",
                "root": str(tmp_path / "imagenet"),
                "val_fraction": 0.25,
                "options": {"image_size": 64, "num_workers": 0},
            },
            "teacher": {"arch": "resnet34", "checkpoint": str(teacher)},
            "student": {"arch": "resnet18", "width": 0.25},
            "train": {"epochs": 1, "batch_size": 8, "lr": 0.05},
            "search": {"num_samples": 1, "scheduler": "none", "resources": {"cpu": 1, "gpu": 0}},
            "params": {"loss.kd_temperature": {"float": [2.0, 6.0]}},
        },
    )
    trials = tmp_path / "trials"
    assert main(["tune", str(space), "--trials-dir", str(trials)]) == 0
    rows = pq.read_table(trials / "inet" / RESULTS_FILE).to_pylist()
    assert len(rows) == 1 and rows[0]["epoch"] == 1
    assert rows[0]["loss_kd"] > 0 and rows[0]["student_macs"] > 0
    assert "teacher resnet34: test_acc" in capsys.readouterr().out
