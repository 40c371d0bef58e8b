"""Reliability: SIGKILL the whole search at several moments, resume, and prove nothing was lost
or duplicated; NaN trials fail alone. Marked integration and slow: each step starts Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from conftest import (
    assert_consistent,
    descendants,
    free_port,
    rows,
    start_mlflow,
    stop_group,
    tiny_space,
    tune_command,
    wait_until,
    write_space,
)
from mlflow.tracking import MlflowClient

from searchkd.search import load_study

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


command = tune_command


def run_until(cmd: list[str], ready: Callable[[], bool]) -> None:
    """Start the search and SIGKILL its whole process group (driver, Ray, trials) once `ready()`:
    an event (rows recorded, a file present), however long a loaded machine takes to reach it."""
    proc = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_until(ready, "the kill point", proc, timeout=1800)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def trial_workers(proc: subprocess.Popen) -> list[int]:
    """PIDs of the trial processes of a search this test started (found below its driver)."""
    pids = []
    for pid in descendants(proc.pid):
        try:
            if b"ray::ImplicitFunc" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


def test_sigkill_at_several_points_then_resume(tmp_path: Path) -> None:
    name, num_samples, epochs = "faults", 4, 5
    raw = tiny_space(name, train={**tiny_space()["train"], "epochs": epochs, "batch_size": 32})
    raw["teacher"]["train"]["epochs"] = 20  # long enough to be killed while it trains
    raw["search"].update(
        num_samples=num_samples,
        max_concurrent=2,
        scheduler="asha",
        grace_period=2,
        reduction_factor=2,
    )
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

    done = subprocess.run(
        command(space, trials, "--resume"), env=ENV, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = assert_consistent(trials, name, num_samples, epochs)
    assert max(r["start_epoch"] for r in table) >= 1, "no trial resumed from a checkpoint"

    again = subprocess.run(
        command(space, trials, "--resume"), env=ENV, capture_output=True, text=True
    )
    assert again.returncode == 0 and "already finished" in again.stdout


def test_nan_trial_fails_alone_and_the_search_goes_on(ray_session, tmp_path: Path) -> None:
    from searchkd.cli import main

    raw = tiny_space("nan")
    raw["search"].update(num_samples=3, sampler="random", seed=1)
    raw["params"] = {"train.lr": {"choice": [0.1, 1.0e12]}}
    space = write_space(tmp_path / "nan.yaml", raw)
    trials = tmp_path / "trials"
    assert main(["tune", str(space), "--trials-dir", str(trials)]) == 0

    study = load_study(trials / "nan", "nan")
    status = {t.number: (t.state.name, t.params["train.lr"]) for t in study.trials}
    assert len(status) == 3
    assert {lr for s, lr in status.values() if s == "FAIL"} == {1.0e12}
    assert {lr for s, lr in status.values() if s == "COMPLETE"} == {0.1}
    assert all(
        "non-finite loss" in t.user_attrs["searchkd"]
        for t in study.trials
        if t.state.name == "FAIL"
    )

    client = MlflowClient(f"sqlite:///{trials / 'mlflow.db'}")
    exp = client.get_experiment_by_name("nan")
    runs = client.search_runs([exp.experiment_id], "tags.trial_number != ''")
    assert len(runs) == 3
    for run in runs:
        if float(run.data.params["train.lr"]) > 1:
            assert run.info.status == "FAILED"
            assert "non-finite loss" in run.data.tags["error"]
        else:
            assert run.info.status == "FINISHED"


def test_crashed_trial_is_retried_from_its_last_checkpoint(tmp_path: Path) -> None:
    """SIGKILL one trial's worker process: Tune retries it (search.max_failures) from its
    checkpoint, in the same MLflow run, and the search ends complete."""
    name, epochs = "crash", 6
    raw = tiny_space(name, train={**tiny_space()["train"], "epochs": epochs, "batch_size": 32})
    raw["search"].update(num_samples=2, max_concurrent=2, max_failures=2)
    space = write_space(tmp_path / f"{name}.yaml", raw)
    trials = tmp_path / "trials"
    proc = subprocess.Popen(
        command(space, trials),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: any(r["epoch"] >= 2 for r in rows(trials, name)),
            "a trial at epoch 2",
            proc,
            1800,
        )
        pids = trial_workers(proc)
        assert pids, "no trial worker found"
        os.kill(pids[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    table = assert_consistent(trials, name, 2, epochs)
    assert all(
        max(r["epoch"] for r in table if r["trial_number"] == n) == epochs
        for n in {r["trial_number"] for r in table}
    )
    assert max(r["start_epoch"] for r in table) >= 1, "the retried trial restarted from epoch 0"


def _reader(proc: subprocess.Popen) -> list[str]:
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    import threading

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_a_failed_trial_run_again_on_resume_ends_complete_everywhere(tmp_path: Path) -> None:
    """A trial fails (its process is killed, no retries), the search is interrupted, and the
    resume runs the trial again from its saved epoch: Optuna COMPLETE with the value MLflow
    and Parquet hold, its MLflow run FINISHED without the stale error tag."""
    name, epochs = "rerun", 8
    raw = tiny_space(name, train={**tiny_space()["train"], "epochs": epochs, "batch_size": 32})
    raw["search"].update(num_samples=3, max_concurrent=2, max_failures=0)
    space = write_space(tmp_path / f"{name}.yaml", raw)
    trials = tmp_path / "trials"
    client = MlflowClient(f"sqlite:///{trials / 'mlflow.db'}")
    proc = subprocess.Popen(
        command(space, trials),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out = _reader(proc)
    try:
        # Both running trials have saved an epoch (on a loaded machine one may lag far behind
        # the other): whichever worker is killed, its trial has a state to resume from.
        wait_until(
            lambda: len({r["trial_number"] for r in rows(trials, name) if r["epoch"] >= 1}) >= 2,
            "two trials past epoch 1",
            proc,
            1800,
        )
        victim = trial_workers(proc)
        assert victim, "no trial worker found"
        os.kill(victim[0], signal.SIGKILL)
        wait_until(
            lambda: any("FAILED" in line for line in out), "the trial reported failed", proc, 1800
        )

        def failed_runs() -> list:
            exp = client.get_experiment_by_name(name)
            return (
                client.search_runs([exp.experiment_id], "attributes.status = 'FAILED'")
                if exp
                else []
            )

        wait_until(lambda: failed_runs(), "its MLflow run marked FAILED", proc, 1800)
        failed = failed_runs()[0]
        number = int(failed.data.tags["trial_number"])
        assert failed.data.tags["error"]
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state and fit() returns
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, "\n".join(out)  # Ctrl-C
    assert any("continue with: searchkd tune" in line for line in out)
    study = load_study(trials / name, name)
    assert (
        study.trials[number].state == optuna.trial.TrialState.RUNNING
    )  # not FAIL: it may run again

    done = subprocess.run(
        command(space, trials, "--resume"), env=ENV, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = assert_consistent(trials, name, 3, epochs)
    mine = sorted((r for r in table if r["trial_number"] == number), key=lambda r: r["epoch"])
    assert mine[-1]["epoch"] == epochs and max(r["start_epoch"] for r in mine) >= 1
    again = client.get_run(failed.info.run_id)
    assert again.info.status == "FINISHED" and "error" not in again.data.tags
    trial = load_study(trials / name, name).trials[number]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.value == pytest.approx(mine[-1]["score"])  # its kept student's, not the last


def test_tracking_store_away_at_the_end_stops_in_one_line_and_resume_sends_the_rest(
    tmp_path: Path,
) -> None:
    """The server goes away and stays away past the end of the search: the search ends
    with one line and the resume command, state interrupted; the resume sends the rest."""
    name, epochs = "away", 4
    raw = tiny_space(name, train={**tiny_space()["train"], "epochs": epochs})
    space = write_space(tmp_path / f"{name}.yaml", raw)
    trials = tmp_path / "trials"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow(port, tmp_path / "server")
    try:
        env = {**ENV, "SEARCHKD_TRACKING_WAIT": "3"}
        proc = subprocess.Popen(
            command(space, trials, "--tracking-uri", uri),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        out = _reader(proc)
        try:
            wait_until(lambda: rows(trials, name), "a first epoch", proc, 1800)
            stop_group(server)
            proc.wait(timeout=1800)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = "\n".join(out)
        assert proc.returncode == 1, text
        assert sum("unreachable" in line for line in out) == 1, text
        assert any("did not take" in line and "--resume" in line for line in out), text
        assert any("continue with: searchkd tune" in line for line in out), text
        assert "Traceback" not in text
        state = json.loads((trials / name / "state.json").read_text())
        assert state["status"] == "interrupted" and state["tracking_pending"] is True
        assert len(rows(trials, name)) == 2 * epochs  # training finished regardless

        server = start_mlflow(port, tmp_path / "server")
        done = subprocess.run(
            command(space, trials, "--resume", "--tracking-uri", uri),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert json.loads((trials / name / "state.json").read_text())["status"] == "finished"
        assert_consistent(trials, name, 2, epochs, tracking_uri=uri)
    finally:
        stop_group(server)


@pytest.mark.parametrize("pack", [1, 4], ids=["unpacked", "pack4"])
def test_an_interrupted_search_decides_as_an_uninterrupted_one(tmp_path: Path, pack: int) -> None:
    """The same seeded search, two trials (two cohorts of 4 when packed) at once, run straight
    through on 2 CPUs, and killed (SIGKILL of the whole process group) at two points with a
    resume after each on 1 CPU, so that the rest runs one at a time: the same trials with the
    same values, stopped by ASHA at the same epochs, with the same Optuna values."""
    name, epochs = "same", 5
    num_samples = 5 if pack == 1 else 8
    raw = tiny_space(name, train={**tiny_space()["train"], "epochs": epochs, "batch_size": 32})
    raw["search"].update(
        num_samples=num_samples,
        max_concurrent=2,
        scheduler="asha",
        grace_period=1,
        reduction_factor=2,
        seed=3,
        pack=pack,
    )
    space = write_space(tmp_path / f"{name}.yaml", raw)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(
        command(space, straight), env=ENV, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def one_cpu(*extra: str) -> list[str]:
        return command(space, killed, *extra, num_cpus=1)

    run_until(command(space, killed), lambda: len(rows(killed, name)) >= 3)
    before = len(rows(killed, name))
    run_until(one_cpu("--resume"), lambda n=before + 5: len(rows(killed, name)) >= n)
    done = subprocess.run(one_cpu("--resume"), env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def outcome(trials: Path) -> dict[int, tuple]:
        table = rows(trials, name)
        study = load_study(trials / name, name)
        return {
            t.number: (
                t.params,
                max(r["epoch"] for r in table if r["trial_number"] == t.number),
                t.user_attrs["stopped_early"],
                t.value,
            )
            for t in study.trials
        }

    a, b = outcome(straight), outcome(killed)
    assert b == a
    assert any(stopped for _, _, stopped, _ in a.values()), (
        "ASHA stopped no trial: the test shows nothing"
    )
    assert any(not stopped for _, _, stopped, _ in a.values())
    assert max(r["start_epoch"] for r in rows(killed, name)) >= 1, "no trial resumed mid-way"
    assert_consistent(killed, name, num_samples, epochs)


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _can_unshare(), reason="unshare --mount is not permitted here (needs root)")
def test_a_full_disk_stops_the_search_in_one_line_and_a_resume_after_freeing_space_ends_it(
    tmp_path: Path,
) -> None:
    """The trials directory is a small tmpfs: full at the start (one line, exit 2), filled up
    in the middle (one line, exit 1, state interrupted, trials left open), then freed: the
    resume ends with every store exact."""
    name, num_samples, epochs = "full", 2, 4
    raw = tiny_space(name, train={**tiny_space()["train"], "epochs": epochs, "batch_size": 32})
    raw["search"].update(num_samples=num_samples, max_concurrent=2)
    space = write_space(tmp_path / f"{name}.yaml", raw)
    out = tmp_path / "out"
    out.mkdir()
    script = Path(__file__).with_name("disk_full.py")
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            str(script),
            str(space),
            str(tmp_path / "trials"),
            str(out),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())

    start = report["start"]
    assert start["rc"] == 2, start
    assert start["stderr"].count("\n") == 1 and "no space left on device" in start["stderr"], start
    assert "Traceback" not in start["stdout"] + start["stderr"]

    middle = report["middle"]
    text = middle["stdout"] + middle["stderr"]
    assert middle["rc"] == 1, text[-3000:]
    assert (
        sum(
            "searchkd: error: " in line and "no space left on device" in line
            for line in text.splitlines()
        )
        == 1
    ), text
    assert "Traceback" not in text, text[-3000:]
    assert "continue with: searchkd tune" in text

    resume = report["resume"]
    assert resume["rc"] == 0, (resume["stdout"] + resume["stderr"])[-3000:]
    trials = out / "trials"
    assert json.loads((trials / name / "state.json").read_text())["status"] == "finished"
    assert_consistent(trials, name, num_samples, epochs)


def test_sigterm_is_ctrl_c_and_the_printed_hint_continues_this_search(tmp_path: Path) -> None:
    """SIGTERM to the driver (what Slurm and Kubernetes send before a kill) ends the search as
    Ctrl-C does: exit 143, state `interrupted`, the resume hint, no Ray stack dump. The hint,
    run exactly as printed from the same directory, continues this search (in its own trials
    directory, not a new one in ./trials), and its first progress line is a new epoch, not one
    a resumed trial replays."""
    import shlex

    name, epochs = "sigterm", 3
    raw = tiny_space(name, train={**tiny_space()["train"], "epochs": epochs, "batch_size": 32})
    (tmp_path / "my spaces").mkdir()
    space = write_space(tmp_path / "my spaces" / f"{name}.yaml", raw)
    trials = tmp_path / "else where" / "t3"
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen(
        command(space, trials),
        env=ENV,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out = _reader(proc)
    try:
        wait_until(lambda: rows(trials, name), "a trial reported an epoch", proc, 1800)
        os.kill(proc.pid, signal.SIGTERM)  # the driver only, as a scheduler signals it
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = "\n".join(out)
    assert proc.returncode == 143, text
    assert "SIGTERM received" not in text and "Traceback" not in text, text
    state = json.loads((trials / name / "state.json").read_text())
    assert state["status"] == "interrupted"
    hint = next(line for line in out if "continue with: " in line).split("continue with: ")[1]
    assert hint == (
        f"searchkd tune {shlex.quote(str(space))} --resume --trials-dir "
        f"{shlex.quote(str(trials))} --num-cpus 2"
    )
    recorded = {(r["trial_number"], r["epoch"]) for r in rows(trials, name)}

    argv = shlex.split(hint)
    assert argv[0] == "searchkd"
    done = subprocess.run(
        [sys.executable, "-m", "searchkd.cli", *argv[1:]],
        env=ENV,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (work / "trials").exists(), "the hint started a new search in ./trials"
    assert_consistent(trials, name, 2, epochs)
    first = next(line for line in done.stdout.splitlines() if "] trial " in line)
    number, epoch = first.split("] trial ")[1].split()[0], first.split(" epoch ")[1].split("/")[0]
    assert (int(number), int(epoch.split()[0])) not in recorded, first
    lines = done.stdout.splitlines()
    assert f"searchkd ui --trials-dir {shlex.quote(str(trials))}" in next(
        line for line in lines if line.startswith("compare trials:")
    )


def test_a_search_whose_every_trial_failed_has_its_summary_and_report(
    ray_session, tmp_path: Path, capsys
) -> None:
    from searchkd.cli import main

    raw = tiny_space("allfail")
    raw["params"] = {"train.lr": {"choice": [1.0e12]}}
    space = write_space(tmp_path / "allfail.yaml", raw)
    trials = tmp_path / "trials"
    assert main(["tune", str(space), "--trials-dir", str(trials)]) == 0  # finished, as documented
    out = capsys.readouterr().out
    assert "search allfail: 2 trials (0 finished, 0 stopped early by ASHA, 2 failed)" in out
    assert "no best trial: every trial failed" in out
    assert "report: " in out and (trials / "allfail" / "report" / "index.html").is_file()
