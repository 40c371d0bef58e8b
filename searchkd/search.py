"""The search: Ray Tune runs trials, Optuna samples them, ASHA stops the poor ones.

A search lives in `trials/<name>/`: `space.yaml` (the resolved spec it started with),
`optuna.journal` (the study), `results.jsonl` / `results.parquet` (one row per trial per
epoch), `ray/run-NNN` (one Tune experiment per run of the search) and the MLflow bookkeeping,
all on the driver's disk. What trials write (each one's engine state and best student) goes to
the search's storage (storage.py): the search directory itself by default, or a shared path /
object store that every node of a cluster reaches. The study is the record of which trials
exist and how they ended, so a resume never restores Tune: it starts a new Tune experiment
whose searcher first runs again the trials the study holds open (each picks up its own state
from the storage), then asks new ones; ASHA's rungs are rebuilt from the recorded rows, and
the MLflow runs are the same ones.
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
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from . import tracking
from .compat import open_trial
from .engine import DataShape, trial_memory
from .metrics import pick_best, stopped_early, trial_score
from .record import (
    JOURNAL_FILE,
    RESULTS_FILE,
    RESULTS_LOG,
    SPACE_FILE,
    STATE_FILE,
    STORAGE_FILE,
    ResultsTable,
    cut_tail,
    read_state,
)
from .samplers import make_sampler, trial_seed
from .scheduler import ResumableASHA, Rungs
from .spec import Spec, students_of
from .storage import STOP_FILE, Storage, StorageError, disk_full, replace_atomically, trial_key
from .teacher import TeacherInfo
from .trial import STOPPED_KEY, train_trial

Log = Callable[[str], None]


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


def _encode(choice: Any) -> Any:
    return json.dumps(choice) if isinstance(choice, list | dict) else choice


class SearchSpace:
    """The Optuna define-by-run space of a spec's `params` (picklable: Tune saves it).

    With `objective: {choice: [...]}` the objective is sampled first and only the `loss.*`
    parameters that objective declares are sampled after it, so each trial holds only its own
    objective's parameters. Choices that are lists (e.g. scales) are offered to Optuna as
    JSON strings and decoded into the config.
    """

    def __init__(
        self,
        params: dict[str, dict[str, Any]],
        objectives: list[str],
        owners: dict[str, list[str]],
        seed: int,
    ) -> None:
        self.params = params
        self.objectives = objectives
        self.owners = owners  # loss key -> objectives that declare it
        self.seed = seed

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        """Suggest this trial's values and return its whole config."""
        if len(self.objectives) > 1:
            objective = trial.suggest_categorical("objective", self.objectives)
        else:
            objective = self.objectives[0]
        for key, p in self.params.items():
            if key.startswith("loss.") and objective not in self.owners.get(key, []):
                continue
            if "choice" in p:
                trial.suggest_categorical(key, [_encode(c) for c in p["choice"]])
            elif "float" in p:
                low, high = p["float"]
                trial.suggest_float(key, low, high, log=p.get("log", False), step=p.get("step"))
            else:
                low, high = p["int"]
                trial.suggest_int(
                    key, int(low), int(high), log=p.get("log", False), step=int(p.get("step") or 1)
                )
        return self.config_of(trial.params, trial.number)

    def config_of(self, params: dict[str, Any], number: int) -> dict[str, Any]:
        """A trial's config from its Optuna params: what a re-run of a recorded trial gets."""
        config = dict(params)
        for key, value in params.items():
            choices = self.params.get(key, {}).get("choice", [])
            if any(isinstance(c, list | dict) for c in choices):
                config[key] = json.loads(value)
        config["trial_number"] = number
        config["seed"] = trial_seed(self.seed, number)
        return config


def journal_storage(search_dir: Path) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(search_dir / JOURNAL_FILE)))


def repair_journal(search_dir: Path) -> int:
    """Cut a record torn by a kill mid-write off the journal's end; returns the bytes cut.

    Optuna appends one JSON record per line. A driver killed in the middle of an append leaves
    a partial last line, after which Optuna appends its next record on the same line and the
    study can never be read again. Only whole records were ever acted on, so dropping the
    partial one loses nothing.
    """
    return cut_tail(search_dir / JOURNAL_FILE)


def load_study(search_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=journal_storage(search_dir))


def create_study(search_dir: Path, spec: Spec) -> optuna.Study:
    directions = ["maximize" if m == "max" else "minimize" for m in spec.modes]
    return optuna.create_study(
        study_name=spec.name,
        storage=journal_storage(search_dir),
        directions=directions,
        load_if_exists=True,
    )


class StudySearcher(Searcher):
    """Tune's searcher over the search's Optuna study, the record of which trials exist.

    Every trial is asked from the study (a crash-safe append-only journal) before it runs, so
    the study knows it even when the driver dies the next moment. A resumed search first runs
    the trials the study holds open, under their own number, seed and values (each picks up
    its own saved epoch), then asks new ones until the study holds `num_samples`. Nothing is
    taken from Tune's own snapshot of its trials. Each trial is proposed by a sampler seeded
    with its number (`make_sampler`), so what it gets depends on the study alone.

    A completed trial is told its score (the search metric of the student it keeps) with user
    attrs `epochs` and `stopped_early`. A trial that errors stays open: a resume runs it again,
    and `settle` tells FAIL if the search ends with it still failed (Optuna can never turn a
    FAIL into COMPLETE).
    """

    def __init__(self, search_dir: Path, spec: Spec, space: SearchSpace, rerun: list[int]) -> None:
        super().__init__(metric=spec.metrics[0], mode=spec.modes[0])
        self.search_dir, self.spec, self.space = Path(search_dir), spec, space
        self.rerun = list(rerun)
        self._numbers: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self._study: optuna.Study | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_study": None}

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = load_study(self.search_dir, self.spec.name)
        return self._study

    def _stop(self, exc: OSError) -> None:
        session = SESSIONS.get(str(self.search_dir))
        if session is not None:
            session.stop(f"no space left on device writing {self.search_dir / JOURNAL_FILE}")

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        try:
            return self._suggest(trial_id)
        except OSError as exc:
            if not disk_full(exc):
                raise
            self._stop(exc)
            return None

    def _suggest(self, trial_id: str) -> dict[str, Any] | None:
        study = self.study
        pack = self.spec.search.pack
        configs: list[dict[str, Any]] = []
        while len(configs) < pack:  # a packed trial: K students, the open ones first
            if self.rerun:
                number = self.rerun.pop(0)
                configs.append(self.space.config_of(study.trials[number].params, number))
            elif len(study.trials) >= self.spec.search.num_samples:
                break
            else:
                study.sampler = make_sampler(self.spec, len(study.trials))
                trial = study.ask()
                configs.append(self.space(trial))
        if not configs:
            return Searcher.FINISHED
        if pack == 1:
            self._numbers[trial_id] = configs[0]["trial_number"]
            return configs[0]
        # The cohort's data order and augmentation come from its first student's seed.
        return {
            "students": configs,
            "cohort": [c["trial_number"] for c in configs],
            "data_seed": configs[0]["seed"],
        }

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """The metric per epoch as Optuna's intermediate values, once each (a trial that runs
        again re-reports the epoch it resumes from)."""
        number = (
            self._numbers.get(trial_id)
            if "trial_number" not in result
            else int(result["trial_number"])
        )
        value, epoch = result.get(self.spec.metrics[0]), result.get("epoch")
        if number is None or len(self.spec.metrics) > 1 or value is None or epoch is None:
            return
        frozen = self.study.trials[number]
        if not frozen.state.is_finished() and int(epoch) not in frozen.intermediate_values:
            open_trial(self.study, number).report(float(value), int(epoch))

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """An unpacked trial's end (a packed trial's students are told one by one as each
        ends, by the driver: `Session.end_student`)."""
        number = self._numbers.pop(trial_id, None)
        if number is None or error or not result:
            return
        self.tell(number, result)

    def tell(self, number: int, result: dict) -> None:
        """Tell trial `number` COMPLETE with its score, `epochs` and `stopped_early`."""
        if self.study.trials[number].state.is_finished():
            return
        metrics = self.spec.metrics
        values = (
            [float(result["score"])]
            if len(metrics) == 1
            else [float(result[f"score_{m}"]) for m in metrics]
        )
        epochs = int(result.get("epoch", 0))
        try:
            trial = open_trial(self.study, number)
            trial.set_user_attr("epochs", epochs)
            trial.set_user_attr("stopped_early", stopped_early(epochs, self.spec.train.epochs))
            self.study.tell(number, values if len(values) > 1 else values[0], skip_if_finished=True)
        except OSError as exc:  # the trial stays open: a resume runs it to its end again
            if not disk_full(exc):
                raise
            self._stop(exc)


def settle(study: optuna.Study, failed: dict[int, str]) -> None:
    """Tell FAIL, with the reason as user attr `searchkd`, for trials that end the search failed."""
    for number, reason in sorted(failed.items()):
        if not study.trials[number].state.is_finished():
            open_trial(study, number).set_user_attr("searchkd", f"failed: {reason}")
            study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


class Progress:
    """One line per trial that ends (and a heartbeat), with the best score so far.

    A trial's score is the search metric of the student it keeps (best on val): the value
    Optuna, MLflow, results.parquet and the summary all use.
    """

    def __init__(
        self,
        metric: str,
        mode: str,
        num_samples: int,
        epochs: int,
        done_before: int = 0,
        heartbeat_s: float = 15.0,
        log: Log = say,
    ) -> None:
        self.metric, self.mode = metric, mode
        self.num_samples, self.epochs = num_samples, epochs
        self.done_before = done_before  # trials that ended in earlier runs of this search
        self.heartbeat_s = heartbeat_s
        self.log = log
        self.start = time.time()
        self.last_beat = 0.0
        self.best: tuple[float, int] | None = None
        self.packed = False  # packed trials: students end one by one (`on_student_end`)
        self.ended: set[int] = set()  # students that ended in this run (packed trials)

    def _line(self, text: str, trials: list) -> None:
        if self.packed:  # counted per student: a Tune trial is a cohort
            done = self.done_before + len(self.ended)
            running = sum(
                n not in self.ended
                for t in trials
                if t.status == "RUNNING"
                for n in students_of(t.config)
            )
        else:
            done = self.done_before + sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            running = sum(t.status == "RUNNING" for t in trials)
        best = (
            f"best {self.metric} {self.best[0]:.4f} (trial {self.best[1]})"
            if self.best
            else "best -"
        )
        self.log(
            f"[{time.time() - self.start:6.0f}s] {text:<48} | {done}/{self.num_samples} done, "
            f"{running} running | {best}"
        )
        self.last_beat = time.time()

    def improve(self, number: int, value: Any) -> None:
        if (
            isinstance(value, int | float)
            and math.isfinite(value)
            and (
                self.best is None
                or (value > self.best[0] if self.mode == "max" else value < self.best[0])
            )
        ):
            self.best = (float(value), number)

    def on_trial_result(
        self, trial: Any, result: dict, trials: list, replayed: bool = False
    ) -> None:
        """A heartbeat names the latest new epoch: a resumed trial first replays its saved
        epochs (recorded already), which are not progress."""
        number = result_number(trial, result)
        self.improve(number, result.get("score"))
        if not replayed and time.time() - self.last_beat > self.heartbeat_s:
            self._line(f"trial {number} epoch {result.get('epoch')}/{self.epochs}", trials)

    def on_student_end(self, number: int, how: str, result: dict, trials: list) -> None:
        """A student of a packed trial finished or was stopped (its cohort goes on)."""
        self.ended.add(number)
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        text = "finished" if how == "finished" else "stopped by ASHA"
        self._line(
            f"trial {number} {text} at epoch {result.get('epoch')} {self.metric} {shown}", trials
        )

    def on_trial_complete(self, trial: Any, trials: list) -> None:
        r = trial.last_result or {}
        how = "finished" if int(r.get("epoch", 0)) >= self.epochs else "stopped by ASHA"
        value = r.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        self._line(
            f"trial {trial.config.get('trial_number')} {how} at epoch {r.get('epoch')} "
            f"{self.metric} {shown}",
            trials,
        )

    def on_trial_error(self, trial: Any, trials: list, numbers: list[int] | None = None) -> None:
        reason = tracking.error_reason(trial)
        for number in numbers if numbers is not None else [_number(trial)]:
            self.ended.add(number)
            self._line(f"trial {number} FAILED", trials)
            self.log(f"  trial {number}{_where(trial, reason)}: {reason}")

    def on_trial_recover(self, trial: Any, trials: list) -> None:
        reason = tracking.error_reason(trial)
        names = ", ".join(str(n) for n in students_of(trial.config) if n not in self.ended)
        self.log(
            f"  trial {names}{_where(trial, reason)} failed and {'are' if ',' in names else 'is'} "
            "retried "
            f"from its last saved epoch: {reason}"
        )


def _where(trial: Any, reason: str) -> str:
    """ " on <node ip>", unless the reason names its node already."""
    ip = (trial.last_result or {}).get("node_ip")
    return f" on {ip}" if ip and not reason.startswith("node ") else ""


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
        space: SearchSpace,
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
    """The live parts of a running search that Tune's callback reaches."""

    def __init__(
        self, results: ResultsTable, mlflow: tracking.MlflowRecorder, progress: Progress
    ) -> None:
        self.results, self.mlflow, self.progress = results, mlflow, progress
        self.failed: dict[
            int, str
        ] = {}  # trial number -> reason, for trials that errored in this run
        self.trial_ids: dict[int, str] = {}
        self.stop_reason: str | None = None  # set when the search must stop (a full disk)
        # Packed trials: the driver decides each student's end (`PackedStops`) and tells the
        # study (`teller`) as each one ends, while its cohort goes on.
        self.pack: PackedStops | None = None
        self.teller: StudySearcher | None = None

    def stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    def end_student(self, trial: Any, number: int, result: dict, how: str, trials: list) -> None:
        """A packed student finished or was stopped: Optuna, MLflow and the progress say so."""
        if self.teller is not None:
            self.teller.tell(number, result)
        self.mlflow.end(trial, number, how)
        self.progress.on_student_end(number, how, result, trials)


class PackedStops:
    """ASHA for the students of packed trials, decided on the driver.

    Tune's scheduler stops whole Tune trials, and a packed trial is a cohort, so the same
    rule runs here per student: the same rungs (`Rungs`, keyed by trial number, rebuilt from
    the recorded rows on resume) and reduction factor as an unpacked search. A stopped
    student's STOP_FILE ({"epoch": e}) is written to its folder in the search's storage while
    Tune handles its report; Tune's reports are synchronous, so the trial reads it before it
    trains another epoch, on whichever node it runs (the storage is what every node reaches),
    and again if it runs again after a resume.
    """

    def __init__(self, rungs: Rungs | None, storage: Storage, epochs: int, metric: str) -> None:
        self.rungs, self.storage, self.epochs, self.metric = rungs, storage, epochs, metric

    def decide(self, number: int, result: dict) -> str | None:
        """ "finished", "stopped" or None (it goes on), for a student's reported epoch."""
        epoch = int(result["epoch"])
        if result.get(STOPPED_KEY) and epoch < self.epochs:  # stopped before the driver died
            if self.rungs is not None:
                self.rungs.stopped_at.setdefault(number, epoch)
            return "stopped"
        if self.rungs is None:
            return "finished" if epoch >= self.epochs else None
        value = result.get(self.metric)
        value = float(value) if isinstance(value, int | float) else None
        stop = self.rungs.on_result(number, epoch, value)
        if epoch >= self.epochs:
            self.rungs.record(
                number, epoch, value
            )  # as Tune tells a completing trial's last result
            return "finished"
        if not stop:
            return None
        self.storage.child(trial_key(number)).write_bytes(
            STOP_FILE, json.dumps({"epoch": epoch, "by": "ASHA"}).encode()
        )
        return "stopped"


class SessionStopper(tune.Stopper):
    """Ends the whole run when the session says so (a full disk): the trials stay open in the
    study, and a resume after freeing space runs them on. Pickles as the session's key."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        session = SESSIONS.get(self.key)
        return bool(session and session.stop_reason)


SESSIONS: dict[str, Session] = {}


class SearchCallback(Callback):
    """Tune's hook into the live search; it pickles as the search directory alone (Tune
    pickles its callbacks) and reaches the session of the process that runs the search."""

    def __init__(self, key: str) -> None:
        self.key = key

    @property
    def session(self) -> Session:
        return SESSIONS[self.key]

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
        if s.pack is not None and number in s.progress.ended:
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
        s.progress.on_trial_result(trial, result, trials, replayed=not new)
        if s.pack is not None and "epoch" in result:
            try:
                how = s.pack.decide(number, result)
            except OSError as exc:
                if not disk_full(exc):
                    raise
                s.stop(f"no space left on device writing the stop file of trial {number}")
                return
            if how:
                s.end_student(trial, number, result, how, trials)

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
            n for n in students_of(trial.config) if s.pack is None or n not in s.progress.ended
        ]
        for number in numbers:
            s.failed[number] = reason
        s.mlflow.on_trial_error(trial, numbers)
        s.progress.on_trial_error(trial, trials, numbers)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.session.progress.on_trial_recover(trial, trials)


def _number(trial: Any) -> int:
    return int(trial.config.get("trial_number", -1))


def result_number(trial: Any, result: dict) -> int:
    """The Optuna trial number a result belongs to: a packed trial's rows carry their
    student's; an unpacked trial's is its config's."""
    return int(result["trial_number"]) if "trial_number" in result else _number(trial)


@dataclass
class Summary:
    search_dir: Path
    best_trial: int
    best_config: dict[str, Any]
    best_value: float
    test_acc: float
    trials: int
    finished: int
    stopped: int
    failed: int
    teacher: TeacherInfo


def trial_scores(by_trial: dict[int, list[dict[str, Any]]], spec: Spec) -> dict[int, float]:
    """Each trial's score on the search's metric as of its last recorded epoch (the student it
    keeps), for the trials that have one."""
    scores = {n: trial_score(rows, spec.metrics[0], spec.modes[0]) for n, rows in by_trial.items()}
    return {n: v for n, v in scores.items() if math.isfinite(v)}


def summarize(
    search_dir: Path, spec: Spec, teacher: TeacherInfo, counts: dict[str, int]
) -> Summary | None:
    """The trial with the best score, or None before any trial has one."""
    by_trial = ResultsTable(search_dir / RESULTS_FILE).by_trial()
    scores = trial_scores(by_trial, spec)
    best = pick_best(scores, spec.modes[0])  # ties: the earlier trial
    if best is None:
        return None
    last = by_trial[best][-1]
    return Summary(
        search_dir=search_dir,
        best_trial=best,
        best_config=json.loads(last["config"]),
        best_value=scores[best],
        test_acc=last["test_acc"],
        trials=max(len(by_trial), sum(counts.values())),
        finished=counts.get("finished", 0),
        stopped=counts.get("stopped", 0),
        failed=counts.get("failed", 0),
        teacher=teacher,
    )


def tunable_owners(spec: Spec, tunables: dict[str, set[str]]) -> dict[str, list[str]]:
    return {
        key: [o for o in spec.objectives if key.partition(".")[2] in tunables[o]]
        for key in spec.params
        if key.startswith("loss.")
    }


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
    ends the run and returns; else Python's KeyboardInterrupt) handles it."""
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


def pending(study: optuna.Study, spec: Spec) -> tuple[list[int], int]:
    """The study's open trials (run again first) and how many trials this run has to run."""
    rerun = [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    return rerun, len(rerun) + max(0, spec.search.num_samples - len(study.trials))


def asha_rungs(spec: Spec, study: optuna.Study, results: ResultsTable) -> Rungs:
    """ASHA's rungs rebuilt from the rows recorded so far, in the order they arrived."""
    rungs = Rungs(
        min(spec.search.grace_period, spec.train.epochs),
        spec.train.epochs,
        spec.search.reduction_factor,
        spec.modes[0],
    )
    ended = {t.number for t in study.trials if t.state.is_finished()}
    rows = results.in_order()
    last = {int(r["trial_number"]): int(r["epoch"]) for r in rows}
    rungs.replay(
        (
            int(r["trial_number"]),
            r["epoch"],
            r.get(spec.metrics[0]),
            int(r["trial_number"]) in ended and int(r["epoch"]) == last[int(r["trial_number"])],
        )
        for r in rows
    )
    return rungs


def make_trainable(spec: Spec, teacher: TeacherInfo | None, storage: Storage) -> Any:
    """`train_trial` with the spec as its base, the teacher's bytes and the trials' storage,
    under the space's per-trial resources (the search and its final stage share it)."""
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
        ),
        {"cpu": res.cpu, "gpu": res.gpu},
    )


def build_tuner(
    spec: Spec,
    search_dir: Path,
    teacher: TeacherInfo | None,
    storage: Storage,
    callbacks: list[Callback],
    tunables: dict[str, set[str]],
    study: optuna.Study,
    results: ResultsTable,
    log: Log = say,
) -> tuple[tune.Tuner, int]:
    """A Tuner for the trials this run must still run (the study's open trials first, then new
    ones up to `num_samples`), with ASHA rebuilt from the rows recorded so far; and how many."""
    trainable = make_trainable(spec, teacher, storage)
    rerun, to_run = pending(study, spec)
    params = {k: p.model_dump(by_alias=True, exclude_none=True) for k, p in spec.params.items()}
    space = SearchSpace(params, spec.objectives, tunable_owners(spec, tunables), spec.search.seed)
    searcher = StudySearcher(search_dir, spec, space, rerun)
    scheduler: FIFOScheduler = FIFOScheduler()
    if spec.search.scheduler == "asha" and spec.search.pack == 1:
        # ASHA counts epochs, not reports: a trial that runs again re-reports its saved epoch.
        # (Packed trials are stopped student by student on the driver: `PackedStops`.)
        asha = ResumableASHA(
            spec.metrics[0],
            spec.modes[0],
            "epoch",
            min(spec.search.grace_period, spec.train.epochs),
            spec.train.epochs,
            spec.search.reduction_factor,
        )
        asha.rungs = asha_rungs(spec, study, results)
        scheduler = asha
    runs = search_dir / RAY_DIR
    name = f"run-{len(list(runs.glob('run-*'))) + 1:03d}" if runs.is_dir() else "run-001"
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency(spec, log=log)),
            scheduler=scheduler,
            num_samples=math.ceil(to_run / spec.search.pack),
            reuse_actors=True,  # a trial's process outlives it: no re-import of torch per trial
        ),
        run_config=tune.RunConfig(
            # One Tune experiment per run of the search, never restored: which trials exist
            # is the study's business. Trials report no Tune checkpoint (they keep their
            # state in the search's storage), so no node ever needs this directory.
            name=name,
            storage_path=str(runs),
            verbose=0,
            callbacks=callbacks,
            stop=SessionStopper(str(search_dir)),
            failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
        ),
    )
    return tuner, to_run


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
) -> tuple[Summary | None, str]:
    """Run (or resume) a search whose directory and space.yaml already exist.

    Returns the summary (None before any trial has a score) and how the run ended: finished,
    interrupted (Ctrl-C) or unfinished (e.g. a tracking store that stayed away).
    """
    quiet()
    uri = tracking_uri or tracking.default_store(trials_dir)
    artifacts = None if tracking_uri else tracking.artifact_root(trials_dir)
    base_tags = {
        "teacher": spec.teacher.arch,
        "student": spec.student.arch,
        "search": spec.name,
        "dataset": spec.data.dataset,
    }
    if isinstance(spec.objective, str):
        base_tags["objective"] = spec.objective
    try:
        runs = tracking.open_search(
            search_dir,
            spec.name,
            uri,
            artifacts,
            base_tags,
            search_dir / SPACE_FILE,
            params={
                "num_samples": spec.search.num_samples,
                "sampler": spec.search.sampler,
                "scheduler": spec.search.scheduler,
                "seed": spec.search.seed,
                "teacher_digest": teacher.digest,
            },
        )
        tracking.log_parent_metrics(
            runs, {"teacher_test_acc": teacher.test_acc, "teacher_val_acc": teacher.val_acc}
        )
    except Exception as exc:  # noqa: BLE001 - a store that does not answer is one line
        if not tracking.is_transient(exc):
            raise
        raise SearchError(f"tracking store {uri} unreachable: {tracking.one_line(exc)}") from None
    storage = trial_storage(search_dir, spec)
    connect(spec, address, num_cpus)
    metric, mode = spec.metrics[0], spec.modes[0]
    cut = repair_journal(search_dir)
    if cut:
        log(
            f"searchkd: {JOURNAL_FILE} ended in a record cut short by a kill; dropped its {cut} "
            "bytes "
            f"(the study's complete records are intact)"
        )
    study = create_study(search_dir, spec)
    results = ResultsTable(search_dir / RESULTS_FILE, log)
    results.flush()  # a Parquet file cut short or deleted is rebuilt now
    writer = tracking.MlflowWriter(
        runs, search_dir, storage, metric, mode, base_tags, spec.train.epochs, log=log
    )
    done_before = sum(t.state.is_finished() for t in study.trials)
    progress = Progress(
        metric, mode, spec.search.num_samples, spec.train.epochs, done_before, log=log
    )
    for number, score in trial_scores(results.by_trial(), spec).items():
        progress.improve(number, score)
    session = Session(results, tracking.MlflowRecorder(writer), progress)
    if spec.search.pack > 1:
        progress.packed = True
        rungs = asha_rungs(spec, study, results) if spec.search.scheduler == "asha" else None
        session.pack = PackedStops(rungs, storage, spec.train.epochs, metric)
        session.teller = StudySearcher(
            search_dir, spec, SearchSpace({}, spec.objectives, {}, spec.search.seed), []
        )
    key = str(search_dir)
    to_run = pending(study, spec)[1]
    _write_state(search_dir, "running")
    log(
        f"search {spec.name}: {spec.search.num_samples} trials of {spec.train.epochs} "
        f"epoch{'s' if spec.train.epochs > 1 else ''} "
        f"({'resumed: ' + str(to_run) + ' to run' if resume else 'new'}), in {search_dir}"
    )
    interrupted = False
    if to_run:
        tuner, _ = build_tuner(
            spec,
            search_dir,
            teacher,
            storage,
            [SearchCallback(key)],
            tunables,
            study,
            results,
            log=log,
        )
        interrupted = fit(tuner, key, session)
    params = {k: p.model_dump(by_alias=True, exclude_none=True) for k, p in spec.params.items()}
    space = SearchSpace(params, spec.objectives, tunable_owners(spec, tunables), spec.search.seed)
    study = load_study(search_dir, spec.name)
    outcomes = Outcomes.of(study, space, session.failed, session.trial_ids)
    complete = outcomes.complete(spec.search.num_samples) and session.stop_reason is None
    if complete:
        settle(study, outcomes.errors)
    # MLflow is brought in line with the durable record once more: what a killed driver or a
    # long outage held back reaches it now.
    session.mlflow.resync(results.by_trial(), outcomes)
    # With a full disk the store may be on it too: the resume sends what it does not take now.
    synced = Deadline(writer, uri, log, 5.0 if session.stop_reason else TRACKING_WAIT_S).drain()
    counts = outcomes.counts()
    status = "finished" if complete and synced else "interrupted" if interrupted else "unfinished"
    _write_state(
        search_dir,
        "finished" if status == "finished" else "interrupted",
        counts,
        tracking_pending=not synced,
    )
    if synced:
        try:
            writer.close_search("FINISHED" if complete else "KILLED")
        except Exception as exc:  # noqa: BLE001 - the parent's status is cosmetic
            log(
                "searchkd: warning: could not close the search's MLflow run: "
                f"{tracking.one_line(exc)}"
            )
    elif session.stop_reason is None:
        log(
            f"searchkd: the tracking store {uri} did not take {writer.pending()} trials' updates "
            f"within {TRACKING_WAIT_S:.0f}s; they are kept in {RESULTS_LOG} and sent by --resume"
        )
    if session.stop_reason:
        log(
            f"searchkd: error: {session.stop_reason}; the search stopped with its trials open: "
            "free "
            f"space, then resume"
        )
    return summarize(search_dir, spec, teacher, counts), status


def fit(tuner: tune.Tuner, key: str, session: Session) -> bool:
    """Run the tuner with its session where the callbacks find it; whether Ctrl-C stopped it.
    A full disk stops the session (Tune then fails reading its own files: that is expected);
    the table is written when it ends, and results.jsonl holds the rows if it cannot be."""
    SESSIONS[key] = session
    try:
        with ctrl_c() as seen:
            try:
                tuner.fit()
            except Exception:  # noqa: BLE001 - Tune fails reading its own files on a full disk
                if session.stop_reason is None:
                    raise
            return seen()
    finally:
        del SESSIONS[key]
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


def _write_state(
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


def search_status(search_dir: Path) -> str | None:
    return read_state(search_dir).get("status")
