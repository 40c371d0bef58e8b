"""Real searches through Ray Tune + Optuna + MLflow on digits (marked: they start Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
from conftest import rows as recorded
from conftest import tiny_space, tune_command, wait_until, write_space
from mlflow.tracking import MlflowClient

from searchkd.cli import main
from searchkd.record import JOURNAL_FILE, RESULTS_FILE
from searchkd.search import load_study

pytestmark = pytest.mark.integration


def mlflow_runs(trials: Path, name: str) -> tuple[list, list]:
    client = MlflowClient(f"sqlite:///{trials / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("searchkd.role") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_tiny_search_end_to_end(ray_session, tmp_path: Path, capsys) -> None:
    trials = tmp_path / "trials"
    space = write_space(tmp_path / "tiny.yaml", tiny_space())
    assert main(["tune", str(space), "--trials-dir", str(trials)]) == 0
    out = capsys.readouterr().out
    assert "best trial" in out and "searchkd ui" in out and "--resume" in out

    search = trials / "tiny"
    rows = pq.read_table(search / RESULTS_FILE).to_pylist()
    assert len(rows) == 4  # 2 trials × 2 epochs
    assert sorted((r["trial_number"], r["epoch"]) for r in rows) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(0.0 <= r["val_acc"] <= 1.0 and r["test_acc"] == r["test_acc"] for r in rows)

    study = load_study(search, "tiny")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert (search / JOURNAL_FILE).exists()

    client = MlflowClient(f"sqlite:///{trials / 'mlflow.db'}")
    parents, children = mlflow_runs(trials, "tiny")
    assert len(parents) == 1 and len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert parents[0].data.metrics["teacher_test_acc"] > 0
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["objective"] == "msd"
        assert {"student.width", "loss.tau", "loss.scales", "seed"} <= set(child.data.params)
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert sorted(steps) == [1, 2]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"student_best.pt", "model_card.md"} <= artifacts
    # Same rows in MLflow and Parquet: per trial, the val_acc curve matches.
    by_number = {int(c.data.tags["trial_number"]): c for c in children}
    for r in rows:
        hist = client.get_metric_history(by_number[r["trial_number"]].info.run_id, "val_acc")
        assert {m.step: m.value for m in hist}[r["epoch"]] == pytest.approx(r["val_acc"])

    # A finished search resumed: says so, does nothing.
    assert main(["tune", str(space), "--resume", "--trials-dir", str(trials)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert len(mlflow_runs(trials, "tiny")[1]) == 2

    # results.jsonl cut in the middle (as if restored from an older copy) by a driver killed
    # after: the record is rebuilt from results.parquet, which holds more, in one warning line,
    # and after the resume the record, the table, MLflow's steps and Optuna agree.
    from searchkd.record import RESULTS_LOG
    from searchkd.search import trial_scores
    from searchkd.spec import Spec

    log = search / RESULTS_LOG
    log.write_text(log.read_text().splitlines(keepends=True)[0])
    state = json.loads((search / "state.json").read_text())
    (search / "state.json").write_text(json.dumps({**state, "status": "interrupted"}))
    assert main(["tune", str(space), "--resume", "--trials-dir", str(trials)]) == 0
    out, err = capsys.readouterr()
    said = [line for line in out.splitlines() + err.splitlines() if "was cut short" in line]
    assert len(said) == 1 and "results.jsonl holds 1 rows and results.parquet 4" in said[0]
    record = [json.loads(line) for line in log.read_text().splitlines()]
    keys = sorted((r["trial_number"], r["epoch"]) for r in record)
    assert keys == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert len(pq.read_table(search / RESULTS_FILE)) == 4
    spec = Spec.model_validate(tiny_space())
    by_trial: dict[int, list] = {}
    for r in record:
        by_trial.setdefault(r["trial_number"], []).append(r)
    scores = trial_scores(by_trial, spec)
    study = load_study(search, "tiny")
    assert {t.number: t.value for t in study.trials} == pytest.approx(scores)
    for child in mlflow_runs(trials, "tiny")[1]:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert sorted(steps) == [1, 2]
    assert main(["report", str(search), "--no-mlflow"]) == 0
    assert "was cut short" not in "".join(capsys.readouterr())  # the record is whole again


def test_interrupted_search_resumes_without_duplicates(tmp_path: Path) -> None:
    """SIGKILL the whole search mid-trial (as if the machine died), then --resume."""
    trials = tmp_path / "trials"
    raw = tiny_space("kill", train={**tiny_space()["train"], "epochs": 6, "batch_size": 32})
    raw["search"].update(num_samples=3, max_concurrent=2)
    space = write_space(tmp_path / "kill.yaml", raw)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = tune_command(space, trials)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    results = trials / "kill" / RESULTS_FILE

    def mid_trial() -> bool:
        epochs = [r["epoch"] for r in recorded(trials, "kill")]
        return bool(epochs) and 2 <= max(epochs) < 6

    try:
        wait_until(mid_trial, "a trial between epochs 2 and 5", proc, timeout=1800)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {(r["trial_number"], r["epoch"]) for r in recorded(trials, "kill")}

    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]

    rows = pq.read_table(results).to_pylist()
    keys = [(r["trial_number"], r["epoch"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicated (trial, epoch) rows"
    assert {r["trial_number"] for r in rows} == {0, 1, 2}
    for n in (0, 1, 2):
        last = max(r["epoch"] for r in rows if r["trial_number"] == n)
        assert last == 6, (
            f"trial {n} ended at epoch {last}; before kill {sorted(before)}\n{done.stdout}"
        )
    assert before <= {(r["trial_number"], r["epoch"]) for r in rows}
    # At least one trial went on from a checkpoint instead of epoch 0.
    assert max(r["start_epoch"] for r in rows) >= 1

    study = load_study(trials / "kill", "kill")
    assert len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    parents, children = mlflow_runs(trials, "kill")
    assert len(parents) == 1 and len(children) == 3
    client = MlflowClient(f"sqlite:///{trials / 'mlflow.db'}")
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
