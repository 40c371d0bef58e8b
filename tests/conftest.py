"""Shared fixtures: tiny spaces on digits, and one Ray per test session for integration tests."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

# Ray 2.60 turns on token authentication; tests run a private local cluster without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tests run searches, Ray and servers side by side on a 2-core machine: one OpenMP thread per
# process keeps them from spinning against each other (about twice as fast here).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every Ray a test starts listens on 127.0.0.1 only (read when ray is first imported).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def tiny_space(name: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """A digits search small enough to run in seconds: 2 trials × 2 epochs of a 1/4-width
    resnet8."""
    space: dict[str, Any] = {
        "name": name,
        "objective": "msd",
        "data": {"dataset": "digits", "val_fraction": 0.15},
        "teacher": {
            "arch": "resnet8",
            "width": 0.5,
            "train": {"epochs": 3, "batch_size": 64, "lr": 0.1, "lr_schedule": "cosine"},
        },
        "student": {"arch": "resnet8", "width": 0.25},
        "train": {"epochs": 2, "batch_size": 128, "lr": 0.1, "lr_schedule": "cosine"},
        "loss": {"layers": 1, "scales": [1, 2], "dim": 16},
        "search": {
            "num_samples": 2,
            "scheduler": "none",
            "max_concurrent": 2,
            "seed": 0,
            "resources": {"cpu": 1, "gpu": 0},
        },
        "params": {
            "student.width": {"choice": [0.25, 0.5]},
            "loss.tau": {"float": [0.05, 0.5], "log": True},
            "loss.scales": {"choice": [[1], [1, 2]]},
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(space.get(key), dict):
            space[key] = {**space[key], **value}
        else:
            space[key] = value
    return space


def tune_command(space: Path, trials: Path, *extra: str, num_cpus: int | None = 2) -> list[str]:
    """`searchkd tune SPACE --trials-dir TRIALS` as a separate process (a driver a test can kill),
    on a local Ray of `num_cpus` CPUs (None: leave it out, e.g. with --address)."""
    cpus = ["--num-cpus", str(num_cpus)] if num_cpus is not None else []
    return [
        sys.executable,
        "-m",
        "searchkd.cli",
        "tune",
        str(space),
        "--trials-dir",
        str(trials),
        *cpus,
        *extra,
    ]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`searchkd ARGV` in this process: its exit code (argparse's too), stdout and stderr."""
    from searchkd.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code)
    out, err = capsys.readouterr()
    return code, out, err


def write_space(path: Path, space: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.fixture
def space_file(tmp_path: Path):
    def make(name: str = "tiny", **overrides: Any) -> Path:
        return write_space(tmp_path / f"{name}.yaml", tiny_space(name, **overrides))

    return make


@pytest.fixture(scope="session")
def ray_session():
    """Ray once per session: 2 CPUs, no dashboard (about 6 s here)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready, what: str, proc=None, timeout: float = 120.0, every: float = 0.1) -> None:
    """Wait for an event (a port answering, a file written). The deadline only ends a test
    whose event never comes; it is generous because CI machines are loaded."""
    import time

    deadline = time.time() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended (rc {proc.returncode}) first")
        if time.time() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:.0f}s")
        time.sleep(every)


def port_answers(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): Ray's workers leave their node's process group
    (setsid), so a whole node dies only when they are killed by PID too."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc) -> None:
    """SIGKILL a process a test started and everything below it, as if its machine died."""
    import signal

    pids = descendants(proc.pid)
    for pid in [proc.pid, *pids]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def stop_group(proc) -> None:
    """Stop a server a test started (in its own session) by its PID's process group."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except Exception:  # noqa: BLE001 - it would not stop: kill it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on 127.0.0.1 with a bucket `searchkd`; yields a
    storage URI prefix for it. Credentials are dummies in the environment."""
    import shutil
    import subprocess
    import sys

    os.environ.update(S3_ENV)
    port = free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: port_answers(port), "moto S3 server answering", proc)
        import pyarrow.fs as pafs

        base = f"s3://searchkd?endpoint_override=127.0.0.1:{port}&scheme=http&allow_bucket_creation=true"
        fs, _ = pafs.FileSystem.from_uri(base)
        fs.create_dir("searchkd")
        yield f"s3://searchkd/searches?endpoint_override=127.0.0.1:{port}&scheme=http"
    finally:
        stop_group(proc)


def start_mlflow(port: int, root: Path):
    """An `mlflow server` on 127.0.0.1:port with its store under `root` (same store on restart)."""
    import subprocess
    import sys

    root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    wait_until(lambda: port_answers(port), "mlflow server answering", proc)
    return proc


def rows(trials: Path, name: str) -> list[dict]:
    """The rows a search has recorded so far, read from its live record (results.jsonl; the
    Parquet table is rebuilt from it every few seconds)."""
    import json

    from searchkd.record import RESULTS_LOG

    path = trials / name / RESULTS_LOG
    out: list[dict] = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # the line being written
                continue
    return out


def assert_consistent(
    trials: Path, name: str, num_samples: int, epochs: int, tracking_uri: str | None = None
) -> list[dict]:
    """Every store holds exactly the study's trials, once each, with epochs in order, and the
    same score: Optuna's value, the last Parquet row's `score`, MLflow's `score` curve."""
    import optuna
    from mlflow.tracking import MlflowClient

    from searchkd.search import load_study

    study = load_study(trials / name, name)
    assert len(study.trials) == num_samples
    open_or_failed = {
        t.number: (t.state.name, t.user_attrs)
        for t in study.trials
        if t.state != optuna.trial.TrialState.COMPLETE
    }
    assert not open_or_failed, f"trials not complete: {open_or_failed}"

    table = rows(trials, name)
    keys = [(r["trial_number"], r["epoch"]) for r in table]
    assert len(keys) == len(set(keys)), "duplicated (trial, epoch) rows"
    assert {r["trial_number"] for r in table} == {t.number for t in study.trials}
    last: dict[int, dict] = {}
    for t in study.trials:
        mine = sorted((r for r in table if r["trial_number"] == t.number), key=lambda r: r["epoch"])
        assert [r["epoch"] for r in mine] == list(range(1, len(mine) + 1))
        last[t.number] = mine[-1]
        assert t.value == pytest.approx(mine[-1]["score"]), (
            f"trial {t.number}: Optuna and Parquet differ"
        )
        assert t.user_attrs["epochs"] == mine[-1]["epoch"] <= epochs

    client = MlflowClient(tracking_uri or f"sqlite:///{trials / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("searchkd.role") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == sorted(last)
    for child in children:
        assert child.info.status == "FINISHED" and "error" not in child.data.tags
        number = int(child.data.tags["trial_number"])
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert steps == sorted(steps) and len(steps) == len(set(steps)), "metric steps repeated"
        assert steps == list(range(1, last[number]["epoch"] + 1))
        assert child.data.metrics["score"] == pytest.approx(last[number]["score"])
    return table
