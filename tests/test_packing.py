"""Packed trials (search.pack): K students over one teacher forward per batch, each still its
own trial everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_space, tune_command

from searchkd.engine import Cohort, Engine, estimate_pack_bytes, pack_memory_problem
from searchkd.spec import Spec, SpecError, students_of, validate
from searchkd.teacher import ensure_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("teachers")
    return ensure_teacher(Spec.model_validate(tiny_space()), cache, log=lambda _: None).path


def spec(objective: str = "msd", width: float = 0.25, **loss) -> Spec:
    raw = tiny_space(objective=objective, student={"arch": "resnet8", "width": width}, params={})
    raw["loss"] = loss or (
        {"layers": 1, "scales": [1, 2], "dim": 16}
        if objective == "msd"
        else {"dim": 16, "negatives": 64}
        if objective == "crd"
        else {}
    )
    return Spec.model_validate(raw)


def mixed(teacher: Path, seeds: tuple[int, ...] = (1, 2, 3)) -> Cohort:
    """Students that differ in width, objective and loss parameters."""
    specs = [
        spec("msd", 0.25),
        spec("crd", 0.5),
        spec("msd", 0.5, tau=0.2, layers=1, scales=[1], dim=8),
    ]
    return Cohort(specs[: len(seeds)], list(seeds), teacher_checkpoint=teacher, device="cpu")


def test_the_teacher_runs_once_per_batch_for_all_students(teacher: Path, monkeypatch) -> None:
    c = mixed(teacher)
    calls = []
    original = c.teacher.forward_features
    monkeypatch.setattr(
        c.teacher, "forward_features", lambda x: calls.append(x.shape[0]) or original(x)
    )
    rows = c.run_epochs()
    assert sorted(rows) == [0, 1, 2]
    assert len(calls) == len(c.loaders.train)  # one forward per batch, not three
    assert c.train_teacher.calls == len(c.loaders.train)
    for row in rows.values():
        assert row["epoch"] == 1 and 0.0 <= row["val_acc"] <= 1.0
        assert row["train_loss"] == pytest.approx(
            sum(v for k, v in row.items() if k.startswith("loss_")), rel=1e-4
        )


def test_a_cohort_of_one_is_the_engine(teacher: Path) -> None:
    one = Cohort([spec()], [4], teacher_checkpoint=teacher, device="cpu").run_epochs()[0]
    engine = Engine(spec(), seed=4, teacher_checkpoint=teacher, device="cpu").run_epoch()
    for key in ("train_loss", "val_acc", "test_acc_last", "student_params"):
        assert one[key] == engine[key], key


def test_a_stopped_student_leaves_and_costs_nothing(teacher: Path, monkeypatch) -> None:
    c = mixed(teacher, (1, 2))
    c.run_epochs()
    c.stop(1)
    before = {k: v.clone() for k, v in c.members[1].student.state_dict().items()}
    called = []
    monkeypatch.setattr(c.members[1].objective, "forward", lambda *a, **k: called.append(1))
    rows = c.run_epochs()
    assert list(rows) == [0] and not called
    assert c.members[1].epoch == 1 and c.members[0].epoch == 2
    assert all(torch.equal(v, c.members[1].student.state_dict()[k]) for k, v in before.items())
    c.stop(0)
    assert c.finished and c.run_epochs() == {}


def test_each_students_state_round_trips_and_resumes_exactly(teacher: Path) -> None:
    straight = mixed(teacher)
    for _ in range(2):
        straight.run_epochs()
    first = mixed(teacher)
    first.run_epochs()
    blobs = [first.member_bytes(i) for i in range(3)]
    resumed = mixed(teacher)
    for i, blob in enumerate(blobs):
        resumed.load_member_bytes(i, blob)
    assert [m.epoch for m in resumed.members] == [1, 1, 1]
    rows = resumed.run_epochs()
    for i in range(3):
        for k, v in straight.members[i].student.state_dict().items():
            torch.testing.assert_close(
                resumed.members[i].student.state_dict()[k], v, msg=f"student {i} {k}"
            )
        assert rows[i]["val_acc"] == straight.members[i].last_row["val_acc"]


def test_students_behind_catch_up_before_the_cohort_goes_on(teacher: Path) -> None:
    """A kill between two students' saves leaves one an epoch ahead: the others train that
    epoch alone, then all go on together."""
    ahead = mixed(teacher, (1, 2))
    ahead.run_epochs()
    c = mixed(teacher, (1, 2))
    c.load_member_bytes(0, ahead.member_bytes(0))
    assert c.epoch == 0 and c.stepping() == [1]
    assert list(c.run_epochs()) == [1]
    assert c.stepping() == [0, 1]


def test_each_student_has_its_own_random_stream(teacher: Path) -> None:
    """A student's draws (mixup, negatives) do not depend on the students beside it."""
    alone = Cohort([spec("crd", 0.5), spec()], [2, 9], teacher_checkpoint=teacher, device="cpu")
    other = Cohort(
        [spec("crd", 0.5), spec(width=0.5)],
        [2, 7],
        teacher_checkpoint=teacher,
        device="cpu",
        data_seed=2,
    )
    a, b = alone.run_epochs()[0], other.run_epochs()[0]
    assert a["train_loss"] == b["train_loss"] and a["val_acc"] == b["val_acc"]


def test_memory_estimate_grows_with_the_pack_and_refuses_in_one_line(teacher: Path) -> None:
    c = Cohort([spec()], [0], teacher_checkpoint=teacher, device="cpu")
    one, four = estimate_pack_bytes(c, 1), estimate_pack_bytes(c, 4)
    assert 0 < one < four < 4 * one  # the teacher and the data are paid once
    assert pack_memory_problem(four, 4, total_bytes=4 * four, fraction=0.5) is None
    problem = pack_memory_problem(four, 4, total_bytes=four, fraction=0.5)
    assert problem is not None and "\n" not in problem
    assert (
        problem.startswith("search.pack: 4 students need about") and "lower search.pack" in problem
    )


def test_a_pack_refuses_searching_what_its_students_share() -> None:
    for key, param in (
        ("train.batch_size", {"choice": [32, 64]}),
        ("data.val_fraction", {"float": [0.1, 0.2]}),
        ("train.epochs", {"int": [2, 4]}),
    ):
        raw = tiny_space(search={**tiny_space()["search"], "pack": 2})
        raw["params"] = {key: param}
        with pytest.raises(SpecError, match=rf"params\.{key}: the students of a packed trial"):
            validate(raw, "x.yaml")
    raw = tiny_space(search={**tiny_space()["search"], "pack": 2})
    raw["params"]["train.lr"] = {"float": [0.01, 0.1]}
    assert validate(raw, "x.yaml").search.pack == 2


@pytest.mark.parametrize("reproducible", [True, False])
def test_the_driver_stops_a_student_with_a_file_the_trial_reads(
    tmp_path: Path, reproducible: bool
) -> None:
    from searchkd.scheduler import OrderedRungs, Rungs
    from searchkd.search import PackedStops
    from searchkd.storage import Storage, trial_key
    from searchkd.trial import stop_epoch

    storage = Storage(str(tmp_path))
    if reproducible:
        stops = PackedStops(None, storage, 4, "val_acc", OrderedRungs(1, 4, 2, "max"))
    else:
        stops = PackedStops(Rungs(1, 4, 2, "max"), storage, 4, "val_acc")

    def how(number: int, row: dict) -> list[tuple[int, str]]:
        return [(n, h) for _, n, _, h in stops.decide("cohort", number, row)]

    assert how(0, {"epoch": 1, "val_acc": 0.9}) == []
    assert how(1, {"epoch": 1, "val_acc": 0.1}) == [(1, "stopped")]
    assert stop_epoch(storage.child(trial_key(1))) == 1
    assert json.loads((tmp_path / "trial-0001" / "stopped.json").read_text())["by"] == "ASHA"
    assert stop_epoch(storage.child(trial_key(0))) is None
    assert how(1, {"epoch": 1, "val_acc": 0.1}) == [(1, "stopped")]  # reported again: the same
    assert how(0, {"epoch": 4, "val_acc": 0.95}) == [(0, "finished")]
    # A student whose trial found its stop file (the driver died before telling the study)
    # says so when it reports its last row again: the driver ends it as stopped.
    assert how(2, {"epoch": 2, "val_acc": 0.99, "stopped_by_driver": 1}) == [(2, "stopped")]


def test_a_reproducible_search_stops_a_student_once_the_lower_ones_reached_its_rung(
    tmp_path: Path,
) -> None:
    """Student 5 reaches rung 1 first: it waits (its cohort with it) until students 0-4 have;
    then it is stopped, and it is the report of student 4 that ends it."""
    from searchkd.scheduler import OrderedRungs
    from searchkd.search import PackedStops
    from searchkd.storage import Storage, read_decision, trial_key

    storage = Storage(str(tmp_path))
    stops = PackedStops(None, storage, 4, "val_acc", OrderedRungs(1, 4, 2, "max"))
    assert stops.decide("B", 5, {"epoch": 1, "val_acc": 0.1}) == []
    assert read_decision(storage.child(trial_key(5))) == (None, 0)  # it waits
    for n in range(4):
        assert stops.decide("A", n, {"epoch": 1, "val_acc": 0.9}) == []
    assert read_decision(storage.child(trial_key(3))) == (None, 1)  # passed rung 1
    ends = stops.decide("B", 4, {"epoch": 1, "val_acc": 0.95})
    assert [(t, n, r["epoch"], h) for t, n, r, h in ends] == [("B", 5, 1, "stopped")]
    assert read_decision(storage.child(trial_key(5))) == (1, 0)
    assert read_decision(storage.child(trial_key(4))) == (None, 1)


def test_students_of_reads_packed_and_unpacked_configs() -> None:
    assert students_of({"trial_number": 3, "seed": 1}) == {3: {"trial_number": 3, "seed": 1}}
    packed = {
        "students": [{"trial_number": 4, "seed": 1}, {"trial_number": 5, "seed": 2}],
        "data_seed": 1,
    }
    assert list(students_of(packed)) == [4, 5]


@pytest.mark.integration
def test_a_packed_search_keeps_every_invariant_per_student(
    ray_session, tmp_path: Path, capsys
) -> None:
    """pack 2, 4 trials under ASHA: 4 Optuna trials, 4 MLflow child runs, 4 trials' rows, each
    student stopped or finished on its own; a resume of the finished search changes nothing."""
    from conftest import assert_consistent, write_space

    from searchkd.cli import main
    from searchkd.search import load_study

    name, epochs = "packed", 4
    raw = tiny_space(name, train={**tiny_space()["train"], "epochs": epochs})
    raw["search"].update(
        num_samples=4, pack=2, scheduler="asha", grace_period=1, reduction_factor=2, seed=3
    )
    raw["params"]["loss.kd_weight"] = {"float": [0.0, 2.0]}
    space = write_space(tmp_path / f"{name}.yaml", raw)
    trials = tmp_path / "trials"
    assert main(["tune", str(space), "--trials-dir", str(trials)]) == 0
    out = capsys.readouterr().out
    table = assert_consistent(trials, name, 4, epochs)
    study = load_study(trials / name, name)
    last = {
        t.number: max(r["epoch"] for r in table if r["trial_number"] == t.number)
        for t in study.trials
    }
    assert {n: t.user_attrs["stopped_early"] for n, t in enumerate(study.trials)} == {
        n: e < epochs for n, e in last.items()
    }
    stopped = [n for n, e in last.items() if e < epochs]
    assert stopped, f"ASHA stopped no student: {last}\n{out}"
    for n in stopped:
        assert f"trial {n} stopped by ASHA at epoch {last[n]}" in out
        assert (
            json.loads(
                (trials / name / "checkpoints" / f"trial-{n:04d}" / "stopped.json").read_text()
            )["epoch"]
            == last[n]
        )
    for n in last:
        assert (trials / name / "checkpoints" / f"trial-{n:04d}" / "state.pt").is_file()
    # Students of a cohort shared their data order: the seed is recorded on every row.
    assert all(r["pack"] == 2 and isinstance(r["data_seed"], int | float) for r in table)
    by_trial = {r["trial_id"] for r in table}
    assert len(by_trial) == 2, "4 students in 2 Tune trials"
    assert main(["tune", str(space), "--resume", "--trials-dir", str(trials)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert_consistent(trials, name, 4, epochs)


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_of_a_packed_search_then_resume_keeps_every_invariant(tmp_path: Path) -> None:
    """SIGKILL the whole packed search mid-search, resume: every student ends once everywhere
    (Optuna, MLflow, Parquet), with steps in order, and some resumed from a save."""
    import os
    import signal
    import subprocess

    from conftest import assert_consistent, rows, wait_until, write_space

    name, num_samples, epochs = "packfaults", 4, 5
    raw = tiny_space(name, train={**tiny_space()["train"], "epochs": epochs, "batch_size": 32})
    raw["search"].update(
        num_samples=num_samples,
        pack=2,
        max_concurrent=1,
        scheduler="asha",
        grace_period=2,
        reduction_factor=2,
    )
    space = write_space(tmp_path / f"{name}.yaml", raw)
    trials = tmp_path / "trials"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def command(*extra: str) -> list[str]:
        return tune_command(space, trials, *extra)

    def run_until(cmd: list[str], ready) -> None:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_until(ready, "the kill point", proc, timeout=1800)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # One kill mid-search (the several kill points of a search are tests/test_faults.py's).
    run_until(command(), lambda: len(rows(trials, name)) >= 5)
    done = subprocess.run(command("--resume"), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = assert_consistent(trials, name, num_samples, epochs)
    assert max(r["start_epoch"] for r in table) >= 1, "no student resumed from its saved state"
    from searchkd.storage import Storage, trial_key
    from searchkd.trial import stop_epoch

    for n in {r["trial_number"] for r in table}:
        last = max(r["epoch"] for r in table if r["trial_number"] == n)
        stop = stop_epoch(Storage(str(trials / name / "checkpoints")).child(trial_key(n)))
        assert stop == (last if last < epochs else None), f"trial {n}: ended at {last}, {stop=}"


def test_preflight_refuses_a_pack_that_cannot_fit_its_gpu_share(tmp_path: Path) -> None:
    """The estimate runs on the CPU; the GPU's size is given (no GPU here)."""
    from searchkd.preflight import pack_memory

    raw = tiny_space(
        search={**tiny_space()["search"], "pack": 4, "resources": {"cpu": 1, "gpu": 0.5}}
    )
    s = Spec.model_validate(raw)
    assert pack_memory(s, total_bytes=80 * 2**30) is None
    problem = pack_memory(s, total_bytes=2**20)
    assert problem is not None and problem.startswith("search.pack: 4 students need about")
    assert "search.resources.gpu 0.5 of a" in problem
