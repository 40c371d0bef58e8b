"""The engine: plain PyTorch training steps, checkpoints that resume exactly, the teacher cache."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_space
from hypothesis import given, settings
from hypothesis import strategies as st

from searchkd.engine import (
    CheckpointMismatch,
    Engine,
    NonFiniteLoss,
    load_weights,
    read_checkpoint,
)
from searchkd.models import build_model
from searchkd.spec import Spec
from searchkd.teacher import ensure_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("teachers")
    return ensure_teacher(Spec.model_validate(tiny_space()), cache, log=lambda _: None).path


def engine(teacher: Path, seed: int = 0, **train) -> Engine:
    space = tiny_space(train={**tiny_space()["train"], **train})
    return Engine(Spec.model_validate(space), seed=seed, teacher_checkpoint=teacher, device="cpu")


def test_epoch_reports_the_metrics_a_trial_needs(teacher: Path) -> None:
    e = engine(teacher)
    row = e.run_epoch()
    for key in (
        "epoch",
        "train_loss",
        "loss_ce",
        "loss_kd",
        "loss_msd",
        "val_acc",
        "val_top5",
        "best_val_acc",
        "test_acc",
        "test_acc_last",
        "lr",
        "epoch_seconds",
        "images_per_second",
        "student_params",
        "objective_params",
        "student_macs",
    ):
        assert key in row, key
    assert row["epoch"] == 1
    assert row["train_loss"] == pytest.approx(
        row["loss_ce"] + row["loss_kd"] + row["loss_msd"], rel=1e-4
    )
    assert 0.0 <= row["val_acc"] <= row["val_top5"] <= 1.0
    assert row["student_params"] > 0 and row["student_macs"] > 0
    heads = [*e.objective.student_heads.parameters(), *e.objective.teacher_heads.parameters()]
    assert row["objective_params"] == sum(p.numel() for p in heads) > 0


def test_training_learns_digits(teacher: Path) -> None:
    e = engine(teacher, epochs=6, batch_size=64)
    rows = [e.run_epoch() for _ in range(6)]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["best_val_acc"] > 0.5  # 10 classes: chance is 0.1


def test_test_acc_is_the_best_on_val_students_and_test_acc_last_the_last_epochs(
    teacher: Path,
) -> None:
    e = engine(teacher, epochs=4)
    rows = [e.run_epoch() for _ in range(4)]
    for row in rows:
        assert 0.0 <= row["test_acc_last"] <= 1.0
    best = max(range(4), key=lambda i: (rows[i]["val_acc"], -i))  # the first epoch reaching the max
    assert rows[-1]["best_val_acc"] == rows[best]["val_acc"]
    assert rows[-1]["test_acc"] == rows[best]["test_acc_last"]
    assert rows[-1]["test_acc_last"] == e.evaluate("test").top1


def test_without_a_val_split_every_image_trains_and_the_last_epoch_is_kept(teacher: Path) -> None:
    """val_fraction 0 (the published tables' protocol): no image is held out, nothing is
    measured on val (NaN, not a made-up 0), and the kept student is the last epoch's."""
    with_val = engine(teacher)
    space = tiny_space(
        data={"dataset": "digits", "val_fraction": 0.0},
        search={**tiny_space()["search"], "num_samples": 1, "metric": "test_acc_last"},
    )
    e = Engine(Spec.model_validate(space), seed=0, teacher_checkpoint=teacher, device="cpu")
    assert e.loaders.val.num_samples == 0
    assert e.loaders.num_train == with_val.loaders.num_train + with_val.loaders.val.num_samples
    for _ in range(2):
        row = e.run_epoch()
        for key in ("val_acc", "val_top5", "best_val_acc"):
            assert math.isnan(row[key]), key
        assert row["test_acc"] == row["test_acc_last"] == e.evaluate("test").top1
        for k, v in e.student.state_dict().items():
            assert torch.equal(e.best_student[k], v), k


def test_sgd_is_plain_momentum_unless_nesterov_is_asked(teacher: Path) -> None:
    assert engine(teacher).optimizer.param_groups[0]["nesterov"] is False
    assert engine(teacher, nesterov=True).optimizer.param_groups[0]["nesterov"] is True
    assert engine(teacher, momentum=0.0).optimizer.param_groups[0]["momentum"] == 0.0


def test_fp32_means_fp32_arithmetic_on_cuda_not_tf32() -> None:
    from searchkd.engine import uses_tf32
    from searchkd.spec import TrainSpec

    assert uses_tf32(TrainSpec(precision="bf16")) and not uses_tf32(TrainSpec(precision="fp32"))


def test_teacher_is_frozen_and_stays_in_eval_mode(teacher: Path) -> None:
    e = engine(teacher)
    before = {k: v.clone() for k, v in e.teacher.state_dict().items()}
    e.run_epoch()
    assert not e.teacher.training
    assert all(not p.requires_grad for p in e.teacher.parameters())
    for k, v in e.teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher {k} changed"


def test_crd_gets_the_training_labels_before_the_first_batch(teacher: Path) -> None:
    space = tiny_space()
    space.update(objective="crd", loss={"dim": 16, "negatives": 64}, params={})
    e = Engine(Spec.model_validate(space), seed=0, teacher_checkpoint=teacher, device="cpu")
    labels = e.objective.book.labels
    assert labels.shape == (e.loaders.num_train,) and (labels >= 0).all()
    for _, y, index in e.loaders.train:  # in the order of the indices batches carry
        assert torch.equal(labels[index], y)


def test_resume_from_checkpoint_continues_exactly(teacher: Path, tmp_path: Path) -> None:
    straight = engine(teacher, seed=3)
    straight.run_epoch()
    straight.run_epoch()

    first = engine(teacher, seed=3)
    first.run_epoch()
    first.save(tmp_path / "engine.pt")
    resumed = engine(teacher, seed=3)
    resumed.load(tmp_path / "engine.pt")
    assert resumed.epoch == 1
    resumed.run_epoch()
    for k, v in straight.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[k], v, msg=k)
    assert resumed.best_val_acc == straight.best_val_acc


def test_non_finite_loss_fails_the_trial(teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    e = engine(teacher)
    original = e.objective.distill
    monkeypatch.setattr(e.objective, "distill", lambda *a: original(*a) * float("nan"))
    with pytest.raises(NonFiniteLoss, match="loss_msd"):
        e.run_epoch()


def test_teacher_cache_trains_once_and_records_accuracy(tmp_path: Path) -> None:
    spec = Spec.model_validate(tiny_space())
    logs: list[str] = []
    first = ensure_teacher(spec, tmp_path, log=logs.append)
    assert any("training teacher" in line for line in logs)
    meta = json.loads((first.path.parent / "meta.json").read_text())
    assert meta["test_acc"] == first.test_acc and 0.0 <= first.test_acc <= 1.0
    logs.clear()
    again = ensure_teacher(spec, tmp_path, log=logs.append)
    assert again == first and not logs  # cached: no training, no output
    other = Spec.model_validate(tiny_space(teacher={**tiny_space()["teacher"], "width": 0.75}))
    assert ensure_teacher(other, tmp_path, log=logs.append).digest != first.digest


def test_public_zoo_checkpoint_format_loads(tmp_path: Path) -> None:
    model = build_model("resnet8", 10, width=0.25, in_channels=1)
    torch.save({"model": model.state_dict(), "epoch": 240}, tmp_path / "zoo.pth")
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    for name in ("zoo.pth", "plain.pth"):
        fresh = build_model("resnet8", 10, width=0.25, in_channels=1)
        load_weights(fresh, tmp_path / name)
        for k, v in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v)


def test_mismatched_checkpoint_names_the_keys(tmp_path: Path) -> None:
    torch.save(
        {"model": build_model("resnet8", 10, width=0.5, in_channels=1).state_dict()},
        tmp_path / "t.pth",
    )
    with pytest.raises(CheckpointMismatch, match=r"wrong shape keys: bn1\.bias, .*\(\+\d+ more\)"):
        load_weights(build_model("resnet8", 10, width=0.25, in_channels=1), tmp_path / "t.pth")
    with pytest.raises(CheckpointMismatch, match=r"missing keys: layer1\.1\..*\(\+\d+ more\)"):
        load_weights(build_model("resnet14", 10, width=0.5, in_channels=1), tmp_path / "t.pth")


def test_trial_resumes_from_its_own_saved_state(teacher: Path, tmp_path: Path) -> None:
    """The trial finds its state in the search's storage under its own key; a state file
    that is not a readable checkpoint (cut short, overwritten) makes it start at epoch 0."""
    from searchkd.storage import STATE_FILE, Storage, trial_key
    from searchkd.trial import resume_member

    def resume(e, files):  # a trial of one student resumes as student 0 of its cohort
        return resume_member(e.cohort, 0, files)

    files = Storage(str(tmp_path)).child(trial_key(3))
    fresh = engine(teacher)
    assert not resume(fresh, files) and fresh.epoch == 0  # nothing saved yet

    e = engine(teacher)
    for _ in range(2):
        e.run_epoch()
    files.write_bytes(STATE_FILE, e.to_bytes())
    assert (tmp_path / "trial-0003" / STATE_FILE).is_file()
    again = engine(teacher)
    assert resume(again, files) and again.epoch == 2
    assert again.best_val_acc == e.best_val_acc and again.last_row == e.last_row
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            again.student.state_dict().values(), e.student.state_dict().values(), strict=True
        )
    )

    blob = e.to_bytes()
    files.write_bytes(STATE_FILE, blob[: len(blob) // 2])
    cut = engine(teacher)
    assert not resume(cut, files) and cut.epoch == 0


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=4096))
def test_any_bytes_are_a_checkpoint_or_one_line(blob: bytes) -> None:
    """Whatever a damaged or foreign file holds, reading it as a checkpoint gives the weights
    or one CheckpointMismatch line, never another exception (random bytes once made torch's
    unpickler raise IndexError)."""
    try:
        read_checkpoint(io.BytesIO(blob), "teacher.pth")
    except CheckpointMismatch as exc:
        assert "\n" not in str(exc) and str(exc).startswith("teacher.pth ")


# Bytes (found by random search) on which torch's weights-only unpickler raises IndexError and
# KeyError, which read_checkpoint once let through as tracebacks.
BROKEN = {
    "IndexError": bytes.fromhex(
        "7457ef85245a76a1a3167bc1344b00d4b2729e7601374c1dc4faa14d8b9b276cb4c07817ad7fc2f53b8bc36747a1fb051e45e2ab0a00416586e394b565711abf"
    ),
    "KeyError": bytes.fromhex(
        "6a1b198fe87b7956d7ccf9cf571f7a1db37f6d094d55bcafe427eb2aa09060cef9fda31610ce1532bf380f620219648e844a72eb7dc995b6ad376c155e38fdff"
    ),
}


@pytest.mark.parametrize("error", sorted(BROKEN))
def test_bytes_that_break_the_unpickler_are_one_line(error: str) -> None:
    with pytest.raises(CheckpointMismatch, match=r"^teacher.pth is not a PyTorch checkpoint \("):
        read_checkpoint(io.BytesIO(BROKEN[error]), "teacher.pth")
