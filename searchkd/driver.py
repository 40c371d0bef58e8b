"""The driver: what a search and its final stage both stand on, on the machine that runs them.

Both run their trials as Ray Tune trials through `train_trial` and the search's storage, and
record them the same way: each reported row into a results table, each trial into its MLflow
run, each end into the progress lines. This module holds that common part: starting (or
joining) Ray and checking the storage every node must reach, the live `Session` that Tune's
callback and stopper reach, `fit` under Ctrl-C, the wait for a tracking store that is away,
state.json, and `drive`, the one routine both follow:

    open MLflow -> results table -> session -> Tuner -> fit -> resync -> drain -> status

What differs (the study and its searcher, the final stage's plan, their progress lines, how
packed students end) comes in through the small `Stage`, `RunProgress` and packing
`Protocol`s below.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
import ray
from ray import tune
from ray.tune import Callback

from . import tracking
from .engine import DataShape, trial_memory
from .record import STATE_FILE, STORAGE_FILE, Log, ResultsTable
from .spec import Spec, students_of
from .storage import Storage, StorageError, disk_full, replace_atomically
from .teacher import TeacherInfo
from .trial import train_trial


def say(text: str) -> None:
    """The default log: a line at a time, flushed (progress is read as it comes)."""
    print(text, flush=True)


RAY_DIR = "ray"
CHECKPOINTS_DIR = "checkpoints"  # the trials' storage when the space names none
# How long the end of a search waits for a tracking server that is away, before it stops
# with the resume command (the resume sends what is missing).
TRACKING_WAIT_S = float(os.environ.get("SEARCHKD_TRACKING_WAIT", "600"))


class SearchError(RuntimeError):
    """A search that cannot start or resume for a reason the user can fix: one line."""


class RunProgress(Protocol):
    """The progress lines of a run: told by the callback as its trials report and end."""

    def on_trial_result(
        self, trial: Any, result: dict, trials: list, replayed: bool = False
    ) -> None: ...

    def on_trial_complete(self, trial: Any, trials: list) -> None: ...

    def on_trial_error(
        self, trial: Any, trials: list, numbers: list[int] | None = None
    ) -> None: ...

    def on_trial_recover(self, trial: Any, trials: list) -> None: ...


class StudentProgress(RunProgress, Protocol):
    """The progress of packed trials, whose students end one by one."""

    ended: set[int]

    def on_student_end(self, number: int, how: str, result: dict, trials: list) -> None: ...


class Stops(Protocol):
    """How the students of packed trials end: decided on the driver per reported epoch. Each
    returns the students that end now: (Tune trial, number, last row, "finished"|"stopped")."""

    def decide(self, trial: Any, number: int, result: dict) -> list[tuple[Any, int, dict, str]]: ...

    def failed(self, numbers: list[int]) -> list[tuple[Any, int, dict, str]]: ...


class Teller(Protocol):
    """Whoever records a packed student's end (the search's study)."""

    def tell(self, number: int, result: dict) -> None: ...


class Configs(Protocol):
    """A trial's config from its recorded params (the search's space)."""

    def config_of(self, params: dict[str, Any], number: int) -> dict[str, Any]: ...


@dataclass
class Outcomes:
    """How each trial of the search stands, read from the study (the record of which trials
    exist and how they ended) and from the trials this run saw fail."""

    status: dict[int, str] = field(
        default_factory=dict
    )  # number -> finished|stopped|failed|unfinished
    errors: dict[int, str] = field(default_factory=dict)
    trial_ids: dict[int, str] = field(default_factory=dict)
    configs: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        study: optuna.Study,
        space: Configs,
        failed_now: dict[int, str],
        trial_ids: dict[int, str],
    ) -> Outcomes:
        out = cls(trial_ids=dict(trial_ids))
        for t in study.trials:
            out.configs[t.number] = space.config_of(t.params, t.number)
            if t.state == optuna.trial.TrialState.COMPLETE:
                out.status[t.number] = (
                    "stopped" if t.user_attrs.get("stopped_early") else "finished"
                )
            elif t.state == optuna.trial.TrialState.FAIL:
                out.status[t.number] = "failed"
                out.errors[t.number] = str(t.user_attrs.get("searchkd", "failed")).removeprefix(
                    "failed: "
                )
            elif t.number in failed_now:
                out.status[t.number] = "failed"
                out.errors[t.number] = failed_now[t.number]
            else:
                out.status[t.number] = "unfinished"
        return out

    def counts(self) -> dict[str, int]:
        keys = ("finished", "stopped", "failed", "unfinished")
        return {k: sum(v == k for v in self.status.values()) for k in keys}

    def complete(self, num_samples: int) -> bool:
        return len(self.status) >= num_samples and self.counts()["unfinished"] == 0


class Session:
    """The live parts of a running search (or final stage) that Tune's callback reaches."""

    def __init__(
        self, results: ResultsTable, mlflow: tracking.MlflowRecorder, progress: RunProgress
    ) -> None:
        self.results, self.mlflow, self.progress = results, mlflow, progress
        self.failed: dict[
            int, str
        ] = {}  # trial number -> reason, for trials that errored in this run
        self.trial_ids: dict[int, str] = {}
        self.stop_reason: str | None = None  # set when the search must stop (a full disk)
        # Packed trials: the driver decides each student's end (`PackedStops`) and tells the
        # study (`teller`) as each one ends, while its cohort goes on.
        self.pack: Stops | None = None
        self.teller: Teller | None = None

    def stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    def end_student(self, trial: Any, number: int, result: dict, how: str, trials: list) -> None:
        """A packed student finished or was stopped: Optuna, MLflow and the progress say so."""
        if self.teller is not None:
            self.teller.tell(number, result)
        self.mlflow.end(trial, number, how)
        self.packed_progress.on_student_end(number, how, result, trials)

    @property
    def packed_progress(self) -> StudentProgress:
        """The progress of a packed run (one whose `pack` is set) counts students."""
        return self.progress  # type: ignore[return-value]

    def __reduce__(self) -> Any:
        # Tune pickles its callbacks, stopper and searcher when it saves its state; that copy
        # is never restored (a resume starts a new Tune experiment), so the live parts (the
        # writer's thread, open files) stay behind.
        return (_gone, ())


def _gone() -> None:
    return None


class SessionStopper(tune.Stopper):
    """Ends the whole run when the session says so (a full disk): the trials stay open in the
    study, and a resume after freeing space runs them on."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        session = self.session
        return bool(session and session.stop_reason)


class SearchCallback(Callback):
    """Tune's hook into the live search (or final stage): its session's results table, MLflow
    recorder and progress hear of each trial's start, rows and end."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for number in students_of(trial.config):
            self.session.failed.pop(number, None)
            self.session.trial_ids[number] = trial.trial_id
        self.session.mlflow.on_trial_start(trial)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        s = self.session
        number = result_number(trial, result)
        if s.pack is not None and number in s.packed_progress.ended:
            return  # a retried cohort reports again what a student that ended had reported
        try:
            new = s.results.add(
                number, trial.trial_id, students_of(trial.config).get(number, {}), result
            )
        except OSError as exc:
            if not disk_full(exc):
                raise
            s.stop(f"no space left on device writing {s.results.log_path}")
            return
        s.mlflow.on_trial_result(trial, result)
        # A resumed trial first replays its saved epochs: recorded already, not progress.
        s.progress.on_trial_result(trial, result, trials, replayed=not new)
        if s.pack is not None and "epoch" in result:
            try:
                ends = s.pack.decide(trial, number, result)
            except OSError as exc:
                if not disk_full(exc):
                    raise
                s.stop(f"no space left on device writing the stop file of trial {number}")
                return
            for ended_trial, ended, row, how in ends:
                s.end_student(ended_trial, ended, row, how, trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.session.pack is not None:
            return  # its students were told one by one as each ended
        self.session.mlflow.on_trial_complete(trial)
        self.session.progress.on_trial_complete(trial, trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        s = self.session
        reason = tracking.error_reason(trial)
        if disk_full(Exception(reason)):
            s.stop(reason)
        numbers = [
            n
            for n in students_of(trial.config)
            if s.pack is None or n not in s.packed_progress.ended
        ]
        for number in numbers:
            s.failed[number] = reason
        s.mlflow.on_trial_error(trial, numbers)
        s.progress.on_trial_error(trial, trials, numbers)
        if s.pack is not None:  # decisions that waited on these students are taken now
            try:
                ends = s.pack.failed(numbers)
            except OSError as exc:
                if not disk_full(exc):
                    raise
                s.stop("no space left on device writing a decision file")
                return
            for ended_trial, ended, row, how in ends:
                s.end_student(ended_trial, ended, row, how, trials)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.session.progress.on_trial_recover(trial, trials)


def _number(trial: Any) -> int:
    return int(trial.config.get("trial_number", -1))


def result_number(trial: Any, result: dict) -> int:
    """The Optuna trial number a result belongs to: a packed trial's rows carry their
    student's; an unpacked trial's is its config's."""
    return int(result["trial_number"]) if "trial_number" in result else _number(trial)


def quiet() -> None:
    """searchkd prints its own progress: silence Tune's tables and the libraries' chatter.

    A failed trial is one line from `Progress` (its traceback stays in the trial's
    error.txt), so Tune's own error logs, which repeat the traceback, are muted too.
    """
    import warnings

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # legacy reporter: verbose=0 prints nothing
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault(
        "RAY_IGNORE_UNHANDLED_ERRORS", "1"
    )  # a failed trial is said once, by Progress
    tracking.configure_client()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # The store logs each failed write with its traceback; the writer says it in one line.
    logging.getLogger("mlflow.store").setLevel(logging.CRITICAL)
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


# Set when SIGTERM ended the run (the exit code says 143 instead of Ctrl-C's 130).
TERMINATED = threading.Event()


def _sigterm(signum: int, frame: Any) -> None:
    """SIGTERM does what Ctrl-C does: whatever handles SIGINT now (Tune's, inside `fit`: it
    ends the run and returns; `ctrl_c`'s or Python's otherwise: KeyboardInterrupt) handles it."""
    TERMINATED.set()
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def sigterm_as_ctrl_c() -> None:
    """Ray's driver (its C++ core worker, started by `ray.init`) replaces the SIGTERM handler
    with one that dumps a stack trace and aborts (exit -6): what Slurm or Kubernetes send
    before they kill a job would leave state.json `running` and no resume hint. Installed
    after Ray, this one hands SIGTERM to Ctrl-C's path instead."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)


def _ensure_ray(address: str | None, num_cpus: int | None) -> None:
    if ray.is_initialized():
        return
    # "local" starts a private Ray even where another one runs (or RAY_ADDRESS is set); an
    # address joins a cluster ("auto" = the one started on this machine with `ray start`).
    ray.init(
        address=address or "local",
        num_cpus=None if address else num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        configure_logging=True,
    )


def base_storage(spec: Spec, trials_dir: Path) -> Storage:
    """Where this search's trials will write: `search.storage`, or the local trials directory."""
    return Storage(spec.search.storage) if spec.search.storage else Storage(str(trials_dir))


def connect(
    spec: Spec,
    address: str | None = None,
    num_cpus: int | None = None,
    storage: Storage | None = None,
) -> None:
    """Start (or join) Ray and check that one trial fits the cluster and that every node
    reaches the trials' storage, before anything is written."""
    quiet()
    _ensure_ray(address, num_cpus)
    sigterm_as_ctrl_c()
    res = ray.cluster_resources()
    want = spec.search.resources
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if want.cpu > cpus + 1e-9:
        raise SearchError(
            f"search.resources.cpu: {want.cpu:g} per trial but the cluster has {cpus:g} CPUs"
        )
    if want.gpu > gpus + 1e-9:
        raise SearchError(
            f"search.resources.gpu: {want.gpu:g} per trial but the cluster has {gpus:g} GPUs"
        )
    if storage is not None:
        check_storage(storage, spec.search.storage is None)


@ray.remote(num_cpus=0)
def _sees(storage: Storage, marker: str) -> str | None:
    """On one node: None if it reads the driver's marker in the storage, else why not."""
    try:
        return (
            None if storage.read_bytes(marker) == b"ok" else "the driver's test file is not there"
        )
    except Exception as exc:  # noqa: BLE001 - whatever stops this node is the answer
        return tracking.one_line(exc)


def check_storage(storage: Storage, default: bool) -> None:
    """Write a marker into the storage and have every alive node read it back.

    On one machine this only checks that the storage is writable; on a cluster it catches a
    local path the other nodes cannot see, or credentials a node lacks, before any trial runs.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    hint = (
        "set search.storage (or --storage) to a path every node mounts or to an object store "
        "(s3://bucket/prefix)"
    )
    try:
        storage.check_writable()
    except StorageError as exc:
        raise SearchError(f"search.storage: {exc}") from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    marker = f".searchkd-probe-{uuid.uuid4().hex[:8]}"
    storage.write_bytes(marker, b"ok")
    try:
        refs = {
            n["NodeManagerAddress"] + f" (node {n['NodeID'][:8]})": _sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(storage, marker)
            for n in nodes
        }
        for where, ref in refs.items():
            try:
                problem = ray.get(ref, timeout=120)
            except Exception as exc:  # noqa: BLE001 - a node that cannot even run the check
                problem = tracking.one_line(exc)
            if problem:
                what = "the trials directory" if default else "search.storage"
                raise SearchError(
                    f"{what} {storage.display} is not reachable from {where}: {problem}; {hint}"
                )
    finally:
        storage.delete(marker)


def trial_storage(search_dir: Path, spec: Spec) -> Storage:
    """This search's folder in the storage, fixed when the search starts (`storage.json`).

    A search with `search.storage` gets a folder of its own there (name + a random suffix), so
    a search started again under the same name never picks up an older one's checkpoints.
    """
    path = search_dir / STORAGE_FILE
    if path.exists():
        uri = json.loads(path.read_text()).get("uri")
        return Storage(uri) if uri else Storage(str(search_dir / CHECKPOINTS_DIR))
    if spec.search.storage is None:
        uri = None
        root = Storage(str(search_dir / CHECKPOINTS_DIR))
    else:
        root = Storage(spec.search.storage).child(f"{spec.name}-{uuid.uuid4().hex[:8]}")
        uri = root.uri
    replace_atomically(path, lambda p: p.write_text(json.dumps({"uri": uri})))
    return root


def concurrency(spec: Spec, count: int | None = None, log: Log = say) -> int:
    """How many of `count` trials (default: the search's num_samples) run at once: what the
    cluster's CPUs and GPUs fit per `search.resources`, up to `max_concurrent`, and no more
    than its memory holds at each trial's estimated size (said in one line when that caps it:
    `cpu: 0.02` on 2 cores would otherwise start 50 processes of half a GiB each)."""
    res = ray.cluster_resources()
    want = spec.search.resources
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    fit = math.floor(cpus / want.cpu + 1e-9)
    if want.gpu > 0:
        fit = min(fit, math.floor(gpus / want.gpu + 1e-9))
    count = math.ceil(spec.search.num_samples / spec.search.pack) if count is None else count
    wanted = max(1, min(spec.search.max_concurrent or fit, fit, count))
    memory = res.get("memory", 0.0)
    try:
        per_trial = trial_memory(spec, DataShape.of(spec))
    except Exception:  # noqa: BLE001 - no estimate (data away from the driver): no memory cap
        return wanted
    held = max(1, math.floor(memory / per_trial)) if memory > 0 else wanted
    if held >= wanted:
        return wanted
    log(
        f"searchkd: running {held} trials at once, not {wanted}: each needs about "
        f"{per_trial / 2**30:.1f} GiB of memory (estimated) and Ray has {memory / 2**30:.1f} GiB "
        "for them"
    )
    return held


def make_trainable(
    spec: Spec, teacher: TeacherInfo | None, storage: Storage, rungs: list[int] | None = None
) -> Any:
    """`train_trial` with the spec as its base, the teacher's bytes and the trials' storage,
    under the space's per-trial resources (the search and its final stage share it); with
    `rungs`, each trial waits at those epochs for the driver's decision (a reproducible
    search's ASHA)."""
    res = spec.search.resources
    memory_fraction = res.gpu if 0 < res.gpu < 1 else None
    blob = Path(teacher.path).read_bytes() if teacher else None
    # The teacher travels as bytes through Ray's object store (tune.with_parameters puts it
    # there once), checked against this digest on arrival: no node needs the driver's disk.
    return tune.with_resources(
        tune.with_parameters(
            train_trial,
            base=spec.model_dump(mode="json", by_alias=True),
            teacher=blob,
            storage=storage,
            teacher_sha256=hashlib.sha256(blob).hexdigest() if blob else None,
            cpus=res.cpu,
            memory_fraction=memory_fraction,
            rungs=rungs,
        ),
        {"cpu": res.cpu, "gpu": res.gpu},
    )


def fit(tuner: tune.Tuner, session: Session) -> bool:
    """Run the tuner whose callbacks hold `session`; whether Ctrl-C stopped it.
    A full disk stops the session (Tune then fails reading its own files: that is expected);
    the table is written when it ends, and results.jsonl holds the rows if it cannot be."""
    try:
        with ctrl_c() as seen:
            try:
                tuner.fit()
            except Exception:  # noqa: BLE001 - Tune fails reading its own files on a full disk
                if session.stop_reason is None:
                    raise
            return seen()
    finally:
        try:
            session.results.flush()
        except OSError as exc:
            if not disk_full(exc):
                raise
            session.stop(f"no space left on device writing {session.results.path}")


@contextlib.contextmanager
def ctrl_c() -> Iterator[Callable[[], bool]]:
    """Whether Ctrl-C ended `fit()`: Tune catches the first SIGINT itself (it saves its state
    and returns) and then puts back the handler it found, so finding ours back means it came."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def ours(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, ours)
    try:
        yield lambda: signal.getsignal(signal.SIGINT) is ours
    finally:
        signal.signal(signal.SIGINT, previous)


class Deadline:
    """The end of a search waits for MLflow at most TRACKING_WAIT_S, saying so once."""

    def __init__(
        self, writer: tracking.MlflowWriter, uri: str, log: Log, wait_s: float = TRACKING_WAIT_S
    ) -> None:
        self.writer, self.uri, self.log = writer, uri, log
        self.end = time.time() + wait_s

    def drain(self) -> bool:
        if self.writer.drain(timeout=min(2.0, max(0.0, self.end - time.time()))):
            return True
        self.log(
            f"searchkd: waiting up to {max(0.0, self.end - time.time()):.0f}s for the tracking "
            f"store {self.uri} to take {self.writer.pending()} trials' updates"
        )
        return self.writer.drain(timeout=max(0.0, self.end - time.time()))


STATE_BYTES = 512  # state.json is padded to this size, so it can be rewritten in place


def write_state(
    search_dir: Path, status: str, counts: dict[str, int] | None = None, **extra: Any
) -> None:
    """state.json, atomically; on a full disk, rewritten in place (it never grows, so that
    needs no new space): a search stopped by a full disk still says it was interrupted."""
    path = search_dir / STATE_FILE
    text = json.dumps({"status": status, "trials": counts or {}, "time": time.time(), **extra})
    text = text.ljust(STATE_BYTES) + "\n"
    try:
        replace_atomically(path, lambda p: p.write_text(text))
    except OSError as exc:
        if not disk_full(exc) or not path.exists():
            raise
        with path.open("r+") as f:
            f.write(text)


def next_run(ray_dir: Path) -> str:
    """The name of this run's Tune experiment: `run-NNN`, one more than the runs before it."""
    count = len(list(ray_dir.glob("run-*"))) if ray_dir.is_dir() else 0
    return f"run-{count + 1:03d}"


def run_config(spec: Spec, ray_dir: Path, session: Session) -> tune.RunConfig:
    """One Tune experiment per run, never restored: which trials exist is the study's (or the
    plan's) business. Trials report no Tune checkpoint (they keep their state in the search's
    storage), so no node ever needs this directory."""
    return tune.RunConfig(
        name=next_run(ray_dir),
        storage_path=str(ray_dir),
        verbose=0,
        callbacks=[SearchCallback(session)],
        stop=SessionStopper(session),
        failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
    )


def base_tags(spec: Spec, **extra: str) -> dict[str, str]:
    """The tags every MLflow run of a search carries (its trials', its final stage's)."""
    tags = {
        "teacher": spec.teacher.arch,
        "student": spec.student.arch,
        "search": spec.name,
        "dataset": spec.data.dataset,
        **extra,
    }
    if isinstance(spec.objective, str):
        tags["objective"] = spec.objective
    return tags


def open_tracking(open_runs: Callable[[], tracking.SearchRuns], uri: str) -> tracking.SearchRuns:
    """Open a run's MLflow runs; a store that does not answer is one line (SearchError)."""
    try:
        return open_runs()
    except Exception as exc:  # noqa: BLE001 - a store that does not answer is one line
        if not tracking.is_transient(exc):
            raise
        raise SearchError(f"tracking store {uri} unreachable: {tracking.one_line(exc)}") from None


class Stage(Protocol):
    """What a search, or a final stage, brings to `drive`."""

    def open(self) -> tracking.MlflowWriter:
        """The MLflow writer of this run's trials (SearchError: the store does not answer),
        and whatever else its record needs before the first row (the search's study)."""
        ...

    def results(self) -> ResultsTable:
        """The table this run's rows go to."""
        ...

    def progress(self, results: ResultsTable) -> RunProgress:
        """The progress lines, knowing what earlier runs recorded."""
        ...

    def tuner(self, session: Session) -> tune.Tuner | None:
        """The Tuner for what is left to run (None: nothing is), wired to the session."""
        ...

    def outcomes(self, session: Session, results: ResultsTable) -> Outcomes:
        """How each trial stands now that the Tuner has ended."""
        ...

    def rows(self, results: ResultsTable) -> dict[int, list[dict[str, Any]]]:
        """The recorded rows MLflow is brought in line with."""
        ...

    def settle(self, outcomes: Outcomes, session: Session) -> bool:
        """Whether the run has nothing left to do, after writing how it ended to its own record
        (the search's study, the final stage's final.parquet)."""
        ...


@dataclass
class Ending:
    """How a driven run ended: status is finished, interrupted (Ctrl-C) or unfinished."""

    session: Session
    writer: tracking.MlflowWriter
    outcomes: Outcomes
    complete: bool
    synced: bool  # MLflow took every update
    status: str


def drive(stage: Stage, log: Log) -> Ending:
    """The run of a search or a final stage, from its MLflow runs to how it ended."""
    writer = stage.open()
    results = stage.results()
    results.flush()  # a Parquet file cut short or deleted is rebuilt now
    session = Session(results, tracking.MlflowRecorder(writer), stage.progress(results))
    tuner = stage.tuner(session)
    interrupted = fit(tuner, session) if tuner is not None else False
    outcomes = stage.outcomes(session, results)
    complete = stage.settle(outcomes, session)
    # MLflow is brought in line with the durable record once more: what a killed driver or a
    # long outage held back reaches it now.
    session.mlflow.resync(stage.rows(results), outcomes)
    # With a full disk the store may be on it too: the resume sends what it does not take now.
    synced = Deadline(
        writer, writer.runs.tracking_uri, log, 5.0 if session.stop_reason else TRACKING_WAIT_S
    ).drain()
    status = "finished" if complete and synced else "interrupted" if interrupted else "unfinished"
    return Ending(session, writer, outcomes, complete, synced, status)
