"""MLflow tracking, done by the driver: one experiment per search, a parent run, one child
run per trial.

The driver logs; trials never touch MLflow, so however many trials run, one process writes
the store, and a node without access to the tracking server can still run trials. The Tune
callback only records what happened (rows, starts, ends) and marks the trial for a sync; one
writer thread brings MLflow up to date from that record. A sync is idempotent (a run is found
by its trial number before one is created, metric steps the run already holds are skipped),
so when the tracking server goes away the writer keeps the record, retries with backoff, says
so once when it goes and once when it is back, and training never waits for it. At the end
of a search every trial is synced once more from the durable record (the recorded rows and
the study), so nothing a killed driver or a long outage held back is lost.

The trial → run map is persisted in the search directory, so a resumed search reopens the
same runs (Ray's own MLflowLoggerCallback keeps no map and would duplicate them).

Traps handled: the store URI is always absolute (a trial's working directory is its own
folder); experiment ids are passed explicitly, never through `set_experiment`, whose
environment variable Ray workers would silently obey; MLflow's own HTTP retries (minutes of
silent blocking) are turned off in favour of the writer's; its "View run" lines are muted.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .metrics import better, logged, stopped_early
from .mlflow_ui import lead_metrics, local_store, read_tracking, tracking_json, ui_tags
from .record import Log
from .spec import students_of
from .storage import STUDENT_FILE, Storage, replace_atomically, trial_key

RUNS_FILE = "mlflow_runs.json"
TRACKING_FILE = "tracking.json"

# Server answers that retrying cannot change; anything else (no connection, 5xx, a locked
# sqlite file) is treated as the store being away for a while.
_PERMANENT = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}
MAX_BACKOFF_S = 30.0
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def configure_client() -> None:
    """One quick attempt per request (the writer retries), and no "View run" lines."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def default_store(trials_dir: Path) -> str:
    """trials/mlflow.db as an absolute sqlite URI, shared by all searches under trials/
    (recorded relative to the trials directory in tracking.json: `mlflow_ui.tracking_json`)."""
    return local_store(trials_dir)


def read_runs(path: Path, trials_dir: Path) -> SearchRuns:
    """The runs a tracking.json names, in the store it names as of where it is now."""
    return SearchRuns(**read_tracking(path, trials_dir))


def write_runs(path: Path, runs: SearchRuns, trials_dir: Path) -> None:
    replace_atomically(path, lambda p: p.write_text(tracking_json(runs.__dict__, trials_dir)))


def artifact_root(trials_dir: Path) -> str:
    return (trials_dir / "mlartifacts").resolve().as_uri()


def is_transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call is worth retrying later."""
    if isinstance(exc, MlflowException):
        return exc.error_code not in _PERMANENT
    return (
        isinstance(exc, OSError | ConnectionError | TimeoutError)
        or "requests" in type(exc).__module__
    )


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def check_reachable(tracking_uri: str) -> None:
    """Raise MlflowException (one line in its message) if the store does not answer."""
    configure_client()
    MlflowClient(tracking_uri).search_experiments(max_results=1)


@dataclass
class SearchRuns:
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def open_search(
    search_dir: Path,
    name: str,
    tracking_uri: str,
    artifacts: str | None,
    tags: dict[str, str],
    space_file: Path,
    params: dict[str, Any],
) -> SearchRuns:
    """Create (or, on resume, reopen) the search's experiment and parent run."""
    configure_client()
    client = MlflowClient(tracking_uri)
    state_path = search_dir / TRACKING_FILE
    if state_path.exists():
        known = read_runs(state_path, search_dir.parent)
        if known.tracking_uri == tracking_uri:
            client.update_run(known.parent_run_id, status="RUNNING")
            return known
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = f"{artifacts}/{name}" if artifacts else None
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = exp.experiment_id
    set_ui_tags(client, experiment_id, space_file)
    run = client.create_run(experiment_id, run_name=name, tags={**tags, "searchkd.role": "search"})
    client.log_batch(run.info.run_id, params=[Param(k, _param_str(v)) for k, v in params.items()])
    client.log_artifact(run.info.run_id, str(space_file))
    runs = SearchRuns(tracking_uri, experiment_id, run.info.run_id)
    write_runs(state_path, runs, search_dir.parent)
    return runs


def open_nested(
    runs: SearchRuns,
    state_path: Path,
    name: str,
    tags: dict[str, str],
    params: dict[str, Any],
    trials_dir: Path,
) -> SearchRuns:
    """A run nested under the search's parent run (the final stage's), created once (with
    `params`) and reopened by its `state_path` (or found again by its tags if that file was never
    written); the returned SearchRuns has it as the parent of its own child runs."""
    configure_client()
    client = MlflowClient(runs.tracking_uri)
    tags = {**tags, "mlflow.parentRunId": runs.parent_run_id, "searchkd.role": name}
    known = read_runs(state_path, trials_dir) if state_path.exists() else None
    if known and known.tracking_uri == runs.tracking_uri:
        client.update_run(known.parent_run_id, status="RUNNING")
        return known
    found = client.search_runs(
        [runs.experiment_id],
        filter_string=(
            f"tags.mlflow.parentRunId = '{runs.parent_run_id}' and tags.`searchkd.role` = '{name}'"
        ),
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(runs.experiment_id, run_name=name, tags=tags).info.run_id
        client.log_batch(run_id, params=[Param(k, _param_str(v)) for k, v in params.items()])
    nested = SearchRuns(runs.tracking_uri, runs.experiment_id, run_id)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    write_runs(state_path, nested, trials_dir)
    return nested


def set_ui_tags(client: MlflowClient, experiment_id: str, space_file: Path) -> None:
    import yaml

    for key, value in ui_tags(yaml.safe_load(Path(space_file).read_text()) or {}).items():
        client.set_experiment_tag(experiment_id, key, value)


def log_report(search_dir: Path, report_dir: Path) -> str:
    """Log a report's files as artifacts `report/` of the search's parent run; returns the
    run id. Experiments made before searchkd set its UI tags get them here."""
    configure_client()
    runs = read_runs(Path(search_dir) / TRACKING_FILE, Path(search_dir).parent)
    client = MlflowClient(runs.tracking_uri)
    if "mlflow.experimentKind" not in client.get_experiment(runs.experiment_id).tags:
        set_ui_tags(client, runs.experiment_id, Path(search_dir) / "space.yaml")
    client.log_artifacts(runs.parent_run_id, str(report_dir), artifact_path="report")
    return runs.parent_run_id


def _param_str(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def log_parent_metrics(runs: SearchRuns, metrics: dict[str, float]) -> None:
    MlflowClient(runs.tracking_uri).log_batch(
        runs.parent_run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()]
    )


def model_card(
    trial_number: int, config: dict[str, Any], result: dict[str, Any], tags: dict[str, str]
) -> str:
    lines = [
        f"# Student of trial {trial_number}",
        "",
        f"- student: {tags.get('student')}  teacher: {tags.get('teacher')}  objective: "
        f"{tags.get('objective')}",
        f"- epochs trained: {result.get('epoch')}  best val_acc: {result.get('best_val_acc')}  "
        f"test_acc (best-on-val student): {result.get('test_acc')}",
        f"- parameters: {result.get('student_params')}  MACs per image: "
        f"{result.get('student_macs')}",
        "",
        "Weights: `student_best.pt`, a plain state_dict of the student (load with "
        "`torch.load(path, weights_only=True)` into `searchkd.models.build_model(...)`); "
        "objective heads are not part of it.",
        "",
        "## Sampled configuration",
        "",
        *[f"- `{k}`: {v}" for k, v in sorted(config.items())],
        "",
    ]
    return "\n".join(lines)


# -- what the driver knows of each trial ------------------------------------------------------
@dataclass
class TrialRecord:
    """One trial as the driver saw it; the writer makes its MLflow run say the same."""

    number: int
    trial_id: str
    config: dict[str, Any]
    trial_dir: str = ""
    rows: dict[int, dict[str, float]] = field(default_factory=dict)  # epoch -> logged metrics
    outcome: str | None = None  # None while it runs; finished | stopped | failed | unfinished
    error: str | None = None
    node_id: str = ""


class MlflowWriter:
    """Brings MLflow in line with the driver's trial records, on its own thread, retrying
    while the store is away."""

    def __init__(
        self,
        runs: SearchRuns,
        search_dir: Path,
        storage: Storage,
        metric: str,
        mode: str,
        base_tags: dict[str, str],
        epochs: int,
        log: Log | None = None,
        *,
        key_tag: str = "trial_number",
        run_tags: Callable[[TrialRecord], dict[str, str]] | None = None,
        run_name: Callable[[TrialRecord], str] | None = None,
        track_best: bool = True,
    ) -> None:
        configure_client()
        # How a record's run is named, tagged and found again: a search's child runs are its
        # trials (`trial_number`); the final stage's are (config, seed) runs (`final_run`), whose
        # extra tags name the config's rank, its seed and its source trial. A final stage
        # ranks nothing on test, so it keeps no best value (`track_best`).
        self.key_tag, self.run_tags, self.run_name, self.track_best = (
            key_tag,
            run_tags,
            run_name,
            track_best,
        )
        self.runs = runs
        self.search_dir = Path(search_dir)
        self.storage = storage
        self.metric, self.mode = metric, mode
        self.base_tags = base_tags
        self.epochs = epochs
        self.log = log or (lambda text: print(text, flush=True))
        self.client = MlflowClient(runs.tracking_uri)
        self.records: dict[int, TrialRecord] = {}
        self._dirty: dict[int, None] = {}  # trial numbers to sync, in order
        self._cond = threading.Condition()
        self._busy = False
        self._down_since: float | None = None
        self._thread: threading.Thread | None = None
        path = self.search_dir / RUNS_FILE
        try:
            self._map: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            self._map = {}  # each run is found again by its trial_number tag
        self._logged_steps: dict[str, set[int]] = {}
        self._params_done: set[str] = set()
        self._best: float | None = None

    # -- the callback side: record and mark ----------------------------------------------
    def record(
        self, number: int, trial_id: str, config: dict[str, Any], trial_dir: str = ""
    ) -> TrialRecord:
        with self._cond:
            rec = self.records.get(number)
            if rec is None or rec.trial_id != trial_id:
                rec = self.records[number] = TrialRecord(number, trial_id, dict(config), trial_dir)
            return rec

    def update(self, number: int, change: Callable[[TrialRecord], None]) -> None:
        with self._cond:
            rec = self.records[number]
            change(rec)
            self._dirty[number] = None
            self._cond.notify_all()
        self._start()

    # -- the writer thread ------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="searchkd-mlflow", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        backoff, retry_at = 1.0, 0.0
        while True:
            with self._cond:
                while not self._dirty or time.time() < retry_at:
                    self._cond.wait(
                        timeout=max(0.05, retry_at - time.time()) if self._dirty else None
                    )
                number = next(iter(self._dirty))
                del self._dirty[number]
                rec = self.records[number]
                snapshot = TrialRecord(
                    rec.number,
                    rec.trial_id,
                    dict(rec.config),
                    rec.trial_dir,
                    dict(rec.rows),
                    rec.outcome,
                    rec.error,
                    rec.node_id,
                )
                self._busy = True
            try:
                self._sync(snapshot)
                failure = None
            except Exception as exc:  # noqa: BLE001 - any failure of the store: retry or report
                failure = exc
            with self._cond:
                self._busy = False
                if failure is None:
                    if self._down_since is not None:
                        self.log(
                            f"searchkd: tracking server {self.runs.tracking_uri} is back after "
                            f"{time.time() - self._down_since:.0f}s; sending the updates it missed"
                        )
                        self._down_since = None
                    backoff, retry_at = 1.0, 0.0
                elif not is_transient(failure):
                    self.log(
                        f"searchkd: warning: MLflow refused an update of trial {number}: "
                        f"{one_line(failure)}"
                    )
                else:
                    self._dirty = {number: None, **self._dirty}  # retried first, after a pause
                    if self._down_since is None:
                        self._down_since = time.time()
                        self.log(
                            f"searchkd: warning: tracking server {self.runs.tracking_uri} "
                            "unreachable "
                            f"({one_line(failure)}); training goes on, MLflow updates are kept and "
                            f"sent when it is back"
                        )
                    retry_at = time.time() + backoff
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                self._cond.notify_all()

    def pending(self) -> int:
        """How many trials have updates MLflow does not hold yet."""
        with self._cond:
            return len(self._dirty) + int(self._busy)

    def drain(self, timeout: float) -> bool:
        """Wait until every recorded update is in MLflow (True) or `timeout` passes (False)."""
        self._start()
        deadline = time.time() + timeout
        with self._cond:
            while self._dirty or self._busy:
                left = deadline - time.time()
                if left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 1.0))
        return True

    @property
    def down(self) -> bool:
        return self._down_since is not None

    # -- one trial's sync (writer thread only) ------------------------------------------------
    def _run_id(self, rec: TrialRecord) -> str:
        key = str(rec.number)
        rid = self._map.get(key)
        if rid is not None:
            return rid
        # A run created before the map was written (driver killed in between) is reused.
        found = self.client.search_runs(
            [self.runs.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.runs.parent_run_id}' "
            f"and tags.{self.key_tag} = '{rec.number}'",
        )
        if found:
            rid = found[0].info.run_id
        else:
            tags = {
                **self.base_tags,
                "mlflow.parentRunId": self.runs.parent_run_id,
                "trial_id": rec.trial_id,
                self.key_tag: str(rec.number),
                "ray_trial_dir": rec.trial_dir,
                "trial_storage": self.storage.child(trial_key(rec.number)).display,
            }
            if "objective" in rec.config:
                tags["objective"] = str(rec.config["objective"])
            tags.update(self.run_tags(rec) if self.run_tags else {})
            name = self.run_name(rec) if self.run_name else f"trial-{rec.number:03d}"
            rid = self.client.create_run(
                self.runs.experiment_id, run_name=name, tags=tags
            ).info.run_id
        self._map[key] = rid
        replace_atomically(
            self.search_dir / RUNS_FILE, lambda p: p.write_text(json.dumps(self._map, indent=1))
        )
        return rid

    def _logged(self, rid: str) -> set[int]:
        """The epochs this run holds: epochs a restarted trial reports again are not logged
        twice, and an epoch a killed driver never sent is sent, whatever came after it."""
        if rid not in self._logged_steps:
            self._logged_steps[rid] = {
                int(m.step) for m in self.client.get_metric_history(rid, "epoch")
            }
        return self._logged_steps[rid]

    def _sync(self, rec: TrialRecord) -> None:
        rid = self._run_id(rec)
        client = self.client
        if rid not in self._params_done:
            params = [
                Param(k, _param_str(v))
                for k, v in sorted(rec.config.items())
                if k != "trial_number"
            ]
            client.log_batch(rid, params=params)  # the same values again are a no-op
            self._params_done.add(rid)
        run = client.get_run(rid)
        tags = run.data.tags
        if rec.outcome != "failed" and "error" in tags:
            client.delete_tag(rid, "error")  # a failed trial that ran again is not failed any more
        if rec.node_id and tags.get("ray_node") != rec.node_id:
            client.set_tag(rid, "ray_node", rec.node_id)
        new = sorted(e for e in rec.rows if e not in self._logged(rid))
        lead = {k: i for i, k in enumerate(lead_metrics([self.metric]))}
        metrics = [
            Metric(k, v, int(rec.rows[e].get("timestamp", 0) * 1000), e)
            for e in new
            for k, v in sorted(rec.rows[e].items(), key=lambda kv: lead.get(kv[0], len(lead)))
            if k != "timestamp" and math.isfinite(v)
        ]
        for i in range(0, len(metrics), METRICS_PER_BATCH):
            client.log_batch(rid, metrics=metrics[i : i + METRICS_PER_BATCH])
        if new:
            self._logged(rid).update(new)
            if self.track_best:
                self._improve_best(rec, rid, [rec.rows[e] for e in new])
        if rec.outcome is None:
            if run.info.status != "RUNNING":
                client.update_run(rid, status="RUNNING")
            return
        if rec.outcome == "unfinished":  # the search stopped while it ran; a resume goes on
            if run.info.status == "RUNNING":
                client.set_terminated(rid, status="KILLED")
            return
        if rec.outcome == "failed":
            if (
                run.info.status != "FAILED"
                or tags.get("error") != (rec.error or "trial failed")[:5000]
            ):
                client.set_tag(rid, "error", (rec.error or "trial failed")[:5000])
                client.set_terminated(rid, status="FAILED")
            return
        stopped = str(rec.outcome == "stopped").lower()
        if run.info.status == "FINISHED" and tags.get("stopped_early") == stopped:
            return  # closed before (artifacts are logged before the status, so they are there)
        last = rec.rows[max(rec.rows)] if rec.rows else {}
        weights = self.storage.child(trial_key(rec.number)).read_bytes(STUDENT_FILE)
        if weights is not None:
            with tempfile.TemporaryDirectory(prefix="searchkd-art-") as d:
                (Path(d) / STUDENT_FILE).write_bytes(weights)
                client.log_artifact(rid, str(Path(d) / STUDENT_FILE))
        objective = {"objective": rec.config["objective"]} if "objective" in rec.config else {}
        card = model_card(rec.number, _public(rec.config), last, {**self.base_tags, **objective})
        client.log_text(rid, card, "model_card.md")
        client.set_tag(rid, "stopped_early", stopped)
        client.set_terminated(rid, status="FINISHED")

    def _improve_best(self, rec: TrialRecord, rid: str, rows: list[dict[str, float]]) -> None:
        """The parent run's best value so far, with the trial and config that reached it."""
        if self._best is None:  # after a restore: continue from what the parent already holds
            self._best = self.client.get_run(self.runs.parent_run_id).data.metrics.get(
                f"best_{self.metric}"
            )
        for row in rows:
            value = row.get("score", row.get(self.metric))
            best = math.nan if self._best is None else self._best
            if value is not None and better(value, best, self.mode):
                self._best = value
                step = int(row.get("epoch", 0))
                self.client.log_batch(
                    self.runs.parent_run_id,
                    metrics=[Metric(f"best_{self.metric}", value, int(time.time() * 1000), step)],
                    tags=[
                        RunTag("best_trial", str(rec.number)),
                        RunTag("best_run_id", rid),
                        RunTag("best_config", json.dumps(_public(rec.config), sort_keys=True)),
                    ],
                )

    def close_search(self, status: str) -> None:
        self.client.set_terminated(self.runs.parent_run_id, status=status)


class MlflowRecorder:
    """Tune's side of the writer: records each trial's start, rows and end, and never waits.

    Its methods take Tune's trial objects (duck-typed: `trial_id`, `config`, `last_result`,
    `error_file`), called by the search's Tune callback.
    """

    def __init__(self, writer: MlflowWriter) -> None:
        self.writer = writer

    def _record(self, trial: Any, number: int | None = None) -> TrialRecord:
        """The record of a trial's student `number` (of an unpacked trial: its only one)."""
        configs = students_of(trial.config)
        number = next(iter(configs)) if number is None else number
        return self.writer.record(
            number,
            trial.trial_id,
            configs.get(number, {}),
            str(getattr(trial, "local_path", "") or ""),
        )

    def _set(
        self, trial: Any, outcome: str | None, error: str | None = None, number: int | None = None
    ) -> None:
        def change(r: TrialRecord) -> None:
            r.outcome, r.error = outcome, error

        self.writer.update(self._record(trial, number).number, change)

    def on_trial_start(self, trial: Any) -> None:
        for number in students_of(trial.config):
            self._set(trial, None, number=number)

    def on_trial_result(self, trial: Any, result: dict) -> None:
        row = logged(result)
        if "epoch" not in row:
            return
        row["timestamp"] = float(result.get("timestamp", time.time()))

        def add(r: TrialRecord) -> None:
            r.rows[int(row["epoch"])] = row
            r.node_id = str(result.get("node_id", r.node_id))

        number = int(result["trial_number"]) if "trial_number" in result else None
        self.writer.update(self._record(trial, number).number, add)

    def on_trial_complete(self, trial: Any) -> None:
        epoch = int((trial.last_result or {}).get("epoch", 0))
        self._set(trial, "stopped" if stopped_early(epoch, self.writer.epochs) else "finished")

    def end(self, trial: Any, number: int, outcome: str) -> None:
        """A student of a packed trial ended ("finished" or "stopped") while its cohort goes on."""
        self._set(trial, outcome, number=number)

    def on_trial_error(self, trial: Any, numbers: list[int] | None = None) -> None:
        reason = error_reason(trial)
        for number in numbers if numbers is not None else list(students_of(trial.config)):
            self._set(trial, "failed", reason, number=number)

    def resync(
        self, rows: dict[int, list[dict[str, Any]]], outcomes: Any, numbers: set[int] | None = None
    ) -> None:
        """Mark every trial for a sync from the durable record: its Parquet rows and how it
        ended (`outcomes`: `status`, `errors`, `trial_ids`, `configs` keyed by trial number)."""
        wanted = set(rows) | set(outcomes.status)
        for number in sorted(wanted if numbers is None else wanted & numbers):
            mine = rows.get(number, [])
            config = outcomes.configs.get(number) or (
                {**json.loads(mine[-1]["config"]), "trial_number": number} if mine else None
            )
            trial_id = outcomes.trial_ids.get(number) or (mine[-1]["trial_id"] if mine else "")
            if config is None:
                continue
            rec = self.writer.record(number, trial_id, config)
            status = outcomes.status.get(number)

            def change(
                r: TrialRecord, status: str | None = status, number: int = number, mine: list = mine
            ) -> None:
                for row in mine:
                    kept = logged(row)
                    kept["timestamp"] = float(row.get("timestamp", 0.0))
                    r.rows.setdefault(int(row["epoch"]), kept)
                if status is not None:
                    r.outcome, r.error = status, outcomes.errors.get(number)

            self.writer.update(rec.number, change)


def _public(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "trial_number"}


def error_reason(trial: Any) -> str:
    """The last line of a failed trial's error: what went wrong, without the traceback."""
    path = getattr(trial, "error_file", None)
    text = ""
    if path and os.path.exists(path):
        text = Path(path).read_text()
    text = text or str(getattr(trial, "error_msg", "") or "trial failed")
    return last_line(text)


def last_line(text: str) -> str:
    """The last line of a traceback, without the exception's dotted class name when it is
    one of searchkd's own (their messages are written to stand alone)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "trial failed"
    return re.sub(r"^searchkd(\.\w+)+: ", "", lines[-1].strip())
