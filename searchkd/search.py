"""The search: Ray Tune runs trials, Optuna samples them, ASHA stops the poor ones.

A search lives in `trials/<name>/`: `space.yaml` (the resolved spec it started with),
`ray/` (Tune's experiment state), `optuna.journal` (the study), `results.parquet` (one row
per trial per epoch) and the MLflow bookkeeping, all on the driver's disk. What trials write
(each one's engine state and best student) goes to the search's storage (storage.py): the
search directory itself by default, or a shared path / object store that every node of a
cluster reaches. Resume is `Tuner.restore(..., resume_unfinished=True, resume_errored=True)`
on the same directory: finished trials stay finished, unfinished and failed ones run again
and pick up their own state from the storage, the Optuna study and the MLflow runs are the
same ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from . import tracking
from .spec import Spec
from .storage import Storage, StorageError
from .teacher import TeacherInfo
from .trial import train_trial

Log = Callable[[str], None]


def say(text: str) -> None:
    """The default log: a line at a time, flushed (progress is read as it comes)."""
    print(text, flush=True)

SPACE_FILE = "space.yaml"
RESULTS_FILE = "results.parquet"
JOURNAL_FILE = "optuna.journal"
STATE_FILE = "state.json"
STORAGE_FILE = "storage.json"
RAY_DIR = "ray"
CHECKPOINTS_DIR = "checkpoints"  # the trials' storage when the space names none
# How long the end of a search waits for a tracking server that is away, before it stops
# with the resume command (the resume sends what is missing).
TRACKING_WAIT_S = float(os.environ.get("SEARCHKD_TRACKING_WAIT", "600"))


class SearchError(RuntimeError):
    """A search that cannot start or resume for a reason the user can fix: one line."""


def trial_seed(search_seed: int, trial_number: int) -> int:
    """A per-trial seed derived from the search seed and the trial number (stable, recorded)."""
    digest = hashlib.sha256(f"{search_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _encode(choice: Any) -> Any:
    return json.dumps(choice) if isinstance(choice, list | dict) else choice


class SearchSpace:
    """The Optuna define-by-run space of a spec's `params` (picklable: Tune saves it).

    With `objective: {choice: [...]}` the objective is sampled first and only the `loss.*`
    parameters that objective declares are sampled after it, so each trial holds only its own
    objective's parameters. Choices that are lists (e.g. scales) are offered to Optuna as
    JSON strings and decoded into the config.
    """

    def __init__(self, params: dict[str, dict[str, Any]], objectives: list[str],
                 owners: dict[str, list[str]], seed: int) -> None:
        self.params = params
        self.objectives = objectives
        self.owners = owners  # loss key -> objectives that declare it
        self.seed = seed

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        constants: dict[str, Any] = {}
        if len(self.objectives) > 1:
            objective = trial.suggest_categorical("objective", self.objectives)
        else:
            objective = self.objectives[0]
        for key, p in self.params.items():
            if key.startswith("loss.") and objective not in self.owners.get(key, []):
                continue
            if "choice" in p:
                options = [_encode(c) for c in p["choice"]]
                picked = trial.suggest_categorical(key, options)
                if any(isinstance(c, list | dict) for c in p["choice"]):
                    constants[key] = json.loads(picked)
            elif "float" in p:
                low, high = p["float"]
                trial.suggest_float(key, low, high, log=p.get("log", False), step=p.get("step"))
            else:
                low, high = p["int"]
                trial.suggest_int(key, int(low), int(high), log=p.get("log", False), step=int(p.get("step") or 1))
        constants["trial_number"] = trial.number
        constants["seed"] = trial_seed(self.seed, trial.number)
        return constants


def make_sampler(spec: Spec) -> optuna.samplers.BaseSampler:
    seed = spec.search.seed
    if spec.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if spec.search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    # TPE: a quarter of the budget (2 to 10 trials) random first; multivariate+group handle the
    # conditional (per-objective) parameters; constant_liar keeps concurrent trials apart.
    startup = max(2, min(10, spec.search.num_samples // 4))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                      group=True, constant_liar=True)


def journal_storage(search_dir: Path) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(search_dir / JOURNAL_FILE)))


def load_study(search_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=journal_storage(search_dir))


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch whose study never holds a result Tune's saved state does not.

    Tune saves its state every ~10 s, and a driver killed in between restores the trials of
    the last snapshot: one it had seen end runs again, one it had started is forgotten. If
    Optuna had already been told those ends, the study would keep a value the search then
    revises, or a trial nobody runs. So a completion is told to Optuna when Tune next saves
    its state (`save`, called right after the trials' states are written), and a restored
    searcher knows only the completions its snapshot holds. Reports and completions for
    trials Optuna already closed are ignored: the first, recorded value stands.

    A trial that errors is not told FAIL at all: a resumed search runs it again, and Optuna
    can never turn FAIL into COMPLETE. `settle_study` tells FAIL for the trials that are
    still failed when the search ends, and the value of any ended trial still open.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ended: dict[str, dict | None] = {}  # trial id -> final result, told at the next save

    def _closed(self, trial_id: str) -> bool:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return True
        frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
        return frozen.state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Intermediate values are the metric per epoch, once each: a trial that restarts
        from its saved epoch reports that epoch again (Tune's iteration count starts over)."""
        if trial_id in self._ended or self._closed(trial_id) or isinstance(self.metric, list):
            return
        value, epoch = result.get(self.metric), result.get("epoch")
        if value is None or epoch is None:
            return
        ot_trial = self._ot_trials[trial_id]
        if int(epoch) not in self._ot_study._storage.get_trial(ot_trial._trial_id).intermediate_values:
            ot_trial.report(value, int(epoch))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._closed(trial_id):
            self._completed_trials.add(trial_id)
        elif not error:
            self._ended[trial_id] = result

    def save(self, checkpoint_path: str) -> None:
        # Tune has just written the snapshot that records these trials as ended.
        for trial_id, result in list(self._ended.items()):
            if not self._closed(trial_id):
                super().on_trial_complete(trial_id, result, False)
        self._ended.clear()
        super().save(checkpoint_path)


def _set_user_attr(study: optuna.Study, number: int, key: str, value: str) -> None:
    frozen = study.trials[number]
    if not frozen.state.is_finished():
        study._storage.set_trial_user_attr(frozen._trial_id, key, value)


def settle_study(study: optuna.Study, outcomes: Outcomes, rows: dict[int, list[dict[str, Any]]],
                 metrics: list[str]) -> int:
    """Make every ended trial's Optuna state say how it ended, through Optuna's public `tell`.

    Failed trials are told FAIL (the reason as user attr `searchkd`). An ended trial Optuna
    still holds open is told its last reported value: after a restore, Tune's concurrency
    limiter forgets trials that were running and never passes their completion on.
    """
    told = 0
    for number, status in sorted(outcomes.status.items()):
        if number < 0 or number >= len(study.trials) or study.trials[number].state.is_finished():
            continue
        if status == "failed":
            _set_user_attr(study, number, "searchkd", f"failed: {outcomes.errors.get(number, 'trial failed')}")
            study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        elif status in ("finished", "stopped") and rows.get(number):
            last = rows[number][-1]
            values = [float(last[m]) for m in metrics]
            study.tell(number, values if len(values) > 1 else values[0], skip_if_finished=True)
        else:
            continue
        told += 1
    return told


# -- what the driver records as trials run ---------------------------------------------------
class ResultsTable:
    """`results.parquet`: one row per trial per epoch, rewritten atomically each result.

    Rows are keyed by (trial_id, epoch); a resumed trial that re-reports an epoch replaces
    that row instead of duplicating it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._rows: dict[tuple[str, int], dict[str, Any]] | None = None

    @property
    def rows(self) -> dict[tuple[str, int], dict[str, Any]]:
        if self._rows is None:
            self._rows = {}
            if self.path.exists():
                for r in pq.read_table(self.path).to_pylist():
                    self._rows[(r["trial_id"], int(r["epoch"]))] = r
        return self._rows

    def on_trial_result(self, trial: Any, result: dict) -> None:
        row = {k: v for k, v in result.items()
               if _scalar(v) and (k in tracking.LOGGED or k in _TEXT_KEYS or k.startswith("loss_"))}
        row["trial_id"] = trial.trial_id
        row["trial_number"] = int(trial.config.get("trial_number", -1))
        row["objective"] = str(trial.config.get("objective", ""))
        row["config"] = json.dumps({k: v for k, v in trial.config.items() if k != "trial_number"}, sort_keys=True)
        row["timestamp"] = float(result.get("timestamp", time.time()))
        self.rows[(trial.trial_id, int(result["epoch"]))] = row
        self.write()

    def by_trial(self) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        for r in sorted(self.rows.values(), key=lambda r: r["epoch"]):
            out.setdefault(int(r["trial_number"]), []).append(r)
        return out

    def write(self) -> None:
        rows = sorted(self.rows.values(), key=lambda r: (r["trial_number"], r["epoch"]))
        keys = sorted({k for r in rows for k in r})
        table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)


def _scalar(v: Any) -> bool:
    return isinstance(v, int | float | str) and not isinstance(v, bool)


_TEXT_KEYS = {"node_id", "node_ip"}


class Progress:
    """One line per trial that ends (and a heartbeat), with the best value so far."""

    def __init__(self, metric: str, mode: str, num_samples: int, epochs: int, heartbeat_s: float = 15.0,
                 log: Log = say) -> None:
        self.metric, self.mode = metric, mode
        self.num_samples, self.epochs = num_samples, epochs
        self.heartbeat_s = heartbeat_s
        self.log = log
        self.start = time.time()
        self.last_beat = 0.0
        self.best: tuple[float, int] | None = None

    def _line(self, text: str, trials: list) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        best = f"best {self.metric} {self.best[0]:.4f} (trial {self.best[1]})" if self.best else "best -"
        self.log(f"[{time.time() - self.start:6.0f}s] {text:<48} | {done}/{self.num_samples} done, "
                 f"{running} running | {best}")
        self.last_beat = time.time()

    def on_trial_result(self, trial: Any, result: dict, trials: list) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            number = int(trial.config.get("trial_number", -1))
            if self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0]):
                self.best = (float(value), number)
        if time.time() - self.last_beat > self.heartbeat_s:
            self._line(f"trial {trial.config.get('trial_number')} epoch {result.get('epoch')}/{self.epochs}", trials)

    def on_trial_complete(self, trial: Any, trials: list) -> None:
        r = trial.last_result or {}
        how = "finished" if int(r.get("epoch", 0)) >= self.epochs else "stopped by ASHA"
        value = r.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        self._line(f"trial {trial.config.get('trial_number')} {how} at epoch {r.get('epoch')} "
                   f"{self.metric} {shown}", trials)

    def on_trial_error(self, trial: Any, trials: list) -> None:
        self._line(f"trial {trial.config.get('trial_number')} FAILED", trials)
        reason = tracking.error_reason(trial)
        self.log(f"  trial {trial.config.get('trial_number')}{_where(trial, reason)}: {reason}")

    def on_trial_recover(self, trial: Any, trials: list) -> None:
        reason = tracking.error_reason(trial)
        self.log(f"  trial {trial.config.get('trial_number')}{_where(trial, reason)} failed and is retried "
                 f"from its last saved epoch: {reason}")


def _where(trial: Any, reason: str) -> str:
    """" on <node ip>", unless the reason names its node already."""
    ip = (trial.last_result or {}).get("node_ip")
    return f" on {ip}" if ip and not reason.startswith("node ") else ""


@dataclass
class Outcomes:
    """How each trial ended, from the trials Tune hands its callbacks when `fit()` ends.

    Tune marks the trials it stops on Ctrl-C TERMINATED as it cleans up, just as it marks a
    finished one; so a trial this process saw start, but never saw complete or fail, ended
    unfinished whatever its final status says. Trials restored already ended from an earlier
    run keep the status Tune saved.
    """

    status: dict[int, str] = field(default_factory=dict)  # number -> finished|stopped|failed|unfinished
    errors: dict[int, str] = field(default_factory=dict)
    trial_ids: dict[int, str] = field(default_factory=dict)
    configs: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, trials: list, epochs: int, seen: dict[int, str]) -> Outcomes:
        """`seen`: trial number -> running | ended, as this process's callbacks saw them."""
        out = cls()
        for t in trials:
            number = int(t.config.get("trial_number", -1))
            out.trial_ids[number] = t.trial_id
            out.configs[number] = dict(t.config)
            if seen.get(number) == "running":
                out.status[number] = "unfinished"
            elif t.status == "ERROR":
                out.status[number] = "failed"
                out.errors[number] = tracking.error_reason(t)
            elif t.status == "TERMINATED":
                full = int((t.last_result or {}).get("epoch", 0)) >= epochs
                out.status[number] = "finished" if full else "stopped"
            else:
                out.status[number] = "unfinished"
        return out

    def counts(self) -> dict[str, int]:
        keys = ("finished", "stopped", "failed", "unfinished")
        return {k: sum(v == k for v in self.status.values()) for k in keys}

    def complete(self, num_samples: int) -> bool:
        return len(self.status) >= num_samples and self.counts()["unfinished"] == 0


class Session:
    """The live parts of a running search that Tune's callback reaches."""

    def __init__(self, results: ResultsTable, mlflow: tracking.MlflowRecorder, progress: Progress,
                 epochs: int) -> None:
        self.results, self.mlflow, self.progress = results, mlflow, progress
        self.epochs = epochs
        self.seen: dict[int, str] = {}  # trial number -> running | ended, in this process
        self.outcomes: Outcomes | None = None


_SESSIONS: dict[str, Session] = {}


class SearchCallback(Callback):
    """Tune's hook into the live search.

    It pickles as the search directory alone: a restored Tuner unpickles the callbacks it
    was created with, and this one then reaches the session of the process that resumes.
    """

    def __init__(self, key: str) -> None:
        self.key = key

    @property
    def session(self) -> Session:
        return _SESSIONS[self.key]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.session.seen[_number(trial)] = "running"
        self.session.mlflow.on_trial_start(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        s = self.session
        s.results.on_trial_result(trial, result)
        s.mlflow.on_trial_result(trial, result)
        s.progress.on_trial_result(trial, result, trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.session.seen[_number(trial)] = "ended"
        self.session.mlflow.on_trial_complete(trial)
        self.session.progress.on_trial_complete(trial, trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.session.seen[_number(trial)] = "ended"
        self.session.mlflow.on_trial_error(trial)
        self.session.progress.on_trial_error(trial, trials)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.session.progress.on_trial_recover(trial, trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.session.outcomes = Outcomes.of(trials, self.session.epochs, self.session.seen)


def _number(trial: Any) -> int:
    return int(trial.config.get("trial_number", -1))


@dataclass
class Summary:
    search_dir: Path
    best_trial: int
    best_config: dict[str, Any]
    best_value: float
    best_val_acc: float
    test_acc: float
    trials: int
    finished: int
    stopped: int
    failed: int
    teacher: TeacherInfo


def summarize(search_dir: Path, spec: Spec, teacher: TeacherInfo, counts: dict[str, int]) -> Summary | None:
    """The best trial so far, or None when no trial has reported an epoch yet."""
    path = search_dir / RESULTS_FILE
    table = pq.read_table(path).to_pylist() if path.exists() else []
    if not table:
        return None
    metric, mode = spec.metrics[0], spec.modes[0]
    per_trial: dict[int, list[dict[str, Any]]] = {}
    for r in table:
        per_trial.setdefault(r["trial_number"], []).append(r)
    pick = max if mode == "max" else min
    best_number = pick(per_trial, key=lambda n: pick(row[metric] for row in per_trial[n]))
    rows = sorted(per_trial[best_number], key=lambda r: r["epoch"])
    best_value = pick(r[metric] for r in rows)
    last = rows[-1]
    return Summary(
        search_dir=search_dir, best_trial=best_number, best_config=json.loads(last["config"]),
        best_value=best_value, best_val_acc=last["best_val_acc"], test_acc=last["test_acc"],
        trials=max(len(per_trial), sum(counts.values())), finished=counts.get("finished", 0), stopped=counts.get("stopped", 0),
        failed=counts.get("failed", 0), teacher=teacher,
    )


def tunable_owners(spec: Spec, tunables: dict[str, set[str]]) -> dict[str, list[str]]:
    return {key: [o for o in spec.objectives if key.partition(".")[2] in tunables[o]]
            for key in spec.params if key.startswith("loss.")}


def quiet() -> None:
    """searchkd prints its own progress: silence Tune's tables and the libraries' chatter.

    A failed trial is one line from `Progress` (its traceback stays in the trial's
    error.txt), so Tune's own error logs, which repeat the traceback, are muted too.
    """
    import warnings

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # legacy reporter: verbose=0 prints nothing
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tracking.configure_client()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _ensure_ray(address: str | None, num_cpus: int | None) -> None:
    if ray.is_initialized():
        return
    # "local" starts a private Ray even where another one runs (or RAY_ADDRESS is set); an
    # address joins a cluster ("auto" = the one started on this machine with `ray start`).
    ray.init(address=address or "local", num_cpus=None if address else num_cpus, include_dashboard=False,
             log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)


def base_storage(spec: Spec, trials_dir: Path) -> Storage:
    """Where this search's trials will write: `search.storage`, or the local trials directory."""
    return Storage(spec.search.storage) if spec.search.storage else Storage(str(trials_dir))


def connect(spec: Spec, address: str | None = None, num_cpus: int | None = None,
            storage: Storage | None = None) -> None:
    """Start (or join) Ray and check that one trial fits the cluster and that every node
    reaches the trials' storage, before anything is written."""
    quiet()
    _ensure_ray(address, num_cpus)
    res = ray.cluster_resources()
    want = spec.search.resources
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if want.cpu > cpus + 1e-9:
        raise SearchError(f"search.resources.cpu: {want.cpu:g} per trial but the cluster has {cpus:g} CPUs")
    if want.gpu > gpus + 1e-9:
        raise SearchError(f"search.resources.gpu: {want.gpu:g} per trial but the cluster has {gpus:g} GPUs")
    if storage is not None:
        check_storage(storage, spec.search.storage is None)


@ray.remote(num_cpus=0)
def _sees(storage: Storage, marker: str) -> str | None:
    """On one node: None if it reads the driver's marker in the storage, else why not."""
    try:
        return None if storage.read_bytes(marker) == b"ok" else "the driver's test file is not there"
    except Exception as exc:  # noqa: BLE001 - whatever stops this node is the answer
        return tracking.one_line(exc)


def check_storage(storage: Storage, default: bool) -> None:
    """Write a marker into the storage and have every alive node read it back.

    On one machine this only checks that the storage is writable; on a cluster it catches a
    local path the other nodes cannot see, or credentials a node lacks, before any trial runs.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    hint = ("set search.storage (or --storage) to a path every node mounts or to an object store "
            "(s3://bucket/prefix)")
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
        refs = {n["NodeManagerAddress"] + f" (node {n['NodeID'][:8]})": _sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(storage, marker)
            for n in nodes}
        for where, ref in refs.items():
            try:
                problem = ray.get(ref, timeout=120)
            except Exception as exc:  # noqa: BLE001 - a node that cannot even run the check
                problem = tracking.one_line(exc)
            if problem:
                what = "the trials directory" if default else "search.storage"
                raise SearchError(f"{what} {storage.display} is not reachable from {where}: {problem}; {hint}")
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"uri": uri}))
    os.replace(tmp, path)
    return root


def _concurrency(spec: Spec) -> int:
    res = ray.cluster_resources()
    want = spec.search.resources
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    fit = math.floor(cpus / want.cpu + 1e-9)
    if want.gpu > 0:
        fit = min(fit, math.floor(gpus / want.gpu + 1e-9))
    return max(1, min(spec.search.max_concurrent or fit, fit, spec.search.num_samples))


def build_tuner(spec: Spec, search_dir: Path, teacher: TeacherInfo | None, storage: Storage,
                callbacks: list[Callback], tunables: dict[str, set[str]], resume: bool) -> tune.Tuner:
    res = spec.search.resources
    memory_fraction = res.gpu if 0 < res.gpu < 1 else None
    blob = Path(teacher.path).read_bytes() if teacher else None
    # The teacher travels as bytes through Ray's object store (tune.with_parameters puts it
    # there once), checked against this digest on arrival: no node needs the driver's disk.
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=spec.model_dump(mode="json", by_alias=True),
                             teacher=blob, storage=storage,
                             teacher_sha256=hashlib.sha256(blob).hexdigest() if blob else None,
                             cpus=res.cpu, memory_fraction=memory_fraction),
        {"cpu": res.cpu, "gpu": res.gpu},
    )
    ray_dir = search_dir / RAY_DIR
    if resume and tune.Tuner.can_restore(str(ray_dir)):
        return tune.Tuner.restore(str(ray_dir), trainable, resume_unfinished=True, resume_errored=True)
    metric = spec.metrics if len(spec.metrics) > 1 else spec.metrics[0]
    mode = spec.modes if len(spec.modes) > 1 else spec.modes[0]
    params = {k: p.model_dump(by_alias=True, exclude_none=True) for k, p in spec.params.items()}
    space = SearchSpace(params, spec.objectives, tunable_owners(spec, tunables), spec.search.seed)
    searcher = ResumableOptunaSearch(space, metric=metric, mode=mode, sampler=make_sampler(spec),
                                     study_name=spec.name, storage=journal_storage(search_dir))
    if spec.search.scheduler == "asha":
        # ASHA counts epochs, not reports: a resumed trial re-reports its saved epoch.
        scheduler = ASHAScheduler(metric=spec.metrics[0], mode=spec.modes[0], time_attr="epoch",
                                  max_t=spec.train.epochs, grace_period=min(spec.search.grace_period, spec.train.epochs),
                                  reduction_factor=spec.search.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=_concurrency(spec)),
            scheduler=scheduler, num_samples=spec.search.num_samples,
            reuse_actors=True,  # a trial's process outlives it: no re-import of torch per trial
        ),
        run_config=tune.RunConfig(
            # Tune's own state stays with the driver; trials report no Tune checkpoint (they
            # keep their state in the search's storage themselves), so no node ever needs
            # this directory.
            name=RAY_DIR, storage_path=str(search_dir), verbose=0, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
        ),
    )


def run_search(
    spec: Spec,
    search_dir: Path,
    trials_dir: Path,
    tunables: dict[str, set[str]],
    teacher: TeacherInfo,
    resume: bool = False,
    tracking_uri: str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    log: Log = say,
) -> tuple[Summary | None, bool]:
    """Run (or resume) a search whose directory and space.yaml already exist.

    Returns the summary (None before any trial reported) and whether the search is complete.
    """
    quiet()
    uri = tracking_uri or tracking.default_store(trials_dir)
    artifacts = None if tracking_uri else tracking.artifact_root(trials_dir)
    base_tags = {"teacher": spec.teacher.arch, "student": spec.student.arch, "search": spec.name,
                 "dataset": spec.data.dataset}
    if isinstance(spec.objective, str):
        base_tags["objective"] = spec.objective
    try:
        runs = tracking.open_search(
            search_dir, spec.name, uri, artifacts, base_tags, search_dir / SPACE_FILE,
            params={"num_samples": spec.search.num_samples, "sampler": spec.search.sampler,
                    "scheduler": spec.search.scheduler, "seed": spec.search.seed,
                    "teacher_digest": teacher.digest},
        )
        tracking.log_parent_metrics(runs, {"teacher_test_acc": teacher.test_acc,
                                           "teacher_val_acc": teacher.val_acc})
    except Exception as exc:  # noqa: BLE001 - a store that does not answer is one line
        if not tracking.is_transient(exc):
            raise
        raise SearchError(f"tracking store {uri} unreachable: {tracking.one_line(exc)}") from None
    storage = trial_storage(search_dir, spec)
    connect(spec, address, num_cpus)
    metric, mode = spec.metrics[0], spec.modes[0]
    writer = tracking.MlflowWriter(runs, search_dir, storage, metric, mode, base_tags, spec.train.epochs, log=log)
    session = Session(ResultsTable(search_dir / RESULTS_FILE), tracking.MlflowRecorder(writer),
                      Progress(metric, mode, spec.search.num_samples, spec.train.epochs, log=log),
                      spec.train.epochs)
    key = str(search_dir)
    tuner = build_tuner(spec, search_dir, teacher, storage, [SearchCallback(key)], tunables, resume)
    _write_state(search_dir, "running")
    log(f"search {spec.name}: {spec.search.num_samples} trials of {spec.train.epochs} "
        f"epoch{'s' if spec.train.epochs > 1 else ''} "
        f"({'resumed' if resume else 'new'}), in {search_dir}")
    _SESSIONS[key] = session
    try:
        tuner.fit()
    finally:
        del _SESSIONS[key]
    outcomes = session.outcomes or Outcomes()
    complete = outcomes.complete(spec.search.num_samples)
    deadline = _Deadline(writer, uri, log)
    synced = deadline.drain()
    if complete:
        settle_study(load_study(search_dir, spec.name), outcomes, session.results.by_trial(), spec.metrics)
        reconcile(search_dir, spec.name, set(outcomes.status))
        if synced:
            try:
                tracking.drop_orphan_runs(runs, search_dir, set(outcomes.status))
                writer.reload_map()
            except Exception as exc:  # noqa: BLE001 - the store went away again: resume finishes it
                if not tracking.is_transient(exc):
                    raise
                synced = False
    # MLflow is brought in line with the durable record once more: what a killed driver or a
    # long outage held back reaches it now.
    session.mlflow.resync(session.results.by_trial(), outcomes, set(outcomes.status) if complete else None)
    synced = deadline.drain() and synced
    counts = outcomes.counts()
    finished = complete and synced
    _write_state(search_dir, "finished" if finished else "interrupted", counts, tracking_pending=not synced)
    if synced:
        try:
            writer.close_search("FINISHED" if complete else "KILLED")
        except Exception as exc:  # noqa: BLE001 - the parent's status is cosmetic
            log(f"searchkd: warning: could not close the search's MLflow run: {tracking.one_line(exc)}")
    else:
        log(f"searchkd: the tracking store {uri} did not take {writer.pending()} trials' updates "
            f"within {TRACKING_WAIT_S:.0f}s; they are kept in {RESULTS_FILE} and sent by --resume")
    return summarize(search_dir, spec, teacher, counts), finished


class _Deadline:
    """The end of a search waits for MLflow at most TRACKING_WAIT_S in all, saying so once."""

    def __init__(self, writer: tracking.MlflowWriter, uri: str, log: Log) -> None:
        self.writer, self.uri, self.log = writer, uri, log
        self.end = time.time() + TRACKING_WAIT_S
        self.said = False

    def drain(self) -> bool:
        if self.writer.drain(timeout=min(2.0, max(0.0, self.end - time.time()))):
            return True
        if not self.said:
            self.said = True
            self.log(f"searchkd: waiting up to {max(0.0, self.end - time.time()):.0f}s for the tracking "
                     f"store {self.uri} to take {self.writer.pending()} trials' updates")
        return self.writer.drain(timeout=max(0.0, self.end - time.time()))


def reconcile(search_dir: Path, name: str, known: set[int]) -> dict[str, int]:
    """Drop what a driver killed between Tune snapshots left behind, once a search is complete.

    Tune forgets trials it started after its last experiment snapshot and starts new ones in
    their place. Their Optuna trials stay RUNNING (marked FAIL here, with the reason) and their
    Parquet rows would be extra rows (dropped; their MLflow runs go in
    `tracking.drop_orphan_runs`), so that every store holds exactly the trials Tune ran to the
    end. `known` holds the trial numbers of the trials Tune ran.
    """
    path = search_dir / RESULTS_FILE
    dropped_rows = 0
    if path.exists():
        results = ResultsTable(path)
        orphans = [k for k, r in results.rows.items() if int(r["trial_number"]) not in known]
        for k in orphans:
            del results.rows[k]
        dropped_rows = len(orphans)
        if orphans:
            results.write()
    study = load_study(search_dir, name)
    stale = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
             if t.number not in known]
    for t in stale:
        _set_user_attr(study, t.number, "searchkd", "orphaned: its driver was killed before Tune saved it")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    return {"rows": dropped_rows, "optuna": len(stale)}


def _write_state(search_dir: Path, status: str, counts: dict[str, int] | None = None, **extra: Any) -> None:
    path = search_dir / STATE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"status": status, "trials": counts or {}, "time": time.time(), **extra}))
    os.replace(tmp, path)


def search_status(search_dir: Path) -> str | None:
    path = search_dir / STATE_FILE
    return json.loads(path.read_text())["status"] if path.exists() else None
