"""The reproduction spaces: one per objective that has a published CIFAR-100 row for
resnet32x4 → resnet8x4, each exactly the table's recipe and protocol, each runnable.

A reproduction trains on all 50,000 training images and reports the last epoch's test
accuracy; a search holds a validation split out and chooses on it. These tests pin that the
spaces say the former, and run each one for an epoch on a small CIFAR-100 on disk.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_space
from test_data import write_cifar100
from test_real_scale import public_teacher

from searchkd.api import load_space
from searchkd.cli import main
from searchkd.engine import Engine
from searchkd.objectives import get_objective
from searchkd.trial import trial_spec

SPACES = Path(__file__).resolve().parent.parent / "spaces"
# Published top-1 (%) of each objective for resnet32x4 → resnet8x4 on CIFAR-100.
PUBLISHED = {"ce": 72.50, "kd": 73.33, "crd": 75.51, "cktf": 75.74}
TEACHER = ".cache/searchkd/teachers/resnet32x4_vanilla/ckpt_epoch_240.pth"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home directory holding a file where the spaces expect the public teacher."""
    home = tmp_path / "home"
    (home / TEACHER).parent.mkdir(parents=True)
    # CIFAR-100 is not on disk here, so validation reads the checkpoint without fitting it
    torch.save({"conv1.weight": torch.zeros(1)}, home / TEACHER)
    monkeypatch.setenv("HOME", str(home))
    return home


def test_one_reproduction_space_per_published_row() -> None:
    assert {p.stem for p in SPACES.glob("repro-*.yaml")} == {f"repro-{o}" for o in PUBLISHED}


@pytest.mark.parametrize("objective", sorted(PUBLISHED))
def test_reproduction_space_is_the_published_recipe(
    objective: str, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = SPACES / f"repro-{objective}.yaml"
    assert main(["validate", str(path)]) == 0 and f"{path}: ok" in capsys.readouterr().out
    spec = load_space(path)
    assert spec.objective == objective
    assert (spec.data.dataset, spec.data.val_fraction) == ("cifar100", 0.0)  # all 50k images
    assert spec.teacher.arch == "resnet32x4" and spec.teacher.checkpoint == str(
        (home / TEACHER).resolve()
    )
    assert (spec.student.arch, spec.student.width, spec.student.depth) == ("resnet8x4", 1.0, None)
    t = spec.train
    assert (
        t.epochs,
        t.batch_size,
        t.optimizer,
        t.lr,
        t.momentum,
        t.nesterov,
        t.weight_decay,
        t.lr_schedule,
        t.lr_milestones,
        t.lr_gamma,
        t.precision,
        t.compile,
    ) == (
        240,
        64,
        "sgd",
        0.05,
        0.9,
        False,
        5.0e-4,
        "multistep",
        [150, 180, 210],
        0.1,
        "fp32",
        False,
    )
    # One trial, nothing searched: the metric chooses nothing, it is only reported.
    assert spec.search.num_samples == 1 and not spec.params and spec.search.scheduler == "none"
    assert spec.metrics == ["test_acc_last"]
    # The loss section restates the defaults, which are the published constants.
    cls = get_objective(objective)
    assert cls.resolve(spec.loss) == cls.resolve({})
    assert f"{PUBLISHED[objective]:.2f}% top-1" in path.read_text()


@pytest.mark.parametrize("objective", sorted(PUBLISHED))
def test_reproduction_space_trains_on_every_image_and_reports_the_last_epoch(
    objective: str, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(2)
    write_cifar100(tmp_path / "data", monkeypatch, n_train=200, n_test=100)
    public_teacher(home / TEACHER, "resnet32x4", 100)
    raw = yaml.safe_load((SPACES / f"repro-{objective}.yaml").read_text())
    raw["data"].update(root=str(tmp_path / "data"), download=False)
    raw["train"]["epochs"] = 1
    spec = load_space(write_space(tmp_path / "repro.yaml", raw))
    engine = Engine(
        trial_spec(spec.model_dump(mode="json", by_alias=True), {"seed": 0, "trial_number": 0}),
        seed=0,
        teacher_checkpoint=spec.teacher.checkpoint,
        device="cpu",
    )
    assert engine.loaders.num_train == 200 and engine.loaders.val.num_samples == 0
    row = engine.run_epoch()
    assert math.isnan(row["val_acc"]) and math.isnan(row["best_val_acc"])
    assert 0.0 <= row["test_acc_last"] <= 1.0 and row["test_acc"] == row["test_acc_last"]
    assert row["student_params"] == 1_233_540  # resnet8x4 with 100 classes
    assert (row["objective_params"] > 0) == (objective in ("crd", "cktf"))
