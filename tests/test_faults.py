"""Reliability: SIGKILL the whole search at several moments, resume, and prove nothing was lost
or duplicated; NaN trials fail alone. Marked integration and slow: each step starts Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import assert_consistent, rows, tiny_space, write_space
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis

from searchkd.search import RAY_DIR, load_study

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def command(space: Path, trials: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "searchkd.cli", "tune", str(space), "--trials-dir", str(trials),
            "--num-cpus", "2", *extra]


def run_until(cmd: list[str], ready: Callable[[], bool], timeout: float = 240) -> None:
    """Start the search and SIGKILL its whole process group (driver, Ray, trials) once `ready()`."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"search ended (rc {proc.returncode}) before the kill point")
            if time.time() > deadline:
                pytest.fail("kill point not reached in time")
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_sigkill_at_several_points_then_resume(tmp_path: Path) -> None:
    name, num_samples, epochs = "faults", 4, 5
    raw = tiny_space(name, train={**tiny_space()["train"], "epochs": epochs, "batch_size": 32})
    raw["teacher"]["train"]["epochs"] = 40  # long enough to be killed while it trains
    raw["search"].update(num_samples=num_samples, max_concurrent=2, scheduler="asha",
                         grace_period=2, reduction_factor=2)
    space = write_space(tmp_path / f"{name}.yaml", raw)
    trials = tmp_path / "trials"

    # 1. During teacher training: the per-epoch teacher state exists, the search does not.
    run_until(command(space, trials), lambda: any((trials / "teachers").glob("*/partial.pt")))
    assert not (trials / name / "space.yaml").exists()
    # 2. Early in the first trials.
    run_until(command(space, trials, "--resume"), lambda: len(rows(trials, name)) >= 3)
    # 3. Later, mid-search, with trials finished, stopped and running.
    before = len(rows(trials, name))
    run_until(command(space, trials, "--resume"), lambda: len(rows(trials, name)) >= before + 6)

    done = subprocess.run(command(space, trials, "--resume"), env=ENV, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    table = assert_consistent(trials, name, num_samples, epochs)
    assert max(r["start_epoch"] for r in table) >= 1, "no trial resumed from a checkpoint"

    again = subprocess.run(command(space, trials, "--resume"), env=ENV, capture_output=True, text=True)
    assert again.returncode == 0 and "already finished" in again.stdout


def test_nan_trial_fails_alone_and_the_search_goes_on(ray_session, tmp_path: Path) -> None:
    from searchkd.cli import main

    raw = tiny_space("nan")
    raw["search"].update(num_samples=3, sampler="random", seed=1)
    raw["params"] = {"train.lr": {"choice": [0.1, 1.0e12]}}
    space = write_space(tmp_path / "nan.yaml", raw)
    trials = tmp_path / "trials"
    assert main(["tune", str(space), "--trials-dir", str(trials)]) == 0

    analysis = ExperimentAnalysis(str(trials / "nan" / RAY_DIR))
    status = {t.trial_id: (t.status, t.config["train.lr"]) for t in analysis.trials}
    assert len(status) == 3
    assert {lr for s, lr in status.values() if s == "ERROR"} == {1.0e12}
    assert {lr for s, lr in status.values() if s == "TERMINATED"} == {0.1}

    client = MlflowClient(f"sqlite:///{trials / 'mlflow.db'}")
    exp = client.get_experiment_by_name("nan")
    for run in client.search_runs([exp.experiment_id], "tags.trial_id != ''"):
        if float(run.data.params["train.lr"]) > 1:
            assert run.info.status == "FAILED"
            assert "non-finite loss" in run.data.tags["error"]
        else:
            assert run.info.status == "FINISHED"
    study = load_study(trials / "nan", "nan")
    states = sorted(t.state.name for t in study.trials)
    assert states.count("FAIL") == sum(s == "ERROR" for s, _ in status.values())


def test_crashed_trial_is_retried_from_its_last_checkpoint(tmp_path: Path) -> None:
    """SIGKILL one trial's worker process: Tune retries it (search.max_failures) from its
    checkpoint, in the same MLflow run, and the search ends complete."""
    name, epochs = "crash", 6
    raw = tiny_space(name, train={**tiny_space()["train"], "epochs": epochs, "batch_size": 32})
    raw["search"].update(num_samples=2, max_concurrent=2, max_failures=2)
    space = write_space(tmp_path / f"{name}.yaml", raw)
    trials = tmp_path / "trials"
    proc = subprocess.Popen(command(space, trials), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not any(r["epoch"] >= 2 for r in rows(trials, name)):
            assert proc.poll() is None and time.time() < deadline, "no trial reached epoch 2"
            time.sleep(0.1)
        workers = subprocess.run(["pgrep", "-f", "ray::ImplicitFunc"], capture_output=True, text=True)
        pids = [int(p) for p in workers.stdout.split()]
        assert pids, "no trial worker found"
        os.kill(pids[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    table = assert_consistent(trials, name, 2, epochs)
    assert all(max(r["epoch"] for r in table if r["trial_id"] == t) == epochs
               for t in {r["trial_id"] for r in table})
    assert max(r["start_epoch"] for r in table) >= 1, "the retried trial restarted from epoch 0"
