"""Shared fixtures: tiny spaces on digits, and one Ray per test session for integration tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

# Ray 2.60 turns on token authentication; tests run a private local cluster without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Every Ray a test starts listens on 127.0.0.1 only (read when ray is first imported).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def tiny_space(name: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """A digits search small enough to run in seconds: 2 trials × 2 epochs of a 1/4-width resnet8."""
    space: dict[str, Any] = {
        "name": name,
        "objective": "msd",
        "data": {"dataset": "digits", "val_fraction": 0.15},
        "teacher": {"arch": "resnet8", "width": 0.5,
                    "train": {"epochs": 3, "batch_size": 64, "lr": 0.1, "lr_schedule": "cosine"}},
        "student": {"arch": "resnet8", "width": 0.25},
        "train": {"epochs": 2, "batch_size": 128, "lr": 0.1, "lr_schedule": "cosine"},
        "loss": {"layers": 1, "scales": [1, 2], "dim": 16},
        "search": {"num_samples": 2, "scheduler": "none", "max_concurrent": 2, "seed": 0,
                   "resources": {"cpu": 1, "gpu": 0}},
        "params": {"student.width": {"choice": [0.25, 0.5]},
                   "loss.tau": {"float": [0.05, 0.5], "log": True},
                   "loss.scales": {"choice": [[1], [1, 2]]}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(space.get(key), dict):
            space[key] = {**space[key], **value}
        else:
            space[key] = value
    return space


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


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


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
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
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
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
           str(root / "artifacts"), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: port_answers(port), "mlflow server answering", proc)
    return proc
