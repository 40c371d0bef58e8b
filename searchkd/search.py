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

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from . import tracking
from .compat import open_trial
from .driver import (
    RAY_DIR,
    TRACKING_WAIT_S,
    Log,
    Outcomes,
    SearchError,
    Session,
    base_tags,
    concurrency,
    drive,
    make_trainable,
    open_tracking,
    quiet,
    result_number,
    run_config,
    say,
    trial_storage,
    write_state,
)
from .metrics import better, is_number, kept_name, pick_best, stopped_early, trial_score
from .record import JOURNAL_FILE, RESULTS_FILE, RESULTS_LOG, SPACE_FILE, ResultsTable, cut_tail
from .samplers import make_sampler, propose, seen_by, trial_seed
from .scheduler import OrderedRungs, ResumableASHA, Rungs, rung_epochs
from .spec import Spec, students_of
from .storage import Storage, disk_full, write_decision
from .teacher import TeacherInfo
from .trial import STOPPED_KEY

__all__ = ["SearchError"]  # raised by run_search; defined with the driver it comes from


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
    """The search's study, named after its metrics (optuna-dashboard and `trials_dataframe`
    show `val_acc`, not "Objective 0"); a study started before that gets its names now."""
    directions = ["maximize" if m == "max" else "minimize" for m in spec.modes]
    study = optuna.create_study(
        study_name=spec.name,
        storage=journal_storage(search_dir),
        directions=directions,
        load_if_exists=True,
    )
    if study.metric_names != list(spec.metrics):
        import warnings

        with warnings.catch_warnings():  # experimental since Optuna 3.2, still in 5.1
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(spec.metrics))
    return study


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

    def __init__(
        self, search_dir: Path, spec: Spec, space: SearchSpace, rerun: list[int], lag: int = 1
    ) -> None:
        super().__init__(metric=spec.metrics[0], mode=spec.modes[0])
        self.search_dir, self.spec, self.space = Path(search_dir), spec, space
        self.rerun = list(rerun)
        self.lag = lag  # cohorts at once, as the space fixes it (`search_lag`)
        self._numbers: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self._cohorts: dict[str, list[int]] = {}  # Ray trial id -> its students' numbers
        self._failed: set[int] = set()  # trials that failed for good in this run (still open)
        self._block: tuple[int, list[dict[str, Any]]] | None = None  # a cohort half asked
        self._study: optuna.Study | None = None
        # What stops the run when the study's disk is full (the driver's session sets it).
        self.on_full_disk: Callable[[str], None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_study": None, "on_full_disk": None}

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = load_study(self.search_dir, self.spec.name)
        return self._study

    def _stop(self, exc: OSError) -> None:
        if self.on_full_disk is not None:
            self.on_full_disk(f"no space left on device writing {self.search_dir / JOURNAL_FILE}")

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
        pack, total = self.spec.search.pack, self.spec.search.num_samples
        # Trials run in cohorts of `pack` consecutive numbers (a block: 0..K-1, K..2K-1, ...),
        # and a resumed cohort is the same block again, its open students only: its data order
        # comes from its first number, so a student trains on what it did before the kill.
        while True:
            if self._block is None:
                if self.rerun:
                    start = self.rerun[0] - self.rerun[0] % pack
                elif len(study.trials) < total:
                    start = len(study.trials) - len(study.trials) % pack
                else:
                    return Searcher.FINISHED
                self._block = (start, [])
            start, configs = self._block
            for number in range(start, min(start + pack, total)):  # again: it skips the done
                if number in self.rerun:
                    self.rerun.remove(number)
                    configs.append(self.space.config_of(study.trials[number].params, number))
                elif number >= len(study.trials):
                    config = self._ask(study, start)
                    if config is None:
                        return None  # the results it must see are not all in: Tune asks again
                    configs.append(config)
                # else: a student that ended before the kill: its cohort goes on without it
            self._block = None
            if configs:
                break
        if pack == 1:
            self._numbers[trial_id] = configs[0]["trial_number"]
            return configs[0]
        self._cohorts[trial_id] = [c["trial_number"] for c in configs]
        return {
            "students": configs,
            "cohort": [c["trial_number"] for c in configs],
            "data_seed": trial_seed(self.spec.search.seed, start),
        }

    def _ask(self, study: optuna.Study, start: int) -> dict[str, Any] | None:
        """A new trial (number: the study's next), recorded in the study before it runs; None
        when a reproducible search must wait for the results its proposal depends on."""
        number = len(study.trials)
        if not self.spec.search.reproducible:  # Ray Tune's way: whatever has ended so far
            study.sampler = make_sampler(self.spec, number)
            return self.space(study.ask())
        seen = seen_by(start, self.lag, self.spec.search.pack)
        trials = study.trials
        if any(not trials[m].state.is_finished() and m not in self._failed for m in range(seen)):
            return None
        study.add_trial(propose(self.spec, trials, number, seen, self.space, self._failed))
        return self.space.config_of(study.trials[number].params, number)

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
        cohort = self._cohorts.pop(trial_id, [])
        if error:  # it ends this run open (a resume runs it again): proposals stop waiting on it
            study = self.study
            self._failed |= {
                n
                for n in [*cohort, *([] if number is None else [number])]
                if not study.trials[n].state.is_finished()
            }
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
            early = stopped_early(epochs, self.spec.train.epochs)
            trial.set_user_attr("stopped_early", early)
            if early:  # COMPLETE for TPE (see README), but the dashboard shows why it is short
                trial.set_user_attr("searchkd", f"stopped by ASHA at epoch {epochs}")
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
            f"best trial {self.best[1]}: {kept_name(self.metric)} {self.best[0]:.4f}"
            if self.best
            else "best -"
        )
        self.log(
            f"[{time.time() - self.start:6.0f}s] {text:<64} | {done}/{self.num_samples} done, "
            f"{running} running | {best}"
        )
        self.last_beat = time.time()

    def improve(self, number: int, value: Any) -> None:
        best = self.best[0] if self.best else math.nan
        if isinstance(value, int | float) and better(float(value), best, self.mode):
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

    def ended_text(self, number: Any, how: str, result: dict) -> str:
        """`trial 3 finished at epoch 12: val_acc 0.9815 (that epoch), best_val_acc 0.9954`: the
        epoch's value and the trial's score (its kept student's), each by its own name."""

        def shown(value: Any) -> str:
            return f"{value:.4f}" if isinstance(value, float) else str(value)

        return (
            f"trial {number} {how} at epoch {result.get('epoch')}: {self.metric} "
            f"{shown(result.get(self.metric))}, {kept_name(self.metric)} "
            f"{shown(result.get('score'))}"
        )

    def on_student_end(self, number: int, how: str, result: dict, trials: list) -> None:
        """A student of a packed trial finished or was stopped (its cohort goes on)."""
        self.ended.add(number)
        text = "finished" if how == "finished" else "stopped by ASHA"
        self._line(self.ended_text(number, text, result), trials)

    def on_trial_complete(self, trial: Any, trials: list) -> None:
        r = trial.last_result or {}
        how = "finished" if int(r.get("epoch", 0)) >= self.epochs else "stopped by ASHA"
        self._line(self.ended_text(trial.config.get("trial_number"), how, r), trials)

    def on_trial_error(self, trial: Any, trials: list, numbers: list[int] | None = None) -> None:
        reason = tracking.error_reason(trial)
        for number in numbers if numbers is not None else [result_number(trial, {})]:
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


class PackedStops:
    """ASHA for the students of packed trials, decided on the driver.

    Tune's scheduler stops whole Tune trials, and a packed trial is a cohort, so the same
    rule runs here per student: the same rungs (`Rungs`, or in a reproducible search
    `OrderedRungs`, keyed by trial number, rebuilt from the recorded rows on resume) and
    reduction factor as an unpacked search. A student's decision ({"epoch": e} to stop; in a
    reproducible search {"passed": e} too, which the cohort waits for at each rung) is written
    to its folder in the search's storage (`write_decision`) while Tune handles its report, or
    later, when the report or end of another trial lets it be taken; Tune's reports are
    synchronous, so the trial reads it before it trains another epoch, on whichever node it
    runs (the storage is what every node reaches), and again if it runs again after a resume.
    """

    def __init__(
        self,
        rungs: Rungs | None,
        storage: Storage,
        epochs: int,
        metric: str,
        ordered: OrderedRungs | None = None,
    ) -> None:
        self.rungs, self.storage, self.epochs, self.metric = rungs, storage, epochs, metric
        self.ordered = ordered
        self.last: dict[int, int] = {}  # student -> the last epoch it reported
        self.at_rung: dict[tuple[int, int], tuple[Any, dict]] = {}  # waiting: its trial, row

    def decide(self, trial: Any, number: int, result: dict) -> list[tuple[Any, int, dict, str]]:
        """The students that end with this report: (Tune trial, number, its last row,
        "finished" or "stopped"); in a reproducible search a report may end other students,
        whose decisions waited on it."""
        epoch = int(result["epoch"])
        self.last[number] = max(epoch, self.last.get(number, 0))
        value = result.get(self.metric)
        value = float(value) if isinstance(value, int | float) else None
        if self.ordered is None:
            how = self._decide_now(number, epoch, value, result)
            return [(trial, number, result, how)] if how else []
        ordered = self.ordered
        ordered.report(number, epoch, value)
        if epoch in ordered.rungs and ordered.decision(number, epoch) is None:
            self.at_rung[(number, epoch)] = (trial, result)
        ends = self._send(ordered.resolve())
        if result.get(STOPPED_KEY) and epoch < self.epochs:  # stopped before the driver died
            ordered.stopped_at.setdefault(number, epoch)
            return [*ends, (trial, number, result, "stopped")]
        if epoch >= self.epochs:
            ordered.end(number, epoch)
            return [*self._send(ordered.resolve()), *ends, (trial, number, result, "finished")]
        stop = ordered.decision(number, epoch)
        if stop is not None and not any(n == number for _, n, _, _ in ends):
            write_decision(self.storage, number, epoch, stop)  # again: a resume may need it
            if stop:
                ends.append((trial, number, result, "stopped"))
        return ends

    def failed(self, numbers: list[int]) -> list[tuple[Any, int, dict, str]]:
        """Students whose cohort failed for good: ended where they were; the students whose
        decisions waited on them end now if they are stopped."""
        if self.ordered is None:
            return []
        for number in numbers:
            self.ordered.end(number, self.last.get(number, 0))
        return self._send(self.ordered.resolve())

    def _send(self, decisions: list[tuple[int, int, bool]]) -> list[tuple[Any, int, dict, str]]:
        """Write decisions taken now; those that stop a waiting student end it."""
        ends = []
        for number, epoch, stop in decisions:
            write_decision(self.storage, number, epoch, stop)
            waiting = self.at_rung.pop((number, epoch), None)
            if stop and waiting is not None:
                ends.append((waiting[0], number, waiting[1], "stopped"))
        return ends

    def _decide_now(self, number: int, epoch: int, value: float | None, result: dict) -> str | None:
        """Ray Tune's asynchronous ASHA: decided on the report, against what is recorded."""
        if result.get(STOPPED_KEY) and epoch < self.epochs:  # stopped before the driver died
            if self.rungs is not None:
                self.rungs.stopped_at.setdefault(number, epoch)
            return "stopped"
        if self.rungs is None:
            return "finished" if epoch >= self.epochs else None
        stop = self.rungs.on_result(number, epoch, value)
        if epoch >= self.epochs:
            self.rungs.record(
                number, epoch, value
            )  # as Tune tells a completing trial's last result
            return "finished"
        if not stop:
            return None
        write_decision(self.storage, number, epoch, True)
        return "stopped"


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


def search_lag(spec: Spec, study: optuna.Study) -> int:
    """How many trials (cohorts, when packed) a reproducible search's decisions assume run at
    once: `search.max_concurrent`, or with 0 the concurrency of the search's first run,
    recorded in the study so that a resume (on any cluster) decides the same."""
    if spec.search.max_concurrent:
        return spec.search.max_concurrent
    if LAG_ATTR not in study.user_attrs:
        # (a memory cap is said once, by the Tuner's own call)
        study.set_user_attr(LAG_ATTR, concurrency(spec, log=lambda line: None))
    return int(study.user_attrs[LAG_ATTR])


LAG_ATTR = "searchkd_lag"


def ordered_rungs(spec: Spec, study: optuna.Study, results: ResultsTable) -> OrderedRungs:
    """A reproducible search's ASHA decisions, rebuilt from the rows recorded so far and the
    trials the study holds as ended (the decisions are a function of those alone)."""
    by_trial = results.by_trial()
    last = {n: max(int(r["epoch"]) for r in rows) for n, rows in by_trial.items() if rows}
    ended = {
        t.number: last.get(t.number, int(t.user_attrs.get("epochs", 0)))
        for t in study.trials
        if t.state.is_finished()
    }
    metric = spec.metrics[0]
    return OrderedRungs.rebuilt(
        min(spec.search.grace_period, spec.train.epochs),
        spec.train.epochs,
        spec.search.reduction_factor,
        spec.modes[0],
        (
            (n, int(r["epoch"]), r.get(metric) if is_number(r.get(metric)) else None)
            for n, rows in by_trial.items()
            for r in rows
        ),
        ended,
    )


class DecisionMail:
    """Sends ASHA's decisions to the trials, through each one's decision file in the storage
    (`write_decision`); a full disk stops the search (`on_full_disk`, the session's stop)."""

    def __init__(self, storage: Storage, on_full_disk: Callable[[str], None] | None) -> None:
        self.storage, self.on_full_disk = storage, on_full_disk

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "on_full_disk": None}

    def __call__(self, number: int, epoch: int, stop: bool) -> None:
        try:
            write_decision(self.storage, number, epoch, stop)
        except OSError as exc:
            if not disk_full(exc):
                raise
            if self.on_full_disk is not None:
                self.on_full_disk(f"no space left on device writing the decision of trial {number}")


def decision_epochs(spec: Spec) -> list[int]:
    """The epochs at which a reproducible search's trials wait for ASHA's decision ([] when
    nothing waits: no ASHA, or Ray Tune's asynchronous search)."""
    if spec.search.scheduler != "asha" or not spec.search.reproducible:
        return []
    grace = min(spec.search.grace_period, spec.train.epochs)
    return rung_epochs(grace, spec.train.epochs, spec.search.reduction_factor)


def cohorts_to_run(study: optuna.Study, spec: Spec) -> int:
    """How many Ray Tune trials this run starts: one per block of `pack` trial numbers that
    holds an open trial or one not yet asked (`StudySearcher._suggest`)."""
    rerun, _ = pending(study, spec)
    numbers = [*rerun, *range(len(study.trials), spec.search.num_samples)]
    return len({n // spec.search.pack for n in numbers})


def search_space(spec: Spec, tunables: dict[str, set[str]]) -> SearchSpace:
    """The space of the spec's `params`, each objective sampling only its own loss keys."""
    params = {k: p.model_dump(by_alias=True, exclude_none=True) for k, p in spec.params.items()}
    return SearchSpace(params, spec.objectives, tunable_owners(spec, tunables), spec.search.seed)


def build_tuner(
    spec: Spec,
    search_dir: Path,
    teacher: TeacherInfo | None,
    storage: Storage,
    session: Session,
    space: SearchSpace,
    study: optuna.Study,
    results: ResultsTable,
    log: Log = say,
) -> tuple[tune.Tuner, int]:
    """A Tuner for the trials this run must still run (the study's open trials first, then new
    ones up to `num_samples`), with ASHA rebuilt from the rows recorded so far; and how many."""
    trainable = make_trainable(spec, teacher, storage, rungs=decision_epochs(spec))
    rerun, to_run = pending(study, spec)
    searcher = StudySearcher(search_dir, spec, space, rerun, search_lag(spec, study))
    searcher.on_full_disk = session.stop
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
        if spec.search.reproducible:
            asha.ordered = ordered_rungs(spec, study, results)
            asha.deliver = DecisionMail(storage, session.stop)
        else:
            asha.rungs = asha_rungs(spec, study, results)
        scheduler = asha
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency(spec, log=log)),
            scheduler=scheduler,
            num_samples=cohorts_to_run(study, spec),
            reuse_actors=True,  # a trial's process outlives it: no re-import of torch per trial
        ),
        run_config=run_config(spec, search_dir / RAY_DIR, session),
    )
    return tuner, to_run


class SearchRunner:
    """The search as the driver runs it (`drive`): its study, its searcher, its MLflow runs."""

    def __init__(
        self,
        spec: Spec,
        search_dir: Path,
        trials_dir: Path,
        tunables: dict[str, set[str]],
        teacher: TeacherInfo,
        resume: bool,
        tracking_uri: str | None,
        log: Log,
    ) -> None:
        self.spec, self.search_dir, self.trials_dir = spec, search_dir, trials_dir
        self.teacher, self.resume, self.tracking_uri, self.log = teacher, resume, tracking_uri, log
        self.space = search_space(spec, tunables)
        self.uri = tracking_uri or tracking.default_store(trials_dir)
        self.tags = base_tags(spec)

    def open(self) -> tracking.MlflowWriter:
        """The search's parent run (its teacher's numbers on it), then the trials' storage and
        the study, the journal's torn tail cut first."""
        spec, search_dir, teacher = self.spec, self.search_dir, self.teacher
        artifacts = None if self.tracking_uri else tracking.artifact_root(self.trials_dir)

        def open_runs() -> tracking.SearchRuns:
            runs = tracking.open_search(
                search_dir,
                spec.name,
                self.uri,
                artifacts,
                self.tags,
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
            return runs

        runs = open_tracking(open_runs, self.uri)
        self.storage = trial_storage(search_dir, spec)
        cut = repair_journal(search_dir)
        if cut:
            self.log(
                f"searchkd: {JOURNAL_FILE} ended in a record cut short by a kill; dropped its "
                f"{cut} bytes (the study's complete records are intact)"
            )
        self.study = create_study(search_dir, spec)
        return tracking.MlflowWriter(
            runs,
            search_dir,
            self.storage,
            spec.metrics[0],
            spec.modes[0],
            self.tags,
            spec.train.epochs,
            log=self.log,
        )

    def results(self) -> ResultsTable:
        return ResultsTable(self.search_dir / RESULTS_FILE, self.log)

    def progress(self, results: ResultsTable) -> Progress:
        spec = self.spec
        done_before = sum(t.state.is_finished() for t in self.study.trials)
        progress = Progress(
            spec.metrics[0],
            spec.modes[0],
            spec.search.num_samples,
            spec.train.epochs,
            done_before,
            log=self.log,
        )
        for number, score in trial_scores(results.by_trial(), spec).items():
            progress.improve(number, score)
        progress.packed = spec.search.pack > 1
        return progress

    def tuner(self, session: Session) -> tune.Tuner | None:
        """Packed trials' students end on the driver (`PackedStops`, told to the study one by
        one); state.json says running; None when the study holds nothing left to run."""
        spec, study = self.spec, self.study
        if spec.search.pack > 1:
            asha = spec.search.scheduler == "asha"
            reproducible = asha and spec.search.reproducible
            rungs = asha_rungs(spec, study, session.results) if asha and not reproducible else None
            ordered = ordered_rungs(spec, study, session.results) if reproducible else None
            session.pack = PackedStops(
                rungs, self.storage, spec.train.epochs, spec.metrics[0], ordered
            )
            teller = StudySearcher(self.search_dir, spec, self.space, [])
            teller.on_full_disk = session.stop
            session.teller = teller
        to_run = pending(study, spec)[1]
        write_state(self.search_dir, "running")
        self.log(
            f"search {spec.name}: {spec.search.num_samples} trials of {spec.train.epochs} "
            f"epoch{'s' if spec.train.epochs > 1 else ''} "
            f"({'resumed: ' + str(to_run) + ' to run' if self.resume else 'new'}), in "
            f"{os.path.relpath(self.search_dir)}"
        )
        if not to_run:
            return None
        return build_tuner(
            spec,
            self.search_dir,
            self.teacher,
            self.storage,
            session,
            self.space,
            study,
            session.results,
            log=self.log,
        )[0]

    def outcomes(self, session: Session, results: ResultsTable) -> Outcomes:
        self.study = load_study(self.search_dir, self.spec.name)
        return Outcomes.of(self.study, self.space, session.failed, session.trial_ids)

    def settle(self, outcomes: Outcomes, session: Session) -> bool:
        """Complete: every trial ended and nothing stopped the search; its failed trials are
        then told FAIL (a resume would otherwise run them again)."""
        complete = outcomes.complete(self.spec.search.num_samples) and session.stop_reason is None
        if complete:
            settle(self.study, outcomes.errors)
        return complete

    def rows(self, results: ResultsTable) -> dict[int, list[dict[str, Any]]]:
        return results.by_trial()


def run_search(
    spec: Spec,
    search_dir: Path,
    trials_dir: Path,
    tunables: dict[str, set[str]],
    teacher: TeacherInfo,
    resume: bool = False,
    tracking_uri: str | None = None,
    log: Log = say,
) -> tuple[Summary | None, str]:
    """Run (or resume) a search whose directory and space.yaml already exist, on the Ray the
    caller connected to (`driver.connect`).

    Returns the summary (None before any trial has a score) and how the run ended: finished,
    interrupted (Ctrl-C) or unfinished (e.g. a tracking store that stayed away).
    """
    quiet()
    runner = SearchRunner(
        spec, search_dir, trials_dir, tunables, teacher, resume, tracking_uri, log
    )
    end = drive(runner, log)
    counts = end.outcomes.counts()
    write_state(
        search_dir,
        "finished" if end.status == "finished" else "interrupted",
        counts,
        tracking_pending=not end.synced,
    )
    if end.synced:
        try:
            end.writer.close_search("FINISHED" if end.complete else "KILLED")
        except Exception as exc:  # noqa: BLE001 - the parent's status is cosmetic
            log(
                "searchkd: warning: could not close the search's MLflow run: "
                f"{tracking.one_line(exc)}"
            )
    elif end.session.stop_reason is None:
        log(
            f"searchkd: the tracking store {runner.uri} did not take {end.writer.pending()} "
            f"trials' updates within {TRACKING_WAIT_S:.0f}s; they are kept in {RESULTS_LOG} and "
            "sent by --resume"
        )
    if end.session.stop_reason:
        log(
            f"searchkd: error: {end.session.stop_reason}; the search stopped with its trials "
            "open: free space, then resume"
        )
    return summarize(search_dir, spec, teacher, counts), end.status
