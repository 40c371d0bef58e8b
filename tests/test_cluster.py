"""A search on a two-node Ray cluster whose worker cannot see the driver's disk.

Everything listens on 127.0.0.1 and is stopped by its own PID's process group: a Ray head
and a Ray worker node (built like ray.cluster_utils does, so they stay on loopback), an
S3-compatible server (moto) as the trials' storage, and an `mlflow server` as the tracking
URI. The worker node runs in a private mount namespace with a tmpfs over the test's folder,
so the search directory and the teacher cache do not exist there, as on a second machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
from conftest import (
    assert_consistent,
    free_port,
    kill_tree,
    rows,
    start_mlflow,
    stop_group,
    tiny_space,
    tune_command,
    wait_until,
    write_space,
)
from mlflow.tracking import MlflowClient

from searchkd.record import STORAGE_FILE
from searchkd.search import load_study
from searchkd.storage import STATE_FILE, STUDENT_FILE, Storage, trial_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NODE = Path(__file__).with_name("ray_node.py")
ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def start_node(args: list[str], hide: Path | None = None) -> tuple[subprocess.Popen, dict]:
    """A Ray node in its own session; with `hide`, in a mount namespace where `hide` is empty."""
    cmd = [sys.executable, str(NODE), *args]
    if hide is not None:
        cmd = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount -t tmpfs tmpfs "{hide}" && exec "$@"',
            "sh",
            *cmd,
        ]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    line = proc.stdout.readline()
    if not line:
        stop_group(proc)
        pytest.fail(f"Ray node {args[0]} did not start (rc {proc.poll()})")
    return proc, json.loads(line)


class Output:
    """The driver's output, read as it comes."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def text(self) -> str:
        self._thread.join(timeout=5)
        return "\n".join(self.lines)


@pytest.fixture(scope="module")
def head(s3_server: str):
    """A Ray head node on 127.0.0.1 (1 CPU) shared by this module's tests; it starts after
    the S3 server so that its processes have the (dummy) credentials, as every node needs."""
    if not _can_unshare():
        pytest.skip("unshare --mount is not permitted here (needs root)")
    proc, info = start_node(["head", "1"])
    yield info
    stop_group(proc)


def run_driver(
    space: Path, trials: Path, head: dict, *extra: str
) -> tuple[subprocess.Popen, Output]:
    cmd = tune_command(space, trials, "--address", head["gcs"], *extra, num_cpus=None)
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return proc, Output(proc)


def test_without_address_a_search_gets_a_private_ray_on_loopback(
    head: dict, tmp_path: Path
) -> None:
    """A Ray already runs on this machine and RAY_ADDRESS points at it: a search without
    --address still starts its own (so --num-cpus applies), listening on 127.0.0.1."""
    space = write_space(tmp_path / "own.yaml", tiny_space("own"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env.update(RAY_ADDRESS=head["gcs"], RAY_AUTH_MODE="disabled")
    cmd = [
        sys.executable,
        "-m",
        "searchkd.cli",
        "tune",
        str(space),
        "--trials-dir",
        str(tmp_path / "trials"),
        "--num-cpus",
        "1",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = rows(tmp_path / "trials", "own")
    assert len(table) == 4
    assert {r["node_ip"] for r in table} == {"127.0.0.1"}
    assert head["node_id"] not in {r["node_id"] for r in table}


def test_a_trials_directory_the_other_node_cannot_see_is_refused(
    head: dict, tmp_path: Path
) -> None:
    """Without search.storage trials would write to the driver's disk: on a cluster whose
    worker does not see it, the search is refused before anything is written."""
    worker_proc, worker = start_node(["worker", "1", head["gcs"]], hide=tmp_path)
    try:
        space = write_space(tmp_path / "local.yaml", tiny_space("local"))
        driver, out = run_driver(space, tmp_path / "trials", head)
        driver.wait(timeout=300)
        lines = out.text().strip().splitlines()
    finally:
        stop_group(worker_proc)
    assert driver.returncode == 2
    assert len(lines) == 1, lines
    assert (
        lines[0].startswith("searchkd: error: ")
        and f"is not reachable from 127.0.0.1 (node {worker['node_id'][:8]})" in lines[0]
        and "set search.storage" in lines[0]
    ), lines
    assert (
        not (tmp_path / "trials" / "local").exists()
        and not (tmp_path / "trials" / "teachers").exists()
    )


def test_a_node_without_the_dataset_fails_its_trial_in_one_line(
    head: dict, s3_server: str, tmp_path: Path
) -> None:
    """The dataset lives on the driver's disk only: each trial placed on the other node fails
    with one line naming that node and the path, the others finish; the teacher checkpoint,
    also only on the driver's disk, reaches both nodes through Ray."""
    from test_data import write_imagefolder
    from test_real_scale import public_teacher

    write_imagefolder(tmp_path / "images", train_per_class=24, val_per_class=2)
    classes = len(list((tmp_path / "images" / "train").iterdir()))
    teacher = public_teacher(tmp_path / "teacher.pth", "resnet8", classes, width=0.5)
    num_samples = 4
    space = write_space(
        tmp_path / "nodata.yaml",
        {
            "name": "nodata",
            "objective": "kd",
            "data": {
                "dataset": "imagefolder",
                "root": str(tmp_path / "images"),
                "val_fraction": 0.25,
                "options": {"image_size": 32, "num_workers": 0},
            },
            "teacher": {"arch": "resnet8", "width": 0.5, "checkpoint": str(teacher)},
            "student": {"arch": "resnet8", "width": 0.25},
            "train": {"epochs": 4, "batch_size": 8, "lr": 0.05},
            "search": {
                "num_samples": num_samples,
                "max_concurrent": 2,
                "scheduler": "none",
                "sampler": "random",
                "resources": {"cpu": 1, "gpu": 0},
            },
            "params": {"loss.kd_temperature": {"float": [2.0, 6.0]}},
        },
    )
    worker_proc, worker = start_node(["worker", "1", head["gcs"]], hide=tmp_path)
    try:
        driver, out = run_driver(space, tmp_path / "trials", head, "--storage", s3_server)
        driver.wait(timeout=600)
        text = out.text()
    finally:
        stop_group(worker_proc)
    assert driver.returncode == 0, text
    failed = [line for line in text.splitlines() if "data.dataset:" in line]
    assert failed, f"no trial was placed on the worker node:\n{text}"
    for line in failed:
        assert (
            f"node 127.0.0.1 (node {worker['node_id'][:8]}): data.dataset: imagefolder: "
            f"{tmp_path / 'images' / 'train'} not found" in line
        ), text
    k = len(failed)
    assert (
        f"{num_samples} trials ({num_samples - k} finished, 0 stopped early by ASHA, {k} failed)"
        in text
    ), text
    assert "Traceback" not in text
    table = rows(tmp_path / "trials", "nodata")
    assert {r["node_id"] for r in table} == {head["node_id"]}
    study = load_study(tmp_path / "trials" / "nodata", "nodata")
    states = [t.state.name for t in study.trials]
    assert sorted(states) == ["COMPLETE"] * (num_samples - k) + ["FAIL"] * k
    for t in study.trials:
        if t.state.name == "FAIL":
            assert (
                t.user_attrs["searchkd"].startswith("failed: node 127.0.0.1")
                and "data.dataset" in t.user_attrs["searchkd"]
            )


def test_search_on_two_nodes_with_object_storage_and_a_tracking_server(
    head: dict, s3_server: str, tmp_path: Path
) -> None:
    name, num_samples, epochs = "cluster", 4, 8
    raw = tiny_space(name, train={**tiny_space()["train"], "epochs": epochs, "batch_size": 32})
    raw["search"].update(
        num_samples=num_samples, max_concurrent=2, max_failures=2, scheduler="none"
    )
    space = write_space(tmp_path / f"{name}.yaml", raw)
    trials = tmp_path / "trials"
    port = free_port()
    tracking_uri = f"http://127.0.0.1:{port}"
    servers = (
        tmp_path.parent / f"{tmp_path.name}-servers"
    )  # outside the hidden folder: the test's own
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["mlflow"] = start_mlflow(port, servers / "mlflow")
        procs["worker"], worker = start_node(["worker", "1", head["gcs"]], hide=tmp_path)
        driver, out = run_driver(
            space, trials, head, "--storage", s3_server, "--tracking-uri", tracking_uri
        )
        procs["driver"] = driver

        def on(node: dict, min_epoch: int = 1) -> list[dict]:
            return [
                r
                for r in rows(trials, name)
                if r.get("node_id") == node["node_id"] and r["epoch"] >= min_epoch
            ]

        # 1. A trial on the worker node reaches epoch 2; the worker node dies (SIGKILL of its
        #    raylet, its trial's process and everything else it started).
        wait_until(
            lambda: on(worker, 2), "a trial on the worker node at epoch 2", driver, timeout=600
        )
        lost = {r["trial_number"] for r in on(worker)}
        kill_tree(procs["worker"])  # its raylet and the trial's worker process: the machine is gone

        # 2. The lost trial goes on on the head node from its saved epoch.
        def resumed() -> list[dict]:
            return [r for r in on(head) if r["trial_number"] in lost and r["start_epoch"] >= 2]

        wait_until(
            lambda: resumed(), "the lost trial resumed on the head node", driver, timeout=600
        )

        # 3. The tracking server goes away while trials report, longer than the driver's first
        #    retries (it backs off), then comes back on the same store.
        stop_group(procs.pop("mlflow"))
        before = len(rows(trials, name))
        wait_until(
            lambda: (
                out.count("unreachable")
                and (len(rows(trials, name)) >= before + 3 or out.count("waiting up to"))
            ),
            "training going on while the tracking server is away",
            driver,
            timeout=600,
        )
        procs["mlflow"] = start_mlflow(port, servers / "mlflow")
        driver.wait(timeout=900)
        text = out.text()
        print(text)  # shown by pytest when the test fails
        assert driver.returncode == 0, text[-4000:]
        stop_group(procs.pop("worker"))

        # Every store holds exactly the trials, once each, every metric step once.
        table = assert_consistent(trials, name, num_samples, epochs, tracking_uri=tracking_uri)
        assert {r["node_id"] for r in table} >= {head["node_id"], worker["node_id"]}, (
            "trials ran on both nodes"
        )
        mine = sorted((r for r in table if r["trial_number"] in lost), key=lambda r: r["epoch"])
        assert any(r["node_id"] == worker["node_id"] for r in mine)
        assert any(r["node_id"] == head["node_id"] and r["start_epoch"] >= 2 for r in mine), (
            "the lost trial did not resume from its checkpoint on the other node"
        )
        assert all(r["epoch"] <= epochs for r in table) and max(r["epoch"] for r in mine) == epochs

        # The trials' files are on the object store, not on the driver's disk.
        uri = json.loads((trials / name / STORAGE_FILE).read_text())["uri"]
        assert uri.startswith("s3://searchkd/searches/cluster-")
        storage = Storage(uri)
        for number in range(num_samples):
            assert storage.list(trial_key(number)) == [STATE_FILE, STUDENT_FILE]
        assert not (trials / name / "checkpoints").exists()

        # Outcomes: all finished; one line for the outage, one when it is back; no traceback.
        study = load_study(trials / name, name)
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * num_samples
        assert (
            f"{num_samples} trials ({num_samples} finished, 0 stopped early by ASHA, 0 failed)"
            in text
        )
        assert out.count("unreachable") == 1 and out.count("is back after") == 1, text
        assert "Traceback" not in text and "View run" not in text and "UserWarning" not in text, (
            text
        )
        # Ray's own report of the lost node (if it came before the search ended) is one line.
        lost_lines = [line for line in text.splitlines() if "lost node" in line]
        assert "(raylet)" not in text and lost_lines in (
            [],
            [
                f"searchkd: ray: lost node 127.0.0.1 (node {worker['node_id'][:8]}): it stopped "
                f"answering"
            ],
        ), text
        client = MlflowClient(tracking_uri)
        children = client.search_runs(
            [client.get_experiment_by_name(name).experiment_id], "tags.trial_number != ''"
        )
        assert all("error" not in c.data.tags for c in children)
    finally:
        for proc in procs.values():
            stop_group(proc)
