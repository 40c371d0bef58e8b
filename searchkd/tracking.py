"""MLflow tracking, done by the driver: one experiment per search, a parent run, one child
run per trial.

The driver logs through a Tune callback, so however many trials run, one process writes the
store. The trial → run map is persisted in the search directory after every new run, so a
resumed search reopens the same runs (Ray's own MLflowLoggerCallback keeps no map and would
duplicate them). The callback holds only paths and ids: Ray pickles it into the experiment
state and unpickles it on `Tuner.restore`, and the client is rebuilt lazily.

Traps handled (DESIGN.md): the store URI is always absolute (a trial's working directory is
its own folder); experiment ids are passed explicitly, never through `set_experiment`, whose
environment variable Ray workers would silently obey.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

RUNS_FILE = "mlflow_runs.json"
TRACKING_FILE = "tracking.json"
STUDENT_FILE = "student_best.pt"


def default_store(trials_dir: Path) -> str:
    """trials/mlflow.db as an absolute sqlite URI, shared by all searches under trials/."""
    return f"sqlite:///{(trials_dir / 'mlflow.db').resolve()}"


def artifact_root(trials_dir: Path) -> str:
    return (trials_dir / "mlartifacts").resolve().as_uri()


def _atomic_json(path: Path, payload: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


@dataclass
class SearchRuns:
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def open_search(
    search_dir: Path, name: str, tracking_uri: str, artifacts: str | None, tags: dict[str, str],
    space_file: Path, params: dict[str, Any],
) -> SearchRuns:
    """Create (or, on resume, reopen) the search's experiment and parent run."""
    client = MlflowClient(tracking_uri)
    state_path = search_dir / TRACKING_FILE
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state["tracking_uri"] == tracking_uri:
            client.update_run(state["parent_run_id"], status="RUNNING")
            return SearchRuns(**state)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = f"{artifacts}/{name}" if artifacts else None
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = exp.experiment_id
    run = client.create_run(experiment_id, run_name=name, tags={**tags, "searchkd.role": "search"})
    client.log_batch(run.info.run_id, params=[Param(k, _param_str(v)) for k, v in params.items()])
    client.log_artifact(run.info.run_id, str(space_file))
    runs = SearchRuns(tracking_uri, experiment_id, run.info.run_id)
    _atomic_json(state_path, runs.__dict__)
    return runs


def _param_str(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def close_search(runs: SearchRuns, status: str = "FINISHED") -> None:
    MlflowClient(runs.tracking_uri).set_terminated(runs.parent_run_id, status=status)


def log_parent_metrics(runs: SearchRuns, metrics: dict[str, float]) -> None:
    MlflowClient(runs.tracking_uri).log_batch(
        runs.parent_run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()]
    )


def model_card(trial_number: int, config: dict[str, Any], result: dict[str, Any], tags: dict[str, str]) -> str:
    lines = [
        f"# Student of trial {trial_number}",
        "",
        f"- student: {tags.get('student')}  teacher: {tags.get('teacher')}  objective: {tags.get('objective')}",
        f"- epochs trained: {result.get('epoch')}  best val_acc: {result.get('best_val_acc')}  "
        f"test_acc (best-on-val student): {result.get('test_acc')}",
        f"- parameters: {result.get('student_params')}  MACs per image: {result.get('student_macs')}",
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


class MlflowCallback(Callback):
    """Logs each trial into its own nested run; reopens the same run after a resume."""

    def __init__(self, runs: SearchRuns, search_dir: Path, metric: str, mode: str,
                 base_tags: dict[str, str], epochs: int) -> None:
        self.runs = runs
        self.search_dir = Path(search_dir)
        self.metric, self.mode = metric, mode
        self.base_tags = base_tags
        self.epochs = epochs
        self._client: MlflowClient | None = None
        self._map: dict[str, str] | None = None
        self._best: float | None = None
        self._last_step: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client=None, _map=None, _best=None, _last_step={})
        return state

    def last_step(self, rid: str) -> int:
        """The last epoch this run holds: a trial re-running epochs after a restore is not
        logged twice (its metric steps continue instead of repeating)."""
        if rid not in self._last_step:
            history = self.client.get_metric_history(rid, "epoch")
            self._last_step[rid] = max((m.step for m in history), default=0)
        return self._last_step[rid]

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.runs.tracking_uri)
        return self._client

    @property
    def run_map(self) -> dict[str, str]:
        if self._map is None:
            path = self.search_dir / RUNS_FILE
            self._map = json.loads(path.read_text()) if path.exists() else {}
        return self._map

    def run_id(self, trial: Any) -> str:
        """The trial's run: reopened if it exists, created (and persisted) if not."""
        rid = self.run_map.get(trial.trial_id)
        if rid is not None:
            return rid
        cfg = trial.config
        number = int(cfg.get("trial_number", len(self.run_map)))
        tags = {
            **self.base_tags,
            "mlflow.parentRunId": self.runs.parent_run_id,
            "trial_id": trial.trial_id,
            "trial_number": str(number),
            "ray_trial_dir": str(getattr(trial, "local_path", "") or ""),
        }
        if "objective" in cfg:
            tags["objective"] = str(cfg["objective"])
        # A run the driver created but had not mapped when it was killed is reused, not doubled.
        found = self.client.search_runs(
            [self.runs.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.runs.parent_run_id}' "
                          f"and tags.trial_id = '{trial.trial_id}'",
        )
        run = found[0] if found else self.client.create_run(
            self.runs.experiment_id, run_name=f"trial-{number:03d}", tags=tags)
        params = [Param(k, _param_str(v)) for k, v in sorted(cfg.items()) if k != "trial_number"]
        self.client.log_batch(run.info.run_id, params=params)  # same values again: a no-op
        # Persisted once complete; a run created but not yet mapped when the driver dies is
        # found by its trial_id tag and removed by drop_orphan_runs.
        self.run_map[trial.trial_id] = run.info.run_id
        _atomic_json(self.search_dir / RUNS_FILE, self.run_map)
        return run.info.run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rid = self.run_id(trial)
        self.client.update_run(rid, status="RUNNING")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        rid = self.run_id(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if step <= self.last_step(rid):
            return
        self._last_step[rid] = step
        ts = int(result.get("timestamp", 0) * 1000)
        metrics = [
            Metric(k, float(v), ts, step)
            for k, v in result.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and (k in _LOGGED or k.startswith("loss_"))
        ]
        self.client.log_batch(rid, metrics=[m for m in metrics if math.isfinite(m.value)])
        value = result.get(self.metric)
        if self._best is None:  # after a restore: continue from what the parent already holds
            self._best = self.client.get_run(self.runs.parent_run_id).data.metrics.get(f"best_{self.metric}")
        if isinstance(value, int | float) and math.isfinite(value):
            better = self._best is None or (value > self._best if self.mode == "max" else value < self._best)
            if better:
                self._best = float(value)
                self.client.log_batch(self.runs.parent_run_id, metrics=[Metric(f"best_{self.metric}", float(value), ts, step)],
                                      tags=[RunTag("best_trial", str(trial.config.get("trial_number"))),
                                            RunTag("best_run_id", rid),
                                            RunTag("best_config", json.dumps(_public(trial.config), sort_keys=True))])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rid = self.run_id(trial)
        result = trial.last_result or {}
        stopped = int(result.get("epoch", 0)) < self.epochs
        self.client.set_tag(rid, "stopped_early", str(stopped).lower())
        ckpt = trial.checkpoint
        if ckpt is not None:
            with ckpt.as_directory() as d:
                weights = Path(d) / STUDENT_FILE
                if weights.exists():
                    self.client.log_artifact(rid, str(weights))
        card = model_card(int(trial.config.get("trial_number", -1)), _public(trial.config), result,
                          {**self.base_tags, **({"objective": trial.config["objective"]} if "objective" in trial.config else {})})
        self.client.log_text(rid, card, "model_card.md")
        self.client.set_terminated(rid, status="FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rid = self.run_id(trial)
        reason = _error_reason(trial)
        self.client.set_tag(rid, "error", reason[:5000])
        self.client.set_terminated(rid, status="FAILED")


def drop_orphan_runs(runs: SearchRuns, search_dir: Path, known: set[str]) -> int:
    """Delete child runs of trials Tune does not know (see search.reconcile); returns how many.

    The store is searched, not only the persisted map: a driver killed between creating a run
    and writing the map leaves a run the map never names.
    """
    client = MlflowClient(runs.tracking_uri)
    children = client.search_runs(
        [runs.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{runs.parent_run_id}'",
        max_results=50_000,
    )
    path = search_dir / RUNS_FILE
    mapping: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}

    def orphan(run: Any) -> bool:
        tid = run.data.tags.get("trial_id")
        # Unknown to Tune, or a second run of a known trial (the first was never mapped).
        return tid not in known or mapping.get(tid, run.info.run_id) != run.info.run_id

    orphans = [r.info.run_id for r in children if orphan(r)]
    for rid in orphans:
        client.delete_run(rid)
    if orphans and mapping:
        _atomic_json(path, {tid: rid for tid, rid in mapping.items() if tid in known})
    return len(orphans)


def _public(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "trial_number"}


def _error_reason(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    text = ""
    if path and os.path.exists(path):
        text = Path(path).read_text()
    text = text or str(getattr(trial, "error_msg", "") or "trial failed")
    last = [line for line in text.strip().splitlines() if line.strip()]
    return last[-1] if last else "trial failed"


_LOGGED = {
    "epoch", "train_loss", "val_acc", "val_top5", "best_val_acc", "test_acc", "lr", "epoch_seconds",
    "images_per_second", "student_params", "student_macs", "start_epoch",
}
