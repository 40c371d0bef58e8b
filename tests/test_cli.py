"""The command line: one-line errors with exit 2, and nothing written on a mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli as run

from searchkd.cli import main


def test_validate_shows_resolved_tunables(capsys, space_file) -> None:
    from searchkd.objectives import get_objective

    path = space_file()
    code, out, _ = run(capsys, "validate", str(path))
    assert code == 0
    resolved = get_objective("msd").resolve(yaml.safe_load(path.read_text())["loss"])
    assert resolved["scales"] == [1, 2] and resolved["tau"] != 0  # the space's, then defaults
    line = next(x for x in out.splitlines() if x.strip().startswith("msd: "))
    assert (
        f"tau={json.dumps(resolved['tau'])}" in line
        and f"scales={json.dumps(resolved['scales'])}" in line
    )
    assert any(x.strip().startswith("search loss.tau: ") for x in out.splitlines())


def test_objectives_lists_tunables_with_ranges(capsys) -> None:
    from searchkd.objectives import get_objective, objective_names

    code, out, _ = run(capsys, "objectives")
    assert code == 0
    lines = [x.split() for x in out.splitlines()]
    for name in objective_names():
        assert [name + ":"] == [x[0] for x in lines if x and x[0] == name + ":"]
    tau = get_objective("msd").tunables["tau"]
    msd_tau = [x for x in lines if x[:1] == ["loss.tau"]]
    assert ["loss.tau", tau.kind, "default", json.dumps(tau.default)] in [x[:4] for x in msd_tau]


def test_bad_space_is_one_line_exit_2_and_writes_nothing(
    capsys, tmp_path: Path, space_file
) -> None:
    path = space_file(student={"arch": "resnet8", "width": -1})
    trials = tmp_path / "trials"
    code, out, err = run(capsys, "tune", str(path), "--trials-dir", str(trials))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("searchkd: error: ") and "student.width" in err
    assert not trials.exists()


def test_missing_space_file(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "no such space file" in err


def test_existing_search_needs_resume(capsys, tmp_path: Path, space_file) -> None:
    (tmp_path / "t" / "tiny").mkdir(parents=True)
    (tmp_path / "t" / "tiny" / "space.yaml").write_text("name: tiny\n")
    code, _, err = run(capsys, "tune", str(space_file()), "--trials-dir", str(tmp_path / "t"))
    assert code == 2 and "already exists: add --resume" in err


def test_missing_teacher_checkpoint(capsys, tmp_path: Path, space_file) -> None:
    path = space_file(teacher={"arch": "resnet8", "checkpoint": str(tmp_path / "none.pth")})
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2 and "teacher.checkpoint: no such file" in err


def test_ui_binds_localhost_by_default() -> None:
    from searchkd.cli import build_parser

    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"


@pytest.mark.parametrize("argv", [["--version"], ["tune", "--help"]])
def test_help_and_version(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0


@pytest.mark.integration
def test_missing_dataset_is_one_line_and_writes_nothing(
    ray_session, capsys, tmp_path: Path, space_file
) -> None:
    path = space_file(
        data={
            "dataset": "cifar100",
            "root": str(tmp_path / "data"),
            "download": False,
            "val_fraction": 0.1,
        }
    )
    trials = tmp_path / "trials"
    code, _, err = run(capsys, "tune", str(path), "--trials-dir", str(trials))
    assert code == 2 and err.count("\n") == 1
    assert "data.dataset:" in err and str(tmp_path / "data") in err
    assert not (trials / "tiny").exists() and not (trials / "teachers").exists()


@pytest.mark.integration
def test_mismatched_teacher_checkpoint_is_one_line(
    ray_session, capsys, tmp_path: Path, space_file
) -> None:
    import torch

    from searchkd.models import build_model

    ckpt = tmp_path / "teacher.pth"
    torch.save({"model": build_model("resnet8", 10, width=1.0, in_channels=1).state_dict()}, ckpt)
    path = space_file(teacher={"arch": "resnet8", "width": 0.5, "checkpoint": str(ckpt)})
    code, _, err = run(capsys, "tune", str(path), "--trials-dir", str(tmp_path / "trials"))
    assert code == 2 and err.count("\n") == 1
    assert "teacher.checkpoint:" in err and "wrong shape keys" in err
    assert not (tmp_path / "trials" / "tiny").exists()


def test_validate_refuses_a_teacher_checkpoint_that_does_not_fit_as_tune_does(
    capsys, tmp_path: Path, space_file
) -> None:
    """`validate` says ok only for what `tune` accepts: the same one line as row 23."""
    import torch

    from searchkd.models import build_model

    ckpt = tmp_path / "teacher.pth"
    torch.save({"model": build_model("resnet8", 10, width=1.0, in_channels=1).state_dict()}, ckpt)
    path = space_file(teacher={"arch": "resnet8", "width": 0.5, "checkpoint": str(ckpt)})
    code, out, err = run(capsys, "validate", str(path))
    assert code == 2 and err.count("\n") == 1 and "ok" not in out
    assert err.startswith(f"searchkd: error: {path}: teacher.checkpoint: ")
    assert "does not fit the declared arch" in err and "wrong shape keys" in err
    torch.save(build_model("resnet8", 10, width=0.5, in_channels=1).state_dict(), ckpt)
    code, out, _ = run(capsys, "validate", str(path))
    assert code == 0 and ": ok" in out


def test_teacher_command_trains_once_then_reads_the_cache(
    capsys, tmp_path: Path, space_file
) -> None:
    path = str(space_file())
    code, out, _ = run(capsys, "teacher", path, "--trials-dir", str(tmp_path / "t"))
    assert code == 0 and "trained from the recipe" in out and "test_acc" in out
    assert [line.split(":")[0].strip() for line in out.splitlines() if "teacher epoch" in line] == [
        "teacher epoch 1/3",
        "teacher epoch 2/3",
        "teacher epoch 3/3",
    ]  # progress, one line an epoch
    code, again, _ = run(capsys, "teacher", path, "--trials-dir", str(tmp_path / "t"))
    assert code == 0 and "training teacher" not in again
    assert again.splitlines()[-3:] == out.splitlines()[-3:]


@pytest.mark.integration
def test_resources_beyond_the_cluster_are_refused(
    ray_session, capsys, tmp_path: Path, space_file
) -> None:
    path = space_file(search={"num_samples": 2, "resources": {"cpu": 4, "gpu": 0}})
    trials = tmp_path / "trials"
    code, _, err = run(capsys, "tune", str(path), "--trials-dir", str(trials))
    assert code == 2 and err.count("\n") == 1
    assert "search.resources.cpu: 4 per trial but this machine has 2 CPUs" in err
    assert not trials.exists()


def test_unwritable_trials_dir_is_refused(capsys, tmp_path: Path, space_file) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "tune", str(space_file()), "--trials-dir", str(blocker / "trials"))
    assert code == 2 and "is not writable" in err and str(blocker) in err


@pytest.mark.integration
def test_second_tune_of_a_running_search_is_refused(
    ray_session, capsys, tmp_path: Path, space_file
) -> None:
    from filelock import FileLock

    trials = tmp_path / "trials"
    trials.mkdir()
    with FileLock(str(trials / ".tiny.lock")):  # the first searchkd, still running
        code, _, err = run(capsys, "tune", str(space_file()), "--trials-dir", str(trials))
    assert code == 2 and "being run by another searchkd process" in err
    assert not (trials / "tiny").exists()
    # The lock file left behind (no holder: as after kill -9) does not block.
    assert (trials / ".tiny.lock").exists()
    code, _, _ = run(capsys, "teacher", str(space_file()), "--trials-dir", str(trials))
    assert code == 0


def test_resume_with_a_different_space_names_the_difference(
    capsys, tmp_path: Path, space_file
) -> None:
    import yaml

    from searchkd.api import load_space

    path = space_file()
    stored = tmp_path / "t" / "tiny"
    stored.mkdir(parents=True)
    (stored / "space.yaml").write_text(load_space(path).to_yaml())
    changed = yaml.safe_load(path.read_text())
    changed["train"]["lr"] = 0.2
    path.write_text(yaml.safe_dump(changed))
    code, _, err = run(capsys, "tune", str(path), "--resume", "--trials-dir", str(tmp_path / "t"))
    assert code == 2 and "differs from the space" in err and "train.lr: 0.1 -> 0.2" in err


def test_resume_of_a_finished_search_does_nothing(capsys, tmp_path: Path, space_file) -> None:
    from searchkd.api import load_space

    path = space_file()
    stored = tmp_path / "t" / "tiny"
    stored.mkdir(parents=True)
    (stored / "space.yaml").write_text(load_space(path).to_yaml())
    (stored / "state.json").write_text('{"status": "finished"}')
    for argv in (
        ["tune", str(path), "--resume", "--trials-dir", str(tmp_path / "t")],
        ["resume", str(stored)],
    ):
        code, out, _ = run(capsys, *argv)
        assert code == 0 and "already finished" in out


def test_resume_from_a_directory_that_is_not_a_search(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "resume", str(tmp_path))
    assert code == 2 and "not a search directory" in err


def test_ray_messages_become_one_line_each() -> None:
    """What Ray's driver printed when a node died (ANSI colour, a tab, a continuation line)."""
    import io

    from searchkd.cli import RayLines

    out = io.StringIO()
    lines = RayLines(out)
    lines.write("[     9s] trial 1 epoch 3/8 | 1/4 done\n")
    lines.write(
        "\x1b[33m(raylet)\x1b[0m The node with node id: "
        "ef0813caca5b71d753032b9b78cb8945387ef7f09bd726dd and address: 127.0.0.1 and node name: "
        "127.0.0.1 has been marked dead because the detector has missed too many heartbeats from "
        "it. This can happen when a \t(1) raylet crashes unexpectedly (OOM, etc.) \n\t(2) raylet "
        "has lagging heartbeats due to slow network or busy workload.\n"
    )
    lines.write(
        "\x1b[33m(raylet)\x1b[0m Task was killed due to the node running low on memory. Memory on "
        "the node was 23 GB.\n  details follow\n"
    )
    lines.write("searchkd: tracking server is back\n")
    lines.flush()
    assert out.getvalue().splitlines() == [
        "[     9s] trial 1 epoch 3/8 | 1/4 done",
        "searchkd: ray: lost node 127.0.0.1 (node ef0813ca): it stopped answering",
        "searchkd: ray: Task was killed due to the node running low on memory",
        "searchkd: tracking server is back",
    ]


def test_cluster_options_that_cannot_work_are_one_line(capsys, tmp_path: Path, space_file) -> None:
    """--num-cpus sizes a local Ray only; a trials directory is a local path (remote storage is
    --storage); a tracking server that does not answer is refused before anything starts."""
    from conftest import free_port

    trials = tmp_path / "trials"
    code, _, err = run(
        capsys,
        "tune",
        str(space_file()),
        "--trials-dir",
        str(trials),
        "--address",
        "127.0.0.1:6379",
        "--num-cpus",
        "2",
    )
    assert code == 2 and err.count("\n") == 1 and "--num-cpus sets the CPUs of a local Ray" in err
    code, _, err = run(capsys, "tune", str(space_file()), "--trials-dir", "s3://bucket/trials")
    assert code == 2 and err.count("\n") == 1 and "with --storage" in err
    code, _, err = run(
        capsys,
        "tune",
        str(space_file()),
        "--trials-dir",
        str(trials),
        "--tracking-uri",
        f"http://127.0.0.1:{free_port()}",
    )
    assert code == 2 and err.count("\n") == 1
    assert (
        err.startswith("searchkd: error: ")
        and ": --tracking-uri http://127.0.0.1:" in err
        and "not reachable" in err
    )
    assert not trials.exists()


def test_storage_option_is_part_of_the_resolved_space(
    tmp_path: Path, space_file, monkeypatch
) -> None:
    from searchkd.api import load_space

    monkeypatch.chdir(tmp_path)
    assert load_space(space_file(), "runs").search.storage == str(tmp_path / "runs")
    uri = "s3://bucket/p?endpoint_override=10.0.0.1:9000"
    assert load_space(space_file(), uri).search.storage == uri
    assert load_space(space_file()).search.storage is None


@pytest.mark.parametrize("kind", ["empty", "garbage", "plain pickle", "payload"])
def test_a_teacher_checkpoint_torch_will_not_load_is_one_line(
    capsys, tmp_path: Path, space_file, kind
) -> None:
    """Checked before the lock, Ray or anything else: one line, no lock file, nothing written."""
    import os
    import pickle

    import torch

    ckpt = tmp_path / "teacher.pth"
    if kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "garbage":
        ckpt.write_bytes(os.urandom(4096))
    elif kind == "plain pickle":
        ckpt.write_bytes(pickle.dumps({"model": {"conv1.weight": [[1.0]]}}))
    else:

        class Payload:
            def __reduce__(self):
                return (os.system, ("echo would-run",))

        torch.save({"model": Payload()}, ckpt)
    trials = tmp_path / "trials"
    code, out, err = run(
        capsys,
        "tune",
        str(space_file(teacher={"arch": "resnet8", "checkpoint": str(ckpt)})),
        "--trials-dir",
        str(trials),
    )
    assert code == 2 and err.count("\n") == 1, err
    assert (
        err.startswith("searchkd: error: ") and "teacher.checkpoint: " in err and str(ckpt) in err
    )
    assert "would-run" not in out + err
    assert not trials.exists()


def test_every_problem_known_before_ray_is_reported_at_once(
    capsys, tmp_path: Path, space_file
) -> None:
    path = space_file(
        teacher={"arch": "resnet8", "checkpoint": str(tmp_path / "none.pth")},
        data={
            "dataset": "cifar100",
            "root": str(tmp_path / "data"),
            "download": False,
            "val_fraction": 0.1,
        },
        search={"resources": {"cpu": 64, "gpu": 0.5}},
    )
    trials = tmp_path / "trials"
    code, _, err = run(capsys, "tune", str(path), "--trials-dir", str(trials))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 4, err
    assert all(line.startswith(f"searchkd: error: {path}: ") for line in lines)
    keys = [line.split(": ")[3] for line in lines]
    assert keys == [
        "data.dataset",
        "teacher.checkpoint",
        "search.resources.cpu",
        "search.resources.gpu",
    ]
    assert not trials.exists()


def test_a_batch_as_large_as_the_split_is_warned_about(capsys, tmp_path: Path, space_file) -> None:
    from searchkd import preflight
    from searchkd.api import load_space
    from searchkd.spec import Spec

    spec = load_space(
        space_file(
            train={"epochs": 1, "batch_size": 4096},
            data={"dataset": "digits", "val_fraction": 0.95},
        )
    )
    problems, warnings = preflight.check(spec, tmp_path / "t", None, True, None)
    assert problems == []
    assert [w.split(":")[0] for w in warnings] == ["data.val_fraction", "train.batch_size"]
    assert isinstance(spec, Spec)


@pytest.mark.integration
def test_ui_stops_with_its_server_and_refuses_a_busy_port(capsys, tmp_path: Path) -> None:
    """SIGTERM to `searchkd ui` (by its PID) stops MLflow's server and workers; a port in use
    is one line, exit 2."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from conftest import descendants, port_answers, wait_until
    from mlflow.tracking import MlflowClient

    trials = tmp_path / "trials"
    trials.mkdir()
    MlflowClient(f"sqlite:///{trials / 'mlflow.db'}").search_experiments()  # an (empty) store
    capsys.readouterr()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, _, err = run(
            capsys, "ui", "--trials-dir", str(trials), "--port", str(busy.getsockname()[1])
        )
    assert code == 2 and err.count("\n") == 1 and "choose another with --port" in err

    # --port 0: a free port, and the line names the one it serves on.
    proc = subprocess.Popen(
        [sys.executable, "-m", "searchkd.cli", "ui", "--trials-dir", str(trials), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("MLflow UI on http://127.0.0.1:"), line
        port = int(line.split("http://127.0.0.1:", 1)[1].split()[0])
        assert port > 0
        wait_until(lambda: port_answers(port), "the MLflow UI answering", proc)
        below = descendants(proc.pid)
        assert below, "the MLflow server runs below searchkd"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0

        def alive(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
            except OSError:
                return False

        wait_until(lambda: not any(alive(p) for p in below), "MLflow's processes gone", timeout=60)
        assert not port_answers(port)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "http"])
def test_ui_port_out_of_range_is_one_line(capsys, tmp_path: Path, port: str) -> None:
    code, out, err = run(capsys, "ui", "--trials-dir", str(tmp_path), "--port", port)
    assert code == 2 and err.count("\n") == 1 and not out
    assert err.startswith("searchkd: error: ui: argument --port: ") and "0 to 65535" in err


def test_ui_beyond_loopback_answers_for_this_machines_names() -> None:
    import socket

    from searchkd.cli import ui_command

    cmd, names = ui_command("sqlite:///x.db", "127.0.0.1", 5000, [])
    assert "--allowed-hosts" not in cmd and names == []
    cmd, names = ui_command("sqlite:///x.db", "0.0.0.0", 5000, ["ml.lab.example"])
    allowed = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert {
        socket.gethostname(),
        f"{socket.gethostname()}:*",
        "ml.lab.example:*",
        "127.0.0.1:*",
    } <= set(allowed)
    assert "0.0.0.0" not in names and "*" not in allowed


def test_a_wrong_argument_is_one_line_exit_2(capsys) -> None:
    code, out, err = run(capsys, "final", "trials/x", "--seeds", "0")
    assert code == 2 and out == ""
    assert err == "searchkd: error: final: argument --seeds: must be at least 1, got 0\n"
    code, _, err = run(capsys, "tune")
    assert (
        code == 2 and err.count("\n") == 1 and "the following arguments are required: space" in err
    )
    code, _, err = run(capsys, "nosuch")
    assert code == 2 and err.count("\n") == 1 and "invalid choice: 'nosuch'" in err


@pytest.mark.parametrize(
    ("student", "params", "fragment"),
    [
        (
            {"arch": "resnet8", "width": 1e9},
            {},
            "student.width: resnet8 at width 1e+09 cannot be built",
        ),
        (
            {"arch": "resnet8", "width": 0.25},
            {"student.width": {"float": [0.25, 300.0]}},
            "params.student.width: 300 makes resnet8 need about",
        ),
    ],
)
@pytest.mark.parametrize("command", ["validate", "tune"])
def test_a_student_too_large_for_the_machine_is_one_line(
    capsys, tmp_path: Path, space_file, student, params, fragment, command
) -> None:
    """Sized on the meta device (nothing allocated) against this machine's memory, before
    anything is written: not 50 trials failing on a 576 GB allocation."""
    path = space_file(student=student, params=params)
    trials = tmp_path / "trials"
    argv = [command, str(path)] + (["--trials-dir", str(trials)] if command == "tune" else [])
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and fragment in err, err
    assert err.startswith(f"searchkd: error: {path}: ")
    assert not trials.exists()


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("loop", "a symlink loop"),
        ("directory", "is a directory, not a file"),
        ("fifo", "is a named pipe (FIFO), not a file"),
        ("device", "/dev/zero is a device, not a file"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "tune"])
def test_a_checkpoint_that_is_not_a_file_says_what_it_is(
    capsys, tmp_path: Path, space_file, kind: str, fragment: str, command: str
) -> None:
    """Said as what it is, not "no such file", and never opened (a FIFO or /dev/zero would
    block or never end)."""
    import os

    ckpt = tmp_path / "t.pth"
    if kind == "loop":
        (tmp_path / "other").symlink_to(ckpt)
        ckpt.symlink_to(tmp_path / "other")
    elif kind == "directory":
        ckpt.mkdir()
    elif kind == "fifo":
        os.mkfifo(ckpt)
    else:
        ckpt = Path("/dev/zero")
    path = space_file(teacher={"arch": "resnet8", "checkpoint": str(ckpt)})
    trials = tmp_path / "trials"
    argv = [command, str(path)] + (["--trials-dir", str(trials)] if command == "tune" else [])
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{path}: teacher.checkpoint: " in err and fragment in err, err
    assert not trials.exists()


def test_a_trials_directory_that_is_a_symlink_loop_is_one_line(
    capsys, tmp_path: Path, space_file
) -> None:
    loop = tmp_path / "loop"
    (tmp_path / "back").symlink_to(loop)
    loop.symlink_to(tmp_path / "back")
    for argv in (
        ["tune", str(space_file()), "--trials-dir", str(loop)],
        ["resume", str(loop)],
        ["report", str(loop)],
    ):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1, (argv, err)
        assert f"{loop}: a symlink loop" in err, (argv, err)
