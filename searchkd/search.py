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
from .metrics import pick_best, stopped_early, trial_score
from .record import JOURNAL_FILE, RESULTS_FILE, RESULTS_LOG, SPACE_FILE, ResultsTable, cut_tail
from .samplers import make_sampler, trial_seed
from .scheduler import ResumableASHA, Rungs
from .spec import Spec, students_of
from .storage import STOP_FILE, Storage, disk_full, trial_key
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

    def on_trial_result(self, trial: Any, result: dict, trials: list) -> None:
        number = result_number(trial, result)
        self.improve(number, result.get("score"))
        if time.time() - self.last_beat > self.heartbeat_s:
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
) -> tuple[tune.Tuner, int]:
    """A Tuner for the trials this run must still run (the study's open trials first, then new
    ones up to `num_samples`), with ASHA rebuilt from the rows recorded so far; and how many."""
    trainable = make_trainable(spec, teacher, storage)
    rerun, to_run = pending(study, spec)
    searcher = StudySearcher(search_dir, spec, space, rerun)
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
        asha.rungs = asha_rungs(spec, study, results)
        scheduler = asha
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency(spec)),
            scheduler=scheduler,
            num_samples=math.ceil(to_run / spec.search.pack),
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
            rungs = asha_rungs(spec, study, session.results) if asha else None
            session.pack = PackedStops(rungs, self.storage, spec.train.epochs, spec.metrics[0])
            teller = StudySearcher(self.search_dir, spec, self.space, [])
            teller.on_full_disk = session.stop
            session.teller = teller
        to_run = pending(study, spec)[1]
        write_state(self.search_dir, "running")
        self.log(
            f"search {spec.name}: {spec.search.num_samples} trials of {spec.train.epochs} "
            f"epoch{'s' if spec.train.epochs > 1 else ''} "
            f"({'resumed: ' + str(to_run) + ' to run' if self.resume else 'new'}), in "
            f"{self.search_dir}"
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
