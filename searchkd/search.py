"""The search: Ray Tune runs trials, Optuna samples them, ASHA stops the poor ones.

A search lives in `trials/<name>/`: `space.yaml` (the resolved spec it started with),
`ray/` (Tune's experiment state and trial checkpoints), `optuna.journal` (the study),
`results.parquet` (one row per trial per epoch) and the MLflow bookkeeping. Resume is
`Tuner.restore(..., resume_unfinished=True, resume_errored=True)` on the same directory:
finished trials stay finished, unfinished ones go on from their last epoch checkpoint, the
Optuna study and the MLflow runs are the same ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
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
from .teacher import TeacherInfo
from .trial import train_trial

Log = Callable[[str], None]
SPACE_FILE = "space.yaml"
RESULTS_FILE = "results.parquet"
JOURNAL_FILE = "optuna.journal"
STATE_FILE = "state.json"
RAY_DIR = "ray"


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
    """OptunaSearch that tolerates what a driver killed between snapshots leaves behind.

    Tune restores its trials from the last experiment snapshot; a trial that finished after
    it runs its last epochs again from its checkpoint, while the Optuna study already holds
    its final value. Reports and completions for trials Optuna already closed are ignored
    instead of crashing the driver: the first, recorded value stands.
    """

    def _closed(self, trial_id: str) -> bool:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return True
        frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
        return frozen.state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._closed(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._closed(trial_id):
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


class ResultsCallback(Callback):
    """Keeps `results.parquet`: one row per trial per epoch, rewritten atomically each result.

    Rows are keyed by (trial_id, epoch); a resumed trial that re-reports an epoch replaces
    that row instead of duplicating it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._rows: dict[tuple[str, int], dict[str, Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_rows": None}

    @property
    def rows(self) -> dict[tuple[str, int], dict[str, Any]]:
        if self._rows is None:
            self._rows = {}
            if self.path.exists():
                for r in pq.read_table(self.path).to_pylist():
                    self._rows[(r["trial_id"], int(r["epoch"]))] = r
        return self._rows

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        row = {k: v for k, v in result.items() if _scalar(v) and (k in _RESULT_KEYS or k.startswith("loss_"))}
        row["trial_id"] = trial.trial_id
        row["trial_number"] = int(trial.config.get("trial_number", -1))
        row["objective"] = str(trial.config.get("objective", ""))
        row["config"] = json.dumps({k: v for k, v in trial.config.items() if k != "trial_number"}, sort_keys=True)
        row["timestamp"] = float(result.get("timestamp", time.time()))
        self.rows[(trial.trial_id, int(result["epoch"]))] = row
        self.write()

    def write(self) -> None:
        rows = sorted(self.rows.values(), key=lambda r: (r["trial_number"], r["epoch"]))
        keys = sorted({k for r in rows for k in r})
        table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)


def _scalar(v: Any) -> bool:
    return isinstance(v, int | float | str) and not isinstance(v, bool)


_RESULT_KEYS = {
    "epoch", "train_loss", "val_acc", "val_top5", "best_val_acc", "test_acc", "lr", "epoch_seconds",
    "images_per_second", "student_params", "student_macs", "start_epoch",
}


class ProgressCallback(Callback):
    """One line per finished trial (and a heartbeat), with the best value so far."""

    def __init__(self, metric: str, mode: str, num_samples: int, epochs: int, heartbeat_s: float = 15.0) -> None:
        self.metric, self.mode = metric, mode
        self.num_samples, self.epochs = num_samples, epochs
        self.heartbeat_s = heartbeat_s
        self.start = time.time()
        self.last_beat = 0.0
        self.best: tuple[float, int] | None = None

    def setup(self, **info: Any) -> None:
        self.start = time.time()
        self.best = None

    def _line(self, text: str, trials: list) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        best = f"best {self.metric} {self.best[0]:.4f} (trial {self.best[1]})" if self.best else "best -"
        print(f"[{time.time() - self.start:6.0f}s] {text:<48} | {done}/{self.num_samples} done, "
              f"{running} running | {best}", flush=True)
        self.last_beat = time.time()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            number = int(trial.config.get("trial_number", -1))
            if self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0]):
                self.best = (float(value), number)
        if time.time() - self.last_beat > self.heartbeat_s:
            self._line(f"trial {trial.config.get('trial_number')} epoch {result.get('epoch')}/{self.epochs}", trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        how = "finished" if int(r.get("epoch", 0)) >= self.epochs else "stopped by ASHA"
        value = r.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        self._line(f"trial {trial.config.get('trial_number')} {how} at epoch {r.get('epoch')} "
                   f"{self.metric} {shown}", trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(f"trial {trial.config.get('trial_number')} FAILED", trials)


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
    tracking_uri: str
    experiment_id: str


def summarize(search_dir: Path, spec: Spec, teacher: TeacherInfo, runs: tracking.SearchRuns,
              statuses: dict[str, int]) -> Summary | None:
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
        trials=len(per_trial), finished=statuses.get("finished", 0), stopped=statuses.get("stopped", 0),
        failed=statuses.get("failed", 0), teacher=teacher, tracking_uri=runs.tracking_uri,
        experiment_id=runs.experiment_id,
    )


def tunable_owners(spec: Spec, tunables: dict[str, set[str]]) -> dict[str, list[str]]:
    return {key: [o for o in spec.objectives if key.partition(".")[2] in tunables[o]]
            for key in spec.params if key.startswith("loss.")}


def quiet() -> None:
    """searchkd prints its own progress: silence Tune's tables and the libraries' chatter."""
    import logging
    import warnings

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # legacy reporter: verbose=0 prints nothing
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def _ensure_ray(address: str | None, num_cpus: int | None) -> None:
    if ray.is_initialized():
        return
    import logging

    ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
             log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)


def connect(spec: Spec, address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or join) Ray and check that one trial fits the cluster, before anything is written."""
    quiet()
    _ensure_ray(address, num_cpus)
    res = ray.cluster_resources()
    want = spec.search.resources
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if want.cpu > cpus + 1e-9:
        raise SearchError(f"search.resources.cpu: {want.cpu:g} per trial but the cluster has {cpus:g} CPUs")
    if want.gpu > gpus + 1e-9:
        raise SearchError(f"search.resources.gpu: {want.gpu:g} per trial but the cluster has {gpus:g} GPUs")


def _concurrency(spec: Spec) -> int:
    res = ray.cluster_resources()
    want = spec.search.resources
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    fit = math.floor(cpus / want.cpu + 1e-9)
    if want.gpu > 0:
        fit = min(fit, math.floor(gpus / want.gpu + 1e-9))
    return max(1, min(spec.search.max_concurrent or fit, fit, spec.search.num_samples))


def build_tuner(spec: Spec, search_dir: Path, teacher: TeacherInfo | None, callbacks: list[Callback],
                tunables: dict[str, set[str]], resume: bool) -> tune.Tuner:
    res = spec.search.resources
    memory_fraction = res.gpu if 0 < res.gpu < 1 else None
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=spec.model_dump(mode="json", by_alias=True),
                             teacher=str(teacher.path) if teacher else None, cpus=res.cpu,
                             memory_fraction=memory_fraction),
        {"cpu": res.cpu, "gpu": res.gpu},
    )
    ray_dir = search_dir / RAY_DIR
    if resume and tune.Tuner.can_restore(str(ray_dir)):
        repair_checkpoints(ray_dir)
        return tune.Tuner.restore(str(ray_dir), trainable, resume_unfinished=True, resume_errored=True)
    metric = spec.metrics if len(spec.metrics) > 1 else spec.metrics[0]
    mode = spec.modes if len(spec.modes) > 1 else spec.modes[0]
    params = {k: p.model_dump(by_alias=True, exclude_none=True) for k, p in spec.params.items()}
    space = SearchSpace(params, spec.objectives, tunable_owners(spec, tunables), spec.search.seed)
    searcher = ResumableOptunaSearch(space, metric=metric, mode=mode, sampler=make_sampler(spec),
                            study_name=spec.name, storage=journal_storage(search_dir))
    if spec.search.scheduler == "asha":
        # ASHA counts epochs, not reports: a resumed trial re-reports its checkpoint's epoch.
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
            name=RAY_DIR, storage_path=str(search_dir), verbose=0, callbacks=callbacks,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
        ),
    )


def repair_checkpoints(ray_dir: Path) -> int:
    """Give back to Tune the checkpoints its last snapshot names but a kill let it delete.

    Tune keeps one checkpoint per trial and snapshots its state every ~10 s: a driver killed
    in between leaves a snapshot naming checkpoint k while only k+1 (or later) is on disk,
    and `Tuner.restore` then fails that trial ("does not exist on storage anymore"). The
    newest checkpoint is copied under the name the snapshot expects; the trial goes on from
    the newer state (its epoch is inside). Returns how many were repaired.
    """
    states = sorted(ray_dir.glob("experiment_state-*.json"))
    if not states:
        return 0
    repaired = 0
    for trial_json, meta in json.loads(states[-1].read_text())["trial_data"]:
        trial_id = json.loads(trial_json)["trial_id"]
        dirs = [d for d in ray_dir.glob(f"*_{trial_id}_*") if d.is_dir()]
        existing = sorted(dirs[0].glob("checkpoint_*")) if len(dirs) == 1 else []
        if not existing:
            continue
        for name in _checkpoint_names(meta):
            if not (dirs[0] / name).exists():
                shutil.copytree(existing[-1], dirs[0] / name)
                repaired += 1
    return repaired


def _checkpoint_names(meta: Any) -> set[str]:
    """Checkpoint directory names a trial's run metadata mentions, in its JSON and inside the
    cloudpickled objects Tune stores there as hex (read as bytes, never unpickled)."""
    text = meta if isinstance(meta, str) else json.dumps(meta)
    names = set(re.findall(r"checkpoint_\d{6}", text))
    for blob in re.findall(r'"value": "([0-9a-f]+)"', text):
        names |= {n.decode() for n in re.findall(rb"checkpoint_\d{6}", bytes.fromhex(blob))}
    return names


def trial_statuses(ray_dir: Path, epochs: int) -> dict[str, int]:
    """finished / stopped (by ASHA) / failed counts from Tune's own experiment state."""
    from ray.tune import ExperimentAnalysis

    counts = {"finished": 0, "stopped": 0, "failed": 0}
    analysis = ExperimentAnalysis(str(ray_dir))
    for t in analysis.trials:
        if t.status == "ERROR":
            counts["failed"] += 1
        elif t.status == "TERMINATED":
            full = int((t.last_result or {}).get("epoch", 0)) >= epochs
            counts["finished" if full else "stopped"] += 1
    return counts


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
    log: Log = print,
) -> Summary | None:
    """Run (or resume) a search whose directory and space.yaml already exist."""
    quiet()
    uri = tracking_uri or tracking.default_store(trials_dir)
    artifacts = None if tracking_uri else tracking.artifact_root(trials_dir)
    base_tags = {"teacher": spec.teacher.arch, "student": spec.student.arch, "search": spec.name,
                 "dataset": spec.data.dataset}
    if isinstance(spec.objective, str):
        base_tags["objective"] = spec.objective
    runs = tracking.open_search(
        search_dir, spec.name, uri, artifacts, base_tags, search_dir / SPACE_FILE,
        params={"num_samples": spec.search.num_samples, "sampler": spec.search.sampler,
                "scheduler": spec.search.scheduler, "seed": spec.search.seed,
                "teacher_digest": teacher.digest},
    )
    tracking.log_parent_metrics(runs, {"teacher_test_acc": teacher.test_acc, "teacher_val_acc": teacher.val_acc})
    connect(spec, address, num_cpus)
    metric, mode = spec.metrics[0], spec.modes[0]
    callbacks: list[Callback] = [
        tracking.MlflowCallback(runs, search_dir, metric, mode, base_tags, spec.train.epochs),
        ResultsCallback(search_dir / RESULTS_FILE),
        ProgressCallback(metric, mode, spec.search.num_samples, spec.train.epochs),
    ]
    tuner = build_tuner(spec, search_dir, teacher, callbacks, tunables, resume)
    _write_state(search_dir, "running")
    log(f"search {spec.name}: {spec.search.num_samples} trials of {spec.train.epochs} epochs "
        f"({'resumed' if resume else 'new'}), in {search_dir}")
    tuner.fit()
    statuses = trial_statuses(search_dir / RAY_DIR, spec.train.epochs)
    total = sum(statuses.values())
    complete = total >= spec.search.num_samples
    if complete:
        reconcile(search_dir, spec.name, runs)
    _write_state(search_dir, "finished" if complete else "interrupted", statuses)
    tracking.close_search(runs, "FINISHED" if complete else "KILLED")
    return summarize(search_dir, spec, teacher, runs, statuses)


def reconcile(search_dir: Path, name: str, runs: tracking.SearchRuns) -> dict[str, int]:
    """Drop what a driver killed between Tune snapshots left behind, once a search is complete.

    Tune forgets trials it started after its last experiment snapshot and starts new ones in
    their place. Their Optuna trials stay RUNNING (marked FAIL here, with the reason), their
    MLflow runs would be extra children (deleted), their Parquet rows extra rows (dropped), so
    that every store holds exactly the trials Tune ran to the end.
    """
    from ray.tune import ExperimentAnalysis

    known = {t.trial_id for t in ExperimentAnalysis(str(search_dir / RAY_DIR)).trials}
    dropped_runs = tracking.drop_orphan_runs(runs, search_dir, known)
    path = search_dir / RESULTS_FILE
    dropped_rows = 0
    if path.exists():
        results = ResultsCallback(path)
        orphans = [k for k in results.rows if k[0] not in known]
        for k in orphans:
            del results.rows[k]
        dropped_rows = len(orphans)
        if orphans:
            results.write()
    study = load_study(search_dir, name)
    storage = study._storage
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        storage.set_trial_user_attr(t._trial_id, "searchkd", "orphaned: its driver was killed before Tune saved it")
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return {"runs": dropped_runs, "rows": dropped_rows, "optuna": len(stale)}


def _write_state(search_dir: Path, status: str, counts: dict[str, int] | None = None) -> None:
    path = search_dir / STATE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"status": status, "trials": counts or {}, "time": time.time()}))
    os.replace(tmp, path)


def search_status(search_dir: Path) -> str | None:
    path = search_dir / STATE_FILE
    return json.loads(path.read_text())["status"] if path.exists() else None
