"""MLflow bookkeeping by the driver: one run per trial, synced idempotently, through outages."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import free_port, start_mlflow, stop_group, tiny_space
from mlflow.tracking import MlflowClient

from searchkd.storage import STUDENT_FILE, Storage, trial_key
from searchkd.tracking import (
    RUNS_FILE,
    MlflowRecorder,
    MlflowWriter,
    SearchRuns,
    is_transient,
)


def _setup(
    tmp_path: Path, uri: str, log: list[str]
) -> tuple[MlflowWriter, MlflowRecorder, MlflowClient]:
    client = MlflowClient(uri)
    exp = client.create_experiment(f"s{time.time_ns()}")
    parent = client.create_run(exp).info.run_id
    storage = Storage(str(tmp_path / "checkpoints"))
    writer = MlflowWriter(
        SearchRuns(uri, exp, parent),
        tmp_path,
        storage,
        "val_acc",
        "max",
        {"teacher": "t", "student": "s"},
        epochs=3,
        log=log.append,
    )
    return writer, MlflowRecorder(writer), client


def _trial(number: int, trial_id: str = "abc", epoch: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        trial_id=trial_id,
        config={"trial_number": number, "loss.tau": 0.1, "seed": 7},
        last_result={"epoch": epoch},
        error_file=None,
        error_msg="",
    )


def _row(epoch: int) -> dict:
    return {
        "train_loss": 1.0 / epoch,
        "epoch": epoch,
        "val_acc": 0.5 + epoch / 10,
        "loss_msd": 0.3,
        "test_acc": 0.4 + epoch / 10,
        "score": 0.5 + epoch / 10,
        "node_id": "n1",
        "timestamp": time.time(),
    }


def _history(client: MlflowClient, rid: str, key: str = "val_acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(rid, key))


def test_writer_keeps_one_run_per_trial_and_each_step_once(tmp_path: Path) -> None:
    log: list[str] = []
    writer, rec, client = _setup(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", log)
    t = _trial(4)
    rec.on_trial_start(t)
    for e in (1, 2):
        rec.on_trial_result(t, _row(e))
    assert writer.drain(60)
    rid = json.loads((tmp_path / RUNS_FILE).read_text())["4"]
    run = client.get_run(rid)
    assert run.info.status == "RUNNING" and run.info.run_name == "trial-004"
    assert run.data.params == {"loss.tau": "0.1", "seed": "7"}
    assert run.data.tags["trial_number"] == "4" and run.data.tags["ray_node"] == "n1"
    assert _history(client, rid) == [1, 2]
    # Logged first, so that MLflow's compare view (which plots a run's first metric key by
    # default) shows the score, not train_loss.
    assert list(run.data.metrics)[:3] == ["score", "val_acc", "test_acc"]

    # The trial fails; then (a resumed search) runs again from its epoch 2, re-reporting it.
    rec.on_trial_error(
        SimpleNamespace(**{**vars(t), "error_msg": "Traceback ...\nNonFiniteLoss: loss nan"})
    )
    assert writer.drain(60)
    run = client.get_run(rid)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "NonFiniteLoss: loss nan"
    rec.on_trial_start(t)
    for e in (2, 3):
        rec.on_trial_result(t, _row(e))
    Storage(str(tmp_path / "checkpoints")).child(trial_key(4)).write_bytes(STUDENT_FILE, b"weights")
    rec.on_trial_complete(_trial(4, epoch=3))
    assert writer.drain(60)
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert run.data.tags["stopped_early"] == "false"
    assert _history(client, rid) == [1, 2, 3] and _history(client, rid, "loss_msd") == [1, 2, 3]
    assert {a.path for a in client.list_artifacts(rid)} == {STUDENT_FILE, "model_card.md"}
    assert client.get_run(writer.runs.parent_run_id).data.tags["best_trial"] == "4"

    # A new process (a resumed driver) with an unreadable map finds the same run by its tag.
    (tmp_path / RUNS_FILE).write_text("{not json")
    writer2, rec2, _ = _setup(tmp_path, writer.runs.tracking_uri, log)
    writer2.runs = writer.runs
    outcomes = SimpleNamespace(
        status={4: "finished"}, errors={}, trial_ids={4: "abc"}, configs={4: t.config}
    )
    rows = {
        4: [
            {**_row(e), "trial_id": "abc", "config": json.dumps({"loss.tau": 0.1, "seed": 7})}
            for e in (1, 2, 3)
        ]
    }
    rec2.resync(rows, outcomes)
    assert writer2.drain(60)
    children = client.search_runs([writer.runs.experiment_id], "tags.trial_number = '4'")
    assert [c.info.run_id for c in children] == [rid]
    assert _history(client, rid) == [1, 2, 3]
    assert not [line for line in log if "warning" in line]


def test_permanent_and_transient_failures_are_told_apart() -> None:
    from mlflow.exceptions import MlflowException, RestException

    assert is_transient(
        MlflowException("API request to http://x failed with exception ConnectionError")
    )
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(
        RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "changed"})
    )
    assert not is_transient(ValueError("bug"))


@pytest.mark.integration
def test_tracking_server_outage_loses_nothing(tmp_path: Path) -> None:
    """The server goes away while trials report: updates wait, one line says so, one line
    says it is back, and afterwards every step is in MLflow exactly once."""
    port = free_port()
    server = start_mlflow(port, tmp_path / "server")
    log: list[str] = []
    try:
        writer, rec, client = _setup(tmp_path, f"http://127.0.0.1:{port}", log)
        t = _trial(0)
        rec.on_trial_start(t)
        rec.on_trial_result(t, _row(1))
        assert writer.drain(60)
        stop_group(server)
        for e in (2, 3):
            rec.on_trial_result(t, _row(e))
        rec.on_trial_complete(_trial(0, epoch=3))
        assert not writer.drain(3)  # waits, does not block the caller
        assert sum("unreachable" in line for line in log) == 1, log
        server = start_mlflow(port, tmp_path / "server")
        assert writer.drain(120)
        assert sum("is back after" in line for line in log) == 1, log
        rid = json.loads((tmp_path / RUNS_FILE).read_text())["0"]
        assert _history(client, rid) == [1, 2, 3]
        assert client.get_run(rid).info.status == "FINISHED"
    finally:
        stop_group(server)


def test_a_copied_search_directory_logs_into_its_own_store(tmp_path: Path) -> None:
    """tracking.json names the local store relative to the trials directory: a search copied
    elsewhere (with its trials directory) reopens its runs in the copy's mlflow.db, and what it
    logs then (a resume, the final stage, the report) never reaches the original's."""
    import shutil

    import yaml

    from searchkd.mlflow_ui import read_tracking
    from searchkd.report import analyze
    from searchkd.tracking import TRACKING_FILE, default_store, open_nested, open_search

    def search_of(trials: Path) -> Path:
        return trials / "s"

    first = tmp_path / "a" / "trials"
    search = search_of(first)
    search.mkdir(parents=True)
    (search / "space.yaml").write_text(yaml.safe_dump(tiny_space("s")))
    runs = open_search(
        search, "s", default_store(first), None, {}, search / "space.yaml", {"seed": 0}
    )
    assert json.loads((search / TRACKING_FILE).read_text())["store"] == "mlflow.db"
    copy = tmp_path / "b" / "trials"
    shutil.copytree(first, copy)
    original = MlflowClient(default_store(first))
    before = len(original.search_runs([runs.experiment_id]))

    again = open_search(
        search_of(copy), "s", default_store(copy), None, {}, search / "space.yaml", {"seed": 0}
    )
    assert again.tracking_uri == default_store(copy) != runs.tracking_uri
    assert again.parent_run_id == runs.parent_run_id  # the same run, in the copy's store
    nested = open_nested(again, search_of(copy) / "final" / TRACKING_FILE, "final", {}, {}, copy)
    MlflowClient(nested.tracking_uri).log_metric(nested.parent_run_id, "test_acc", 0.5)
    assert len(MlflowClient(default_store(copy)).search_runs([runs.experiment_id])) == before + 1
    assert len(original.search_runs([runs.experiment_id])) == before
    assert read_tracking(search_of(copy) / "final" / TRACKING_FILE, copy)["tracking_uri"] == (
        default_store(copy)
    )
    assert analyze(search_of(copy)).mlflow["tracking_uri"] == default_store(copy)
