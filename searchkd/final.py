"""The final stage: is the search's winner really better than the objective's default?

A search picks on a validation split, so its best `val_acc` is biased upwards: it is the best
of many noisy draws. `searchkd final trials/NAME` (or a `final:` section of the space, run
when the search ends) answers the question again on data that chose nothing: the top K
configs (ranked by each trial's recorded score, as `report` and `best` rank them) and the
default config (every searched tunable at its objective's default, the other searched keys at
the space's own values) are each retrained with the same S fresh seeds on the whole training
split (`data.val_fraction: 0`, so the kept student is the last epoch's) and measured on test.
The same seed gives every config the same initialisation and data order, so each config is
compared with the default seed by seed: a 95% t-interval on the paired differences, and a
plain verdict.

It runs like a search: one Ray Tune trial per (config, seed), through `train_trial` and the
search's storage (`<storage>/final/trial-NNNN/`), recorded by the driver in
`trials/NAME/final/` (the plan, the rows per epoch, the MLflow map, one Tune experiment per
run under `ray/`), logged to MLflow as child runs of a `final` run nested under the search's
parent run, and summed up in `trials/NAME/final.parquet` (one row per finished (config, seed),
with the summary in its metadata). A killed `searchkd final` run again trains only what is
not finished, each unfinished run from its last saved epoch.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from . import tracking
from .analysis import analyze, rank_trials, read_spec
from .driver import (
    RAY_DIR,
    Log,
    Outcomes,
    SearchError,
    Session,
    base_storage,
    base_tags,
    concurrency,
    connect,
    drive,
    make_trainable,
    open_tracking,
    quiet,
    run_config,
    say,
    trial_storage,
)
from .metrics import json_safe
from .record import FINAL_FILE, FINAL_KEY, ResultsTable
from .samplers import trial_seed
from .spec import Spec
from .storage import replace_atomically
from .teacher import TeacherInfo

FINAL_DIR = "final"  # trials/NAME/final/: what the driver records of the final stage
PLAN_FILE = "plan.json"
LEVEL = 0.95
SEED_OFFSET = 1_000_000  # final seeds are derived apart from every trial's seed
DEFAULT_TOP = DEFAULT_SEEDS = 3
VERDICTS = ("beats the default", "not distinguishable", "worse than the default")


class FinalError(SearchError):
    """A final stage that cannot run for a reason the user can fix: one line."""


# -- which configs ----------------------------------------------------------------------------
def config_key(params: Mapping[str, Any]) -> str:
    """A config's identity: its values as canonical JSON (identical configs collapse)."""
    return json.dumps(dict(params), sort_keys=True)


@dataclass(frozen=True)
class FinalConfig:
    """One config of the final stage: a top-K config of the search, or the default one."""

    rank: int | None  # 1 = the search's best; None for the default when no top config equals it
    trial_number: int | None  # the search trial it comes from (None for the default alone)
    params: dict[str, Any]
    is_default: bool = False
    score: float = math.nan  # its trial's recorded score in the search

    @property
    def key(self) -> str:
        return config_key(self.params)

    @property
    def tag(self) -> str:
        """The `rank` tag of its MLflow runs and column of final.parquet."""
        return "default" if self.is_default else str(self.rank)

    @property
    def label(self) -> str:
        if self.rank is None:
            return "default"
        return f"rank {self.rank}" + (" = default" if self.is_default else "")


def default_params(
    spec: Spec, defaults: Mapping[str, Mapping[str, Any]], objective: str
) -> dict[str, Any]:
    """The default config over the search's keys: each searched loss tunable at `objective`'s
    default, each other searched key (student.width, train.*, data.*) at the space's own value.
    What the space fixes stays fixed, as in every trial."""
    base = spec.model_dump(mode="json", by_alias=True)
    out: dict[str, Any] = {"objective": objective} if len(spec.objectives) > 1 else {}
    for key in spec.params:
        section, _, leaf = key.partition(".")
        if key == "data.val_fraction":
            continue  # the final stage holds nothing out
        if section == "loss":
            if leaf in defaults[objective]:
                out[key] = defaults[objective][leaf]
        else:
            out[key] = base[section][leaf]
    return out


def trial_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """A search trial's config as the final stage retrains it: its values without its seed
    (the final stage has its own seeds) or its val_fraction (it holds nothing out)."""
    return {
        k: v for k, v in config.items() if k not in ("seed", "trial_number", "data.val_fraction")
    }


def select_configs(
    ranked: Sequence[tuple[int, float, Mapping[str, Any]]], default: Mapping[str, Any], top: int
) -> list[FinalConfig]:
    """The `top` distinct configs of `ranked` ((trial number, score, params), best first; a
    config equal to a better-ranked one is skipped), then the default config unless one of them
    is it (it is then marked as the default)."""
    out: list[FinalConfig] = []
    seen: set[str] = set()
    for number, score, params in ranked:
        if len(out) >= top:
            break
        key = config_key(params)
        if key in seen:
            continue
        seen.add(key)
        out.append(
            FinalConfig(
                len(out) + 1, number, dict(params), key == config_key(default), float(score)
            )
        )
    if not any(c.is_default for c in out):
        out.append(FinalConfig(None, None, dict(default), True))
    return out


# -- the statistics ---------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std is NaN below two values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass(frozen=True)
class Difference:
    """A mean with its t-interval: a config's test accuracy minus the default's, paired by
    seed (`paired_difference`), or any mean (`mean_interval`)."""

    mean: float
    low: float
    high: float
    n: int  # seeds both have finished

    @property
    def verdict(self) -> str:
        if self.n >= 2 and self.low > 0:
            return VERDICTS[0]
        if self.n >= 2 and self.high < 0:
            return VERDICTS[2]
        return VERDICTS[1]


def t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, dof))


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Difference:
    """The mean of `values` and its two-sided t-interval at `level` (n - 1 degrees of
    freedom); no interval (NaN) below two values. Benchmarks state a mean ± interval with it."""
    mean, sd = mean_std(values)
    n = len(values)
    if n < 2:
        return Difference(mean, math.nan, math.nan, n)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Difference(mean, mean - half, mean + half, n)


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL
) -> Difference:
    """The mean of a[s] - b[s] over the seeds both hold, and its two-sided t-interval at
    `level` (n - 1 degrees of freedom); no interval (NaN) below two pairs."""
    return mean_interval([a[s] - b[s] for s in sorted(set(a) & set(b))], level)


def summarize(
    configs: Sequence[FinalConfig],
    seeds: Sequence[int],
    accs: Mapping[tuple[str, int], float],
    *,
    search: str = "",
    metric: str = "",
    epochs: int = 0,
    top: int = DEFAULT_TOP,
    planned: int | None = None,
) -> dict[str, Any]:
    """The final stage's summary (JSON-ready): per config its test accuracies by seed, mean ±
    std, and (but for the default) its paired difference to the default and the verdict.
    `accs` maps (config key, seed) to test accuracy for the finished runs."""
    default = next(c for c in configs if c.is_default)
    base = {s: accs[(default.key, s)] for s in seeds if (default.key, s) in accs}
    rows = []
    for c in configs:
        mine = {s: accs[(c.key, s)] for s in seeds if (c.key, s) in accs}
        mean, std = mean_std(list(mine.values()))
        entry: dict[str, Any] = {
            "label": c.label,
            "rank": c.rank,
            "tag": c.tag,
            "trial_number": c.trial_number,
            "is_default": c.is_default,
            "params": c.params,
            "score": c.score,
            "test_acc": {str(s): v for s, v in mine.items()},
            "n": len(mine),
            "mean": mean,
            "std": std,
        }
        if not c.is_default or c.rank is not None:
            d = (
                paired_difference(mine, base)
                if not c.is_default
                else Difference(0.0, 0.0, 0.0, len(mine))
            )
            entry["diff"] = {"mean": d.mean, "low": d.low, "high": d.high, "n": d.n}
            entry["verdict"] = d.verdict if not c.is_default else "is the default"
        rows.append(entry)
    done = sum(len(r["test_acc"]) for r in rows)
    return {
        "search": search,
        "metric": metric,
        "epochs": epochs,
        "top": top,
        "seeds": list(seeds),
        "level": LEVEL,
        "configs": rows,
        "runs_done": done,
        "runs_planned": planned if planned is not None else len(configs) * len(seeds),
        "complete": done == (planned if planned is not None else len(configs) * len(seeds)),
    }


# -- the plan: which (config, seed) runs exist, under stable numbers ------------------------------
def final_seed(search_seed: int, index: int) -> int:
    """The final stage's `index`-th seed: derived from the search seed, apart from any trial's
    (a winner is not retrained with the seed it may have won by)."""
    return trial_seed(search_seed, SEED_OFFSET + index)


@dataclass(frozen=True)
class FinalRun:
    number: int  # its Tune trial_number: the storage key (`final/trial-NNNN`) and MLflow map key
    config: FinalConfig
    seed: int

    def tune_config(self) -> dict[str, Any]:
        return {**self.config.params, "seed": self.seed, "trial_number": self.number}

    @property
    def name(self) -> str:
        return (
            f"{self.config.tag if self.config.rank is None else 'rank' + str(self.config.rank)}"
            f"-seed{self.seed}"
        )


def plan_runs(
    final_dir: Path, configs: Sequence[FinalConfig], seeds: Sequence[int]
) -> list[FinalRun]:
    """One run per (config, seed), numbered once and for all in `plan.json`: a rerun (with
    other --top or --seeds too) finds each (config, seed) it had under the same number, with
    its saved state and MLflow run."""
    path = final_dir / PLAN_FILE
    entries: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    known = {(e["key"], int(e["seed"])): int(e["number"]) for e in entries}
    runs = []
    for c in configs:
        for s in seeds:
            number = known.get((c.key, s))
            if number is None:
                number = known[(c.key, s)] = len(entries)
                entries.append({"number": number, "key": c.key, "seed": s})
            runs.append(FinalRun(number, c, s))
    if len(entries) != len(json.loads(path.read_text()) if path.exists() else []):
        final_dir.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, lambda p: p.write_text(json.dumps(entries, indent=1)))
    return runs


# -- preparing and running ----------------------------------------------------------------------
@dataclass
class FinalStage:
    """What a final stage will do: the search, its configs and seeds, and the runs left."""

    search_dir: Path
    spec: Spec
    configs: list[FinalConfig]
    seeds: list[int]
    top: int
    runs: list[FinalRun]
    done: dict[int, dict[str, Any]]  # run number -> its last row (finished runs)
    notes: list[str] = field(default_factory=list)

    @property
    def final_dir(self) -> Path:
        return self.search_dir / FINAL_DIR

    @property
    def todo(self) -> list[FinalRun]:
        return [r for r in self.runs if r.number not in self.done]


def finished_rows(results: ResultsTable, epochs: int) -> dict[int, dict[str, Any]]:
    """The last row of each run that trained all its epochs."""
    return {
        n: rows[-1]
        for n, rows in results.by_trial().items()
        if rows and int(rows[-1]["epoch"]) >= epochs
    }


def prepare(
    search_dir: Path,
    top: int | None = None,
    seeds: int | None = None,
    trials: Sequence[int] | None = None,
) -> FinalStage:
    """Read the search, pick its configs and plan the runs; nothing is trained. `top` and
    `seeds` default to the space's `final:` section, else to 3 and 3. `trials` picks the
    configs by trial number instead of rank (points of a Pareto front, which no single score
    ranks): they are ranked 1, 2, ... in the order given."""
    from .objectives import get_objective

    search_dir = Path(search_dir)
    spec = read_spec(search_dir)
    top = top or (spec.final.top if spec.final else DEFAULT_TOP)
    seeds = seeds or (spec.final.seeds if spec.final else DEFAULT_SEEDS)
    a = analyze(search_dir)
    metric = spec.metrics[0]
    ranked = [
        t
        for t in rank_trials(a.trials, metric, spec.modes[0])
        if t.status in ("finished", "stopped")
    ]
    if not ranked:
        raise FinalError(
            f"{os.path.relpath(search_dir)}: the search has no completed trial yet; run or "
            f"resume it first"
        )
    if trials:
        by_number = {t.number: t for t in ranked}
        missing = [n for n in trials if n not in by_number]
        if missing:
            raise FinalError(
                f"{os.path.relpath(search_dir)}: trial {missing[0]} has not completed; "
                f"completed trials: {', '.join(str(n) for n in sorted(by_number))}"
            )
        ranked = [by_number[n] for n in dict.fromkeys(trials)]
        top = len(ranked)
    objective = str(ranked[0].config.get("objective") or spec.objectives[0])
    defaults = {
        o: {k: t.default for k, t in get_objective(o).tunables.items()} for o in spec.objectives
    }
    default = default_params(spec, defaults, objective)
    configs = select_configs(
        [(t.number, t.scores[metric], trial_params(t.config)) for t in ranked], default, top
    )
    notes = []
    picked = [c for c in configs if c.rank is not None]
    if len(picked) < top:
        notes.append(
            f"{len(picked)} distinct config{'s' if len(picked) != 1 else ''} among the search's "
            f"{len(ranked)} completed trial{'s' if len(ranked) != 1 else ''} (asked for {top})"
        )
    if any(c.is_default and c.rank is not None for c in configs):
        rank = next(c.rank for c in configs if c.is_default and c.rank is not None)
        notes.append(
            f"rank {rank} is the default config"
            + (": the search's best is the default, there is nothing to beat" if rank == 1 else "")
        )
    seed_list = [final_seed(spec.search.seed, i) for i in range(seeds)]
    final_dir = search_dir / FINAL_DIR
    runs = plan_runs(final_dir, configs, seed_list)
    results = ResultsTable(final_dir / "results.parquet")
    done = finished_rows(results, spec.train.epochs) if results.log_path.exists() else {}
    return FinalStage(
        search_dir,
        spec,
        configs,
        seed_list,
        top,
        runs,
        {n: r for n, r in done.items() if n in {x.number for x in runs}},
        notes,
    )


class ListSearcher(Searcher):
    """Hands Tune a fixed list of configs, one per trial, then says it is finished."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        super().__init__(metric="test_acc", mode="max")
        self.configs = list(configs)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        return self.configs.pop(0) if self.configs else Searcher.FINISHED

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        pass


class FinalProgress:
    """One line per run that ends (and a heartbeat); nothing is "best" here: test chooses
    nothing."""

    def __init__(
        self,
        runs: dict[int, FinalRun],
        total: int,
        done_before: int,
        epochs: int,
        heartbeat_s: float = 15.0,
        log: Log = say,
    ) -> None:
        self.runs, self.total, self.done_before, self.epochs = runs, total, done_before, epochs
        self.heartbeat_s, self.log = heartbeat_s, log
        self.start, self.last_beat = time.time(), 0.0

    def _name(self, trial: Any) -> str:
        run = self.runs.get(int(trial.config.get("trial_number", -1)))
        return f"{run.config.label} seed {run.seed}" if run else "run ?"

    def _line(self, text: str, trials: list) -> None:
        done = self.done_before + sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        self.log(
            f"[{time.time() - self.start:6.0f}s] {text:<56} | {done}/{self.total} done, {running} "
            f"running"
        )
        self.last_beat = time.time()

    def on_trial_result(
        self, trial: Any, result: dict, trials: list, replayed: bool = False
    ) -> None:
        if not replayed and time.time() - self.last_beat > self.heartbeat_s:
            self._line(f"{self._name(trial)} epoch {result.get('epoch')}/{self.epochs}", trials)

    def on_trial_complete(self, trial: Any, trials: list) -> None:
        acc = (trial.last_result or {}).get("test_acc")
        shown = f"{acc:.4f}" if isinstance(acc, float) else str(acc)
        self._line(f"{self._name(trial)} finished: test_acc {shown}", trials)

    def on_trial_error(self, trial: Any, trials: list, numbers: list[int] | None = None) -> None:
        self._line(f"{self._name(trial)} FAILED", trials)
        self.log(f"  {self._name(trial)}: {tracking.error_reason(trial)}")

    def on_trial_recover(self, trial: Any, trials: list) -> None:
        self.log(
            f"  {self._name(trial)} failed and is retried from its last saved epoch: "
            f"{tracking.error_reason(trial)}"
        )


def final_base(spec: Spec) -> Spec:
    """The search's spec with nothing held out: the kept student is the last epoch's."""
    return spec.resolved({"data.val_fraction": 0.0})


class FinalRunner:
    """The final stage as the driver runs it (`drive`): its plan's runs under ListSearcher,
    its MLflow runs nested in the search's, final.parquet written when they end."""

    def __init__(
        self,
        stage: FinalStage,
        teacher: TeacherInfo | None,
        address: str | None,
        num_cpus: int | None,
        log: Log,
    ) -> None:
        self.stage, self.teacher, self.address, self.num_cpus, self.log = (
            stage,
            teacher,
            address,
            num_cpus,
            log,
        )
        self.by_number = {r.number: r for r in stage.runs}
        self.summary: dict[str, Any] = {}

    def open(self) -> tracking.MlflowWriter:
        """A `final` run nested under the search's parent run; its (config, seed) runs are
        named and tagged by the plan."""
        stage, spec = self.stage, self.stage.spec
        state = stage.search_dir / tracking.TRACKING_FILE
        if not state.exists():
            raise FinalError(
                f"{os.path.relpath(stage.search_dir)}: the search has no MLflow run "
                f"({tracking.TRACKING_FILE} is missing); resume the search first"
            )
        search_runs = tracking.read_runs(state, stage.search_dir.parent)
        tags = base_tags(spec, stage="final")
        try:
            runs = open_tracking(
                lambda: tracking.open_nested(
                    search_runs,
                    stage.final_dir / tracking.TRACKING_FILE,
                    "final",
                    tags,
                    params={
                        "top": stage.top,
                        "seeds": len(stage.seeds),
                        "val_fraction": 0.0,
                        "epochs": spec.train.epochs,
                        "metric": "test_acc",
                    },
                    trials_dir=stage.search_dir.parent,
                ),
                search_runs.tracking_uri,
            )
        except SearchError as exc:
            raise FinalError(str(exc)) from None
        self.storage = trial_storage(stage.search_dir, spec).child(FINAL_DIR)
        return tracking.MlflowWriter(
            runs,
            stage.final_dir,
            self.storage,
            "test_acc",
            "max",
            tags,
            spec.train.epochs,
            log=self.log,
            key_tag="final_run",
            run_tags=self.run_tags,
            run_name=self.run_name,
            track_best=False,
        )

    def run_tags(self, rec: tracking.TrialRecord) -> dict[str, str]:
        run = self.by_number.get(rec.number)
        if run is None:
            return {}
        source = run.config.trial_number
        return {
            "rank": run.config.tag,
            "seed": str(run.seed),
            "trial_number": "" if source is None else str(source),
            "config": run.config.label,
        }

    def run_name(self, rec: tracking.TrialRecord) -> str:
        run = self.by_number.get(rec.number)
        return f"final-{run.name}" if run else f"final-{rec.number:03d}"

    def results(self) -> ResultsTable:
        return ResultsTable(self.stage.final_dir / "results.parquet", self.log)

    def progress(self, results: ResultsTable) -> FinalProgress:
        stage = self.stage
        return FinalProgress(
            self.by_number,
            len(stage.runs),
            len(stage.runs) - len(stage.todo),
            stage.spec.train.epochs,
            log=self.log,
        )

    def tuner(self, session: Session) -> tune.Tuner | None:
        """Ray is started (or joined) only when a run is left to train."""
        stage, spec, log = self.stage, self.stage.spec, self.log
        todo = stage.todo
        if not todo:
            log(
                f"final stage of {spec.name}: all {len(stage.runs)} runs are done; nothing left "
                "to do"
            )
            return None
        top = sum(c.rank is not None for c in stage.configs)
        default = (
            "and the default"
            if any(c.rank is None for c in stage.configs)
            else "(the default among them)"
        )
        log(
            f"final stage of {spec.name}: {top} top config{'s' if top != 1 else ''} {default}, "
            f"{len(stage.seeds)} seed{'s' if len(stage.seeds) != 1 else ''} each, "
            f"{spec.train.epochs} epochs on train + val: {len(todo)} of {len(stage.runs)} runs to "
            f"train, in {os.path.relpath(stage.search_dir)}/{FINAL_DIR}"
        )
        connect(
            spec,
            self.address,
            self.num_cpus,
            storage=base_storage(spec, stage.search_dir.parent),
        )
        return tune.Tuner(
            make_trainable(final_base(spec), self.teacher, self.storage),
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(
                    ListSearcher([r.tune_config() for r in todo]),
                    max_concurrent=concurrency(spec, len(todo), log=self.log),
                ),
                scheduler=FIFOScheduler(),
                num_samples=len(todo),
                reuse_actors=True,
            ),
            run_config=run_config(spec, stage.final_dir / RAY_DIR, session),
        )

    def outcomes(self, session: Session, results: ResultsTable) -> Outcomes:
        self.done = finished_rows(results, self.stage.spec.train.epochs)
        outcomes = Outcomes(trial_ids=dict(session.trial_ids))
        for run in self.stage.runs:
            outcomes.configs[run.number] = run.tune_config()
            if run.number in self.done:
                outcomes.status[run.number] = "finished"
            elif run.number in session.failed:
                outcomes.status[run.number], outcomes.errors[run.number] = (
                    "failed",
                    session.failed[run.number],
                )
            else:
                outcomes.status[run.number] = "unfinished"
        return outcomes

    def settle(self, outcomes: Outcomes, session: Session) -> bool:
        """final.parquet for what finished; complete when every planned run did."""
        self.summary = write_final(self.stage, self.done)
        return self.summary["complete"] and session.stop_reason is None

    def rows(self, results: ResultsTable) -> dict[int, list[dict[str, Any]]]:
        return {n: r for n, r in results.by_trial().items() if n in self.by_number}


def run_final(
    stage: FinalStage,
    teacher: TeacherInfo | None,
    address: str | None = None,
    num_cpus: int | None = None,
    log: Log = say,
) -> tuple[dict[str, Any], str]:
    """Train the stage's runs that are not finished (none: no Ray is started), bring MLflow in
    line, write final.parquet. Returns the summary and how it ended: finished, interrupted
    (Ctrl-C) or unfinished (a run failed, a tracking store that stayed away, a full disk)."""
    quiet()
    runner = FinalRunner(stage, teacher, address, num_cpus, log)
    end = drive(runner, log)
    if end.synced:
        try:
            log_summary(
                end.writer.runs,
                stage.search_dir / FINAL_FILE,
                runner.summary,
                "FINISHED" if end.complete else "KILLED",
            )
        except Exception as exc:  # noqa: BLE001 - the summary is in final.parquet too
            log(
                f"searchkd: warning: the final stage's summary was not logged to MLflow: "
                f"{tracking.one_line(exc)}"
            )
    if end.session.stop_reason:
        log(
            f"searchkd: error: {end.session.stop_reason}; free space, then run the final stage "
            "again"
        )
    return runner.summary, end.status


# final.parquet's columns before the config's own values (one column per dotted key).
ROW_KEYS = (
    "rank",
    "config",
    "is_default",
    "trial_number",
    "search_score",
    "seed",
    "seed_index",
    "final_run",
    "test_acc",
    "test_acc_last",
    "epochs",
    "student_params",
    "student_macs",
    "params",
)


def write_final(stage: FinalStage, done: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """final.parquet: one row per finished (config, seed) of this plan, the summary in its
    metadata (key `searchkd.final`), written atomically; returns the summary."""
    accs: dict[tuple[str, int], float] = {}
    rows = []
    for run in stage.runs:
        last = done.get(run.number)
        if last is None:
            continue
        acc = float(last["test_acc"])
        accs[(run.config.key, run.seed)] = acc
        c = run.config
        rows.append(
            {
                "rank": c.tag,
                "config": c.label,
                "is_default": c.is_default,
                "trial_number": c.trial_number,
                "search_score": c.score if math.isfinite(c.score) else None,
                "seed": run.seed,
                "seed_index": stage.seeds.index(run.seed),
                "final_run": run.number,
                "test_acc": acc,
                "test_acc_last": float(last.get("test_acc_last", acc)),
                "epochs": int(last["epoch"]),
                "student_params": last.get("student_params"),
                "student_macs": last.get("student_macs"),
                "params": json.dumps(c.params, sort_keys=True),
                **{
                    k: json.dumps(v) if isinstance(v, list | dict) else v
                    for k, v in c.params.items()
                },
            }
        )
    spec = stage.spec
    summary = summarize(
        stage.configs,
        stage.seeds,
        accs,
        search=spec.name,
        metric=spec.metrics[0],
        epochs=spec.train.epochs,
        top=stage.top,
        planned=len(stage.runs),
    )
    summary["notes"] = stage.notes
    params = sorted({k for c in stage.configs for k in c.params})
    keys = [*ROW_KEYS, *params]
    table = (
        pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]) if rows else pa.table({})
    )
    table = table.replace_schema_metadata({FINAL_KEY: json.dumps(json_safe(summary)).encode()})
    path = stage.search_dir / FINAL_FILE
    replace_atomically(path, lambda p: pq.write_table(table, p))
    return summary


def log_summary(
    runs: tracking.SearchRuns, final_file: Path, summary: dict[str, Any], status: str
) -> None:
    """The summary on the `final` run: per config its mean, std and difference to the default
    as metrics, its verdict as a tag, final.parquet as an artifact; then its status."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs.tracking_uri)
    now = int(time.time() * 1000)
    metrics, tags = [], []
    for c in summary["configs"]:
        prefix = "default" if c["rank"] is None else f"rank{c['rank']}"
        for name, value in (
            ("test_acc_mean", c["mean"]),
            ("test_acc_std", c["std"]),
            ("diff_mean", (c.get("diff") or {}).get("mean")),
            ("diff_low", (c.get("diff") or {}).get("low")),
            ("diff_high", (c.get("diff") or {}).get("high")),
        ):
            if isinstance(value, float) and math.isfinite(value):
                metrics.append(Metric(f"{prefix}_{name}", value, now, 0))
        if c.get("verdict"):
            tags.append(RunTag(f"{prefix}_verdict", c["verdict"]))
    client.log_batch(runs.parent_run_id, metrics=metrics, tags=tags)
    client.log_artifact(runs.parent_run_id, str(final_file))
    client.set_terminated(runs.parent_run_id, status=status)
