"""What a search directory holds, read as one `Analysis`: its trials, their scores and ranks,
the Pareto front, ASHA's rungs, parameter importances, and the units numbers are shown in.

It reads only the search directory (see report.py) and never draws: the plots (plots.py) and
the page (report.py) are made from what is computed here, which `data.json` holds too. What is
"best" is decided in `searchkd.metrics` (`trial_score`, `pick_best`); this module calls it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import (
    better,
    finite,
    pick_best,
    rung_epochs,
    stopped_early,
    trial_score,
)
from .record import (
    JOURNAL_FILE,
    SPACE_FILE,
    DamagedFile,
    check_log,
    read_state,
)
from .spec import Spec, teacher_digest

TOP_N = 10
UI_URL = "http://127.0.0.1:5000"  # where `searchkd ui` serves the local store

# Trials are drawn by how they ended.
STATUSES = ("finished", "stopped", "failed", "running", "unfinished")
STATUS_TEXT = {
    "finished": "finished",
    "stopped": "stopped by ASHA",
    "failed": "failed",
    "running": "running",
    "unfinished": "unfinished (interrupted)",
}


# -- the one definition of a trial's score and of the best trial ------------------------------
def rank_trials(trials: Sequence[TrialView], metric: str, mode: str) -> list[TrialView]:
    """Trials with a score that did not fail, best first (ties: the lower trial number): the
    report's top table and the final stage's top K."""
    return sorted(
        (t for t in trials if t.status != "failed" and math.isfinite(t.scores[metric])),
        key=lambda t: (-t.scores[metric] if mode == "max" else t.scores[metric], t.number),
    )


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """`a` is no worse than `b` on every objective and better on one."""
    no_worse = all(
        (x >= y) if m == "max" else (x <= y) for x, y, m in zip(a, b, modes, strict=True)
    )
    strictly = any((x > y) if m == "max" else (x < y) for x, y, m in zip(a, b, modes, strict=True))
    return no_worse and strictly


def pareto_set(points: Mapping[int, Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Trial numbers whose score vector no other trial dominates (finite vectors only)."""
    ok = {n: p for n, p in points.items() if all(math.isfinite(v) for v in p)}
    return sorted(
        n for n, p in ok.items() if not any(dominates(q, p, modes) for m, q in ok.items() if m != n)
    )


# -- what a search directory holds -------------------------------------------------------------
@dataclass
class TrialView:
    number: int
    trial_id: str
    status: str
    epochs: int  # the last epoch it reported
    scores: dict[str, float]  # search metric -> score
    test_acc: float  # the kept student's test accuracy (last row)
    student_params: float
    student_macs: float
    objective: str
    config: dict[str, Any]  # sampled values and seed, as the trial ran
    run_id: str | None
    end_x: int  # trial-epochs the search had consumed when this trial's last row came
    curve: list[tuple[int, float]]  # (epoch, metric value) per row
    error: str | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.items() if k not in ("seed", "objective")}


@dataclass
class Analysis:
    search_dir: Path
    spec: Spec
    state: str  # running | finished | interrupted | unknown
    metric: str
    mode: str
    trials: list[TrialView]
    best: TrialView | None
    history_x: list[int]  # trial-epochs consumed, one per row in time order
    history_best: list[float]  # best score so far at each x (NaN until a trial counts)
    rungs: list[int]  # ASHA rung epochs (empty without ASHA)
    trial_epochs: int
    budget_epochs: int  # num_samples × epochs: what a search without early stopping costs
    wall_seconds: float | None
    compute_seconds: float
    teacher: dict[str, Any] | None
    pareto: list[int]
    top: list[TrialView]
    mlflow: dict[str, str] | None  # tracking_uri, experiment_id, parent_run_id, link
    journal: Path | None
    notes: list[str] = field(default_factory=list)
    study: Any = None  # the Optuna study as the journal holds it (None without one)

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(t.status == s for t in self.trials) for s in STATUSES}

    @property
    def by_number(self) -> dict[int, TrialView]:
        return {t.number: t for t in self.trials}


def read_rows(search_dir: str | Path) -> list[dict[str, Any]]:
    """Every row the search's trials reported, read from its record without writing anything
    (results.parquet may lag behind a running search)."""
    from .record import read_rows as read

    return read(Path(search_dir), lambda line: print(line, file=sys.stderr))


def read_spec(search_dir: str | Path) -> Spec:
    """The space the search was started with; a damaged space.yaml is one line naming it."""
    from .spec import SpecError, load

    path = Path(search_dir) / SPACE_FILE
    if not path.is_file():
        raise ReportError(f"{search_dir}: not a search directory (no space.yaml)")
    try:
        return load(path)
    except SpecError as exc:
        raise ReportError(f"{exc} (the search's own copy of its space is damaged)") from None


class ReportError(RuntimeError):
    """A directory the report cannot read: one line."""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return None


def load_journal(search_dir: Path, name: str) -> Any:
    """The Optuna study, opened read-only as optuna-dashboard opens it (None if absent)."""
    path = search_dir / JOURNAL_FILE
    if not path.exists():  # opening a journal backend creates the file: never do that here
        return None
    try:
        check_log(path, "journal")
    except DamagedFile as exc:
        raise ReportError(str(exc)) from None
    import optuna
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # the study is not in it yet
        return None


def teacher_meta(spec: Spec, trials_dir: Path) -> dict[str, Any] | None:
    """The cached teacher's meta.json (its test and val accuracy), if the cache holds it."""
    try:
        meta = _json(trials_dir / "teachers" / teacher_digest(spec) / "meta.json")
    except OSError:
        return None
    return meta if isinstance(meta, dict) else None


def asha_rungs(spec: Spec) -> list[int]:
    """The epochs where ASHA compares trials (Ray's `_Bracket` rungs, one bracket)."""
    if spec.search.scheduler != "asha":
        return []
    max_t = spec.train.epochs
    return rung_epochs(min(spec.search.grace_period, max_t), max_t, spec.search.reduction_factor)


def mlflow_link(tracking: Mapping[str, str]) -> str:
    """The experiment's trials table in the MLflow UI: the server itself, or `searchkd ui`'s."""
    from .mlflow_ui import ui_link

    return ui_link(str(tracking.get("tracking_uri", "")), str(tracking["experiment_id"]), UI_URL)


def _status(last_epoch: int, epochs: int, optuna_state: str | None, search_state: str) -> str:
    """How a trial stands; the study is the record of how trials ended."""
    if optuna_state == "FAIL":
        return "failed"
    if not stopped_early(last_epoch, epochs):
        return "finished"
    if optuna_state == "COMPLETE":
        return "stopped"
    return "running" if search_state == "running" else "unfinished"


def analyze(search_dir: str | Path) -> Analysis:
    """Read the search directory and compute everything the report shows."""
    search_dir = Path(search_dir).resolve()
    spec = read_spec(search_dir)
    metric, mode = spec.metrics[0], spec.modes[0]
    rows = read_rows(search_dir)
    notes = []
    state_file = read_state(search_dir, lambda line: notes.append(line.split("warning: ", 1)[-1]))
    state = str(state_file.get("status", "unknown"))
    study = load_journal(search_dir, spec.name)
    optuna_states: dict[int, str] = {}
    errors: dict[int, str] = {}
    starts: list[float] = []
    if study is not None:
        for t in study.get_trials(deepcopy=False):
            optuna_states[t.number] = t.state.name
            if t.state.name == "FAIL":
                errors[t.number] = str(t.user_attrs.get("searchkd", "failed"))
            if t.datetime_start is not None:
                starts.append(t.datetime_start.timestamp())
    runs_map = {
        int(k): v
        for k, v in (_json(search_dir / "mlflow_runs.json") or {}).items()
        if str(k).lstrip("-").isdigit()
    }

    # Rows in the order they came: each is one trial-epoch consumed.
    ordered = sorted(
        rows, key=lambda r: (float(r.get("timestamp") or 0.0), r["trial_number"], r["epoch"])
    )
    per_trial: dict[int, list[dict[str, Any]]] = {}
    end_x: dict[int, int] = {}
    for x, r in enumerate(ordered, start=1):
        n = int(r["trial_number"])
        per_trial.setdefault(n, []).append(r)
        end_x[n] = x

    trials: list[TrialView] = []
    for n, mine in sorted(per_trial.items()):
        mine.sort(key=lambda r: r["epoch"])
        last = mine[-1]
        status = _status(int(last["epoch"]), spec.train.epochs, optuna_states.get(n), state)
        config = json.loads(last.get("config") or "{}")
        trials.append(
            TrialView(
                number=n,
                trial_id=str(last.get("trial_id", "")),
                status=status,
                epochs=int(last["epoch"]),
                scores={
                    m: trial_score(mine, m, md)
                    for m, md in zip(spec.metrics, spec.modes, strict=True)
                },
                test_acc=float(last["test_acc"]) if finite(last.get("test_acc")) else math.nan,
                student_params=float(last.get("student_params") or math.nan),
                student_macs=float(last.get("student_macs") or math.nan),
                objective=str(
                    last.get("objective") or config.get("objective") or spec.objectives[0]
                ),
                config=config,
                run_id=runs_map.get(n),
                end_x=end_x[n],
                curve=[
                    (int(r["epoch"]), float(r[metric]) if finite(r.get(metric)) else math.nan)
                    for r in mine
                ],
                error=errors.get(n),
            )
        )
    by_number = {t.number: t for t in trials}
    failed = {t.number for t in trials if t.status == "failed"}
    best_number = pick_best({t.number: t.scores[metric] for t in trials}, mode, failed)

    # Best so far against trial-epochs consumed: each row counts with the score its trial has
    # reached by then (for val_acc its best_val_acc), failed trials excepted.
    history_x, history_best = [], []
    best_so_far = math.nan
    for x, r in enumerate(ordered, start=1):
        n = int(r["trial_number"])
        if n not in failed:
            value = trial_score([r], metric, mode)
            if better(value, best_so_far, mode):
                best_so_far = value
        history_x.append(x)
        history_best.append(best_so_far)

    pareto: list[int] = []
    if len(spec.metrics) > 1:
        pareto = pareto_set(
            {
                t.number: [t.scores[m] for m in spec.metrics]
                for t in trials
                if t.number not in failed
            },
            spec.modes,
        )
    ranked = rank_trials(trials, metric, mode)
    mlflow = None
    if isinstance(_json(search_dir / "tracking.json"), dict):
        from .mlflow_ui import read_tracking

        try:
            tracking = read_tracking(search_dir / "tracking.json", search_dir.parent)
        except (KeyError, TypeError, ValueError, OSError):
            tracking = None
        if tracking is not None:
            mlflow = {**tracking, "link": mlflow_link(tracking)}
    timestamps = [float(r["timestamp"]) for r in rows if finite(r.get("timestamp"))]
    wall = None
    if timestamps:
        first = min(starts) if starts else min(timestamps)
        wall = max(timestamps) - first
    if study is None:
        notes.append("no Optuna study in optuna.journal yet: parameter plots are left out")
    journal = search_dir / JOURNAL_FILE
    return Analysis(
        search_dir=search_dir,
        spec=spec,
        state=state,
        metric=metric,
        mode=mode,
        trials=trials,
        best=by_number.get(best_number) if best_number is not None else None,
        history_x=history_x,
        history_best=history_best,
        rungs=asha_rungs(spec),
        trial_epochs=len(rows),
        budget_epochs=spec.search.num_samples * spec.train.epochs,
        wall_seconds=wall,
        compute_seconds=sum(
            float(r["epoch_seconds"]) for r in rows if finite(r.get("epoch_seconds"))
        ),
        teacher=teacher_meta(spec, search_dir.parent),
        pareto=pareto,
        top=ranked[:TOP_N],
        mlflow=mlflow,
        journal=journal if journal.exists() else None,
        notes=notes,
        study=study,
    )


# -- units and labels --------------------------------------------------------------------------
_LABELS = {
    "val_acc": "validation top-1 accuracy (fraction)",
    "best_val_acc": "best validation top-1 accuracy (fraction)",
    "val_top5": "validation top-5 accuracy (fraction)",
    "test_acc": "test top-1 accuracy (fraction)",
    "test_acc_last": "last epoch's test top-1 accuracy (fraction)",
    "train_loss": "training loss (nats per image)",
    "epoch_seconds": "seconds per epoch",
    "images_per_second": "training images per second",
}


def scale_of(metric: str, values: Sequence[float]) -> tuple[float, str]:
    """A divisor and its label for counts (MACs, parameters) so axes read in K or M."""
    if metric not in ("student_macs", "student_params", "objective_params"):
        return 1.0, _LABELS.get(metric, metric)
    what = {
        "student_macs": "student MACs per image",
        "student_params": "student parameters",
        "objective_params": "objective head parameters",
    }[metric]
    top = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    if top >= 1e6:
        return 1e6, f"{what} (millions)"
    if top >= 1e3:
        return 1e3, f"{what} (thousands)"
    return 1.0, what


def axis_label(metric: str, values: Sequence[float] = ()) -> str:
    return scale_of(metric, values)[1]


def fmt(value: Any, metric: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if metric in ("student_macs", "student_params", "objective_params"):
        v = float(value)
        return f"{v / 1e6:.2f} M" if v >= 1e6 else f"{v / 1e3:.1f} K" if v >= 1e3 else f"{v:.0f}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def short(value: Any) -> str:
    """A sampled value as a table shows it."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def score_study(a: Analysis, metric: str | None = None) -> Any:
    """An in-memory single-objective copy of the study whose values are the trials' scores
    (ended trials only), for Optuna's importance and slice plots."""
    import optuna

    metric = metric or a.metric
    mode = a.spec.modes[a.spec.metrics.index(metric)]
    study = a.study
    if study is None:
        return None
    ended = {
        t.number: t.scores[metric]
        for t in a.trials
        if t.status in ("finished", "stopped") and math.isfinite(t.scores[metric])
    }
    copy = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for t in study.get_trials(deepcopy=False):
        if t.number in ended and t.params:
            copy.add_trial(
                optuna.trial.create_trial(
                    params=t.params,
                    distributions=t.distributions,
                    value=ended[t.number],
                    user_attrs={"number": t.number},
                )
            )
    return copy


def importances(study: Any) -> dict[str, float]:
    """Optuna's own evaluator (its default, PED-ANOVA) on the scores; {} when it cannot tell."""
    import optuna

    if study is None or len(study.trials) < 2 or not study.trials[0].params:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except Exception:  # noqa: BLE001 - too few or too alike trials: the report goes without
        return {}
