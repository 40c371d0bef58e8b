"""A search at a glance: `trials/<name>/report/`, an offline HTML page and its PNG plots.

The report reads only the search directory: `space.yaml`, `results.jsonl` (the record of the
rows results.parquet is built from, one per trial per epoch, always current), `optuna.journal`,
`state.json`, `storage.json`, `tracking.json`, `mlflow_runs.json`, plus the teacher's cache entry
beside it (`trials/teachers/<digest>/meta.json`, for the teacher's accuracy). It takes no
lock and writes nothing outside `report/`, so it runs on a running or interrupted search as
well as on a finished one.

What is "best" is decided in one place, `searchkd.metrics` (`trial_score`, `pick_best`): a
trial's score on a metric is the value of the student the trial keeps, which the trial records
as `score_<metric>` (the row's `test_acc` is that student's test accuracy). Failed trials are
never the best. The Pareto front of a
multi-objective search is computed on the same scores.

Everything a plot draws is computed first (`analyze`, an `Analysis`) and written beside the
plots as `data.json`, so what a plot shows can be checked against the Parquet rows.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .metrics import (
    better,
    finite,
    json_safe,
    kept_name,
    pick_best,
    rung_epochs,
    stopped_early,
    trial_score,
)
from .record import JOURNAL_FILE, SPACE_FILE, STATE_FILE
from .spec import Spec, teacher_digest

REPORT_DIR = "report"
INDEX_FILE = "index.html"
DATA_FILE = "data.json"
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
    path = Path(search_dir) / SPACE_FILE
    if not path.is_file():
        raise ReportError(f"{search_dir}: not a search directory (no space.yaml)")
    return Spec.model_validate(yaml.safe_load(path.read_text()))


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
    state_file = _json(search_dir / STATE_FILE) or {}
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
    notes = []
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


# -- the final stage (searchkd final): its summary, kept in final.parquet's metadata -------------
FINAL_FILE = "final.parquet"
FINAL_KEY = b"searchkd.final"


def read_final(search_dir: str | Path) -> dict[str, Any] | None:
    """The final stage's summary from `final.parquet`, or None when there is none (yet)."""
    import pyarrow.parquet as pq

    path = Path(search_dir) / FINAL_FILE
    if not path.exists():
        return None
    try:
        raw = (pq.read_schema(path).metadata or {}).get(FINAL_KEY)
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None


def _signed(value: Any) -> str:
    return f"{value:+.4f}" if finite(value) else "–"


def final_lines(summary: Mapping[str, Any]) -> list[str]:
    """The final stage as the command line prints it: each config's test accuracy over the
    seeds, its paired difference to the default with the interval, and the verdict."""
    configs = summary["configs"]
    top = sum(c["rank"] is not None for c in configs)
    level = round(100 * float(summary.get("level", 0.95)))
    default = (
        "and the default" if any(c["rank"] is None for c in configs) else "(the default among them)"
    )
    head = (
        f"final stage: {top} top config{'s' if top != 1 else ''} {default} retrained on train + "
        f"val (val_fraction 0), {len(summary['seeds'])} seeds each; test_acc of the last epoch's "
        f"student"
    )
    if not summary.get("complete"):
        head += f" ({summary['runs_done']} of {summary['runs_planned']} runs done)"
    names = [
        c["label"] + (f" (trial {c['trial_number']})" if c["trial_number"] is not None else "")
        for c in configs
    ]
    width = max(len(n) for n in names)
    lines = [head]
    for name, c in zip(names, configs, strict=True):
        line = f"  {name:<{width}}  test_acc {fmt(c['mean'])} ± {fmt(c['std'])} (n {c['n']})"
        d = c.get("diff")
        if d and not c["is_default"]:
            line += (
                f"  Δ vs default {_signed(d['mean'])} [{level}% CI {_signed(d['low'])}, "
                f"{_signed(d['high'])}]: {c['verdict']}"
            )
        lines.append(line)
    for note in summary.get("notes", []):
        lines.append(f"  note: {note}")
    best = next((c for c in configs if c["rank"] == 1), None)
    if best is not None:
        what = "it is the default" if best["is_default"] else best.get("verdict", "")
        lines.append(
            f"  verdict: the search's best config (trial {best['trial_number']}): {what}"
            + ("" if summary.get("complete") else " (so far)")
        )
    return lines


def final_html(summary: Mapping[str, Any]) -> str:
    """The report's section on the final stage: one row per config."""
    level = round(100 * float(summary.get("level", 0.95)))
    rows = []
    for c in summary["configs"]:
        d = c.get("diff") or {}
        rows.append(
            [
                (c["label"], ""),
                ("–" if c["trial_number"] is None else str(c["trial_number"]), "n"),
                (fmt(c["score"]), "n"),
                (f"{fmt(c['mean'])} ± {fmt(c['std'])}", "n"),
                (str(c["n"]), "n"),
                ("" if c["is_default"] else _signed(d.get("mean")), "n"),
                (
                    ""
                    if c["is_default"]
                    else f"[{_signed(d.get('low'))}, {_signed(d.get('high'))}]",
                    "n",
                ),
                (c.get("verdict", "") if not c["is_default"] else "(the default)", ""),
                (", ".join(f"{k}={short(v)}" for k, v in sorted(c["params"].items())), ""),
            ]
        )
    headers = [
        "config",
        "trial",
        "search score",
        "test_acc mean ± std",
        "seeds",
        "Δ vs default",
        f"{level}% CI (paired t)",
        "verdict",
        "config values",
    ]
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in summary.get("notes", []))
    done = (
        ""
        if summary.get("complete")
        else (f" {summary['runs_done']} of {summary['runs_planned']} runs are done so far.")
    )
    return (
        "<h2>Final stage: is the winner really better?</h2>"
        f"<p>The top configs and the default one (every searched tunable at its objective's "
        f"default) retrained on train + val (<code>val_fraction: 0</code>) with the same "
        f"{len(summary['seeds'])} seeds each, measured on test (the last epoch's student). Δ is "
        f"the paired difference to the default over the seeds, with its {level}% t-interval; a "
        f"config beats the default when the "
        f"whole interval is above 0.{done}</p>" + notes + _table(headers, rows, "final")
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


# -- plots -------------------------------------------------------------------------------------
COLORS = {
    "finished": "#1f5fa8",
    "stopped": "#e08a1e",
    "failed": "#c0392b",
    "running": "#7f7f7f",
    "unfinished": "#7f7f7f",
}
MARKERS = {"finished": "o", "stopped": "X", "failed": "v", "running": "o", "unfinished": "s"}
RC = {
    "figure.dpi": 100,
    "savefig.dpi": 110,
    "font.size": 12,
    "axes.titlesize": 14,
    "axes.labelsize": 12,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.figsize": (10.0, 5.6),
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@contextlib.contextmanager
def plotting() -> Any:
    """Matplotlib's default style with the report's sizes, restored afterwards (Optuna's plots
    switch to ggplot globally, so each plot is drawn in one of these)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # headless: nothing is shown, files are written
    import matplotlib.pyplot as plt

    with warnings.catch_warnings(), plt.style.context("default"), matplotlib.rc_context(RC):
        warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for its matplotlib plots
        yield plt


def _legend_status(ax: Any, statuses: Sequence[str], line: bool = False) -> list[Any]:
    from matplotlib.lines import Line2D

    handles = []
    for s in STATUSES:
        if s in statuses:
            handles.append(
                Line2D(
                    [],
                    [],
                    color=COLORS[s],
                    marker=MARKERS[s],
                    linestyle="-" if line else "",
                    markerfacecolor="none" if s == "running" else COLORS[s],
                    label=f"{STATUS_TEXT[s]} ({statuses.count(s)})",
                )
            )
    return handles


def plot_history(a: Analysis) -> Any:
    """Best score so far against trial-epochs consumed; each trial a point where it ended."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.6))
    ys = [t.scores[a.metric] for t in a.trials]
    div, label = scale_of(a.metric, ys)
    (line,) = ax.step(
        a.history_x,
        [v / div for v in a.history_best],
        where="post",
        color="#222222",
        lw=2,
        label=f"best so far ({a.mode})",
    )
    line.set_gid("best-so-far")
    for s in STATUSES:
        mine = [t for t in a.trials if t.status == s]
        if not mine:
            continue
        pts = ax.scatter(
            [t.end_x for t in mine],
            [t.scores[a.metric] / div for t in mine],
            s=60,
            zorder=3,
            marker=MARKERS[s],
            color=COLORS[s],
            edgecolors=COLORS[s] if s != "running" else COLORS[s],
            facecolors="none" if s == "running" else COLORS[s],
        )
        pts.set_gid(f"trials-{s}")
    if a.best is not None:
        xy = (a.best.end_x, a.best.scores[a.metric] / div)
        ring = ax.scatter(
            [xy[0]], [xy[1]], s=260, facecolors="none", edgecolors="#222222", linewidths=2, zorder=4
        )
        ring.set_gid("best-trial")
        left = xy[0] < 0.5 * max(a.history_x[-1], 1)  # the label goes where the steps are not
        ax.annotate(
            f"best: trial {a.best.number}",
            xy,
            xytext=(30 if left else -30, -42 if a.mode == "max" else 30),
            textcoords="offset points",
            fontsize=11,
            ha="left" if left else "right",
            zorder=5,
            bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "#888888", "alpha": 0.95},
            arrowprops={"arrowstyle": "-", "color": "#222222", "lw": 1},
        )
    ax.set_xlabel("trial-epochs consumed (cumulative, in the order results came)")
    ax.set_ylabel(label)
    ax.set_xlim(0, max(a.history_x[-1] if a.history_x else 1, 1) * 1.02)
    saved = a.budget_epochs - a.trial_epochs
    title = f"Optimisation history: best {a.metric} so far against cost"
    if a.spec.search.scheduler == "asha" and a.state == "finished" and saved > 0:
        title += (
            f"\n{a.trial_epochs} of {a.budget_epochs} trial-epochs run: ASHA saved {saved} "
            f"({saved / a.budget_epochs:.0%})"
        )
    ax.set_title(title)
    handles = [line, *_legend_status(ax, [t.status for t in a.trials])]
    ax.legend(handles=handles, loc="lower right" if a.mode == "max" else "upper right")
    fig.tight_layout()
    return fig


def plot_curves(a: Analysis) -> Any:
    """The metric per epoch for every trial, by how it ended, with ASHA's rungs."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.6))
    values = [v for t in a.trials for _, v in t.curve]
    div, label = scale_of(a.metric, values)
    many = len(a.trials) > 40
    for t in sorted(a.trials, key=lambda t: STATUSES.index(t.status), reverse=True):
        xs = [e for e, _ in t.curve]
        ys = [v / div for _, v in t.curve]
        style = {
            "finished": "-",
            "stopped": "--",
            "failed": ":",
            "running": "-",
            "unfinished": "-.",
        }[t.status]
        (ln,) = ax.plot(
            xs,
            ys,
            style,
            color=COLORS[t.status],
            lw=1.0 if many else 1.6,
            alpha=0.45 if many else 0.85,
        )
        ln.set_gid(f"trial-{t.number}")
        if t.status != "finished" and xs:
            ax.plot(
                xs[-1],
                ys[-1],
                MARKERS[t.status],
                color=COLORS[t.status],
                ms=7,
                markerfacecolor="none" if t.status == "running" else COLORS[t.status],
            )
    for r in a.rungs:
        ax.axvline(r, color="#555555", ls=(0, (2, 3)), lw=1.2, gid=f"rung-{r}")
        ax.text(
            r,
            1.0,
            f" ASHA rung {r}",
            transform=ax.get_xaxis_transform(),
            va="bottom",
            ha="center",
            fontsize=10,
            color="#333333",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.set_xlim(0.5, a.spec.train.epochs + 0.5)
    ax.set_title(f"Learning curves: {a.metric} per epoch of every trial", pad=22 if a.rungs else 6)
    handles = _legend_status(ax, [t.status for t in a.trials], line=True)
    if a.rungs:
        from matplotlib.lines import Line2D

        handles.append(
            Line2D(
                [], [], color="#555555", ls=(0, (2, 3)), label="ASHA rung (epoch it may stop at)"
            )
        )
    ax.legend(handles=handles, loc="lower right" if a.mode == "max" else "upper right")
    fig.tight_layout()
    return fig


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


def plot_importances(a: Analysis, study: Any) -> Any:
    from optuna.visualization.matplotlib import plot_param_importances

    ax = plot_param_importances(study, target_name=f"score ({a.metric})")
    fig = ax.figure
    fig.set_size_inches(10, max(3.2, 1.0 + 0.55 * len(ax.get_yticks())))
    ax.set_title(
        f"Parameter importance for {a.metric} (Optuna PED-ANOVA, {len(study.trials)} ended trials)",
        loc="left",
    )
    ax.set_xlabel(f"importance (share of the variation of {a.metric} explained; the bars sum to 1)")
    ax.set_ylabel("searched parameter")
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()
    fig.tight_layout()
    return fig


def plot_slices(a: Analysis, study: Any, params: list[str]) -> Any:
    from optuna.visualization.matplotlib import plot_slice

    axs = plot_slice(study, params=params, target_name=a.metric)
    axes = list(axs.flat) if hasattr(axs, "flat") else [axs]
    fig = axes[0].figure
    fig.set_size_inches(max(6.0, 4.2 * len(axes)) + 1.5, 5.0)
    if fig.get_suptitle():
        fig.suptitle("")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax in axes:
        ax.set_title("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", labelrotation=20)
        if ax.get_xscale() == "log":  # plain numbers at 1, 2, 5 × 10^k: no crowded minor labels
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_ylabel(f"trial's {axis_label(a.metric)}")
    for ax in fig.axes:
        if ax not in axes:  # Optuna's colour bar: its trial order, which skips unended trials
            ax.set_ylabel("trial (order sampled)")
    fig.suptitle(
        f"{a.metric} against the {len(params)} most important parameters "
        f"(each dot a trial, colour = trial number)",
        fontsize=14,
    )
    return fig


def plot_objectives(a: Analysis) -> Any:
    """The metric per objective side by side (a choice of objectives): a box over the trials that
    trained all epochs (comparable), every ended trial a marker."""
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(a.spec.objectives)
    ended = [
        t
        for t in a.trials
        if t.status in ("finished", "stopped") and math.isfinite(t.scores[a.metric])
    ]
    div, label = scale_of(a.metric, [t.scores[a.metric] for t in ended])
    fig, ax = plt.subplots(figsize=(10, 5.0))
    full = [
        [t.scores[a.metric] / div for t in ended if t.objective == n and t.status == "finished"]
        for n in names
    ]
    ax.boxplot(
        [g if g else [math.nan] for g in full],
        positions=range(len(names)),
        widths=0.5,
        showfliers=False,
        medianprops={"color": "#222222", "lw": 2},
    )
    rng = np.random.default_rng(0)
    for i, n in enumerate(names):
        for s in ("finished", "stopped"):
            ys = [t.scores[a.metric] / div for t in ended if t.objective == n and t.status == s]
            if ys:
                pts = ax.scatter(
                    i + rng.uniform(-0.15, 0.15, len(ys)),
                    ys,
                    s=45,
                    marker=MARKERS[s],
                    color=COLORS[s],
                    zorder=3,
                    alpha=0.9,
                )
                pts.set_gid(f"objective-{n}-{s}")
    counts = [
        (
            sum(t.objective == n and t.status == "finished" for t in ended),
            sum(t.objective == n and t.status == "stopped" for t in ended),
        )
        for n in names
    ]
    ax.set_xticks(
        range(len(names)),
        [f"{n}\n({f} finished, {s} stopped)" for n, (f, s) in zip(names, counts, strict=True)],
    )
    ax.set_xlabel("objective")
    ax.set_ylabel(label)
    ax.set_title(f"{a.metric} per objective (box: trials that trained all epochs)")
    ax.legend(handles=_legend_status(ax, [t.status for t in ended]), loc="best")
    fig.tight_layout()
    return fig


def plot_pareto(a: Analysis) -> Any:
    """The first two objectives of a multi-objective search, the non-dominated trials marked."""
    import matplotlib.pyplot as plt

    m0, m1 = a.spec.metrics[0], a.spec.metrics[1]
    eligible = [
        t
        for t in a.trials
        if t.status != "failed" and math.isfinite(t.scores[m0]) and math.isfinite(t.scores[m1])
    ]
    div0, label0 = scale_of(m0, [t.scores[m0] for t in eligible])
    div1, label1 = scale_of(m1, [t.scores[m1] for t in eligible])
    fig, ax = plt.subplots(figsize=(10, 5.6))
    front = [t for t in eligible if t.number in a.pareto]
    rest = [t for t in eligible if t.number not in a.pareto]
    others = ax.scatter(
        [t.scores[m1] / div1 for t in rest],
        [t.scores[m0] / div0 for t in rest],
        s=45,
        color="#9aa5b1",
        label=f"dominated trials ({len(rest)})",
    )
    others.set_gid("dominated")
    front.sort(key=lambda t: t.scores[m1])
    pts = ax.scatter(
        [t.scores[m1] / div1 for t in front],
        [t.scores[m0] / div0 for t in front],
        s=80,
        color="#c0392b",
        zorder=3,
        label=f"Pareto front: non-dominated ({len(front)})",
    )
    pts.set_gid("pareto")
    ax.step(
        [t.scores[m1] / div1 for t in front],
        [t.scores[m0] / div0 for t in front],
        where="post" if a.spec.modes[1] == "min" else "pre",
        color="#c0392b",
        lw=1.2,
        alpha=0.7,
    )
    at: dict[tuple[float, float], list[int]] = {}  # trials at the same point share one label
    for t in front:
        at.setdefault((t.scores[m1] / div1, t.scores[m0] / div0), []).append(t.number)
    for xy, numbers in at.items():
        ax.annotate(
            ", ".join(map(str, numbers)), xy, xytext=(7, 5), textcoords="offset points", fontsize=11
        )
    ax.set_xlabel(f"{label1}  ({'lower' if a.spec.modes[1] == 'min' else 'higher'} is better)")
    ax.set_ylabel(f"{label0}  ({'higher' if a.spec.modes[0] == 'max' else 'lower'} is better)")
    ax.set_title(f"Trade-off: {m0} against {m1} (labels: trial numbers on the front)")
    ax.legend(loc="lower right" if a.spec.modes[0] == "max" else "upper right")
    fig.tight_layout()
    return fig


# -- the page ----------------------------------------------------------------------------------
@dataclass
class Figure:
    name: str  # file name without .png
    title: str
    caption: str


@dataclass
class Report:
    directory: Path
    index: Path
    figures: list[Path]
    analysis: Analysis
    seconds: float


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def write_report(search_dir: str | Path, out: str | Path | None = None) -> Report:
    """Write `<search>/report/` (or `out`): index.html, one PNG per plot, data.json."""
    start = time.perf_counter()
    a = analyze(search_dir)
    out = Path(out) if out else a.search_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    figures: list[Figure] = []
    data: dict[str, Any] = {}

    def draw(plot: Any, name: str, title: str, caption: str, *args: Any) -> None:
        try:
            with plotting():
                _save(plot(a, *args), out / f"{name}.png")
        except Exception as exc:  # noqa: BLE001 - one plot that cannot be drawn leaves the others
            import matplotlib.pyplot as plt

            plt.close("all")
            a.notes.append(f"{title}: not drawn ({type(exc).__name__}: {str(exc)[:200]})")
            return
        figures.append(Figure(name, title, caption))

    asha = a.spec.search.scheduler == "asha"
    if a.trials:
        draw(
            plot_history,
            "history",
            "Optimisation history",
            (
                f"The black steps are the best {a.metric} any trial had reached after that many "
                f"trial-epochs (one trial-epoch = one trial trained for one "
                f"epoch{': the cost ASHA saves' if asha else ''}). Each marker is a trial, placed "
                f"where its last epoch came, at its score"
                + ("; crosses are trials ASHA stopped early." if asha else ".")
            ),
        )
        draw(
            plot_curves,
            "curves",
            "Learning curves",
            (
                f"{a.metric} after every epoch of every trial. Solid: trained all "
                f"{a.spec.train.epochs} epochs; "
                + ("dashed ending in a cross: stopped by ASHA; " if asha else "")
                + "dotted: failed; grey: still running or unfinished."
                + (
                    " Dotted verticals are ASHA's rungs, the epochs at which a trial is compared "
                    "with the others and may be stopped."
                    if asha
                    else ""
                )
            ),
        )
    with plotting():
        study = score_study(a) if a.trials else None
        imp = importances(study)
    data["importances"] = imp
    if imp:
        draw(
            plot_importances,
            "importances",
            "Parameter importance",
            (
                f"How much of the variation of the trials' {a.metric} each searched parameter "
                f"explains, by Optuna's PED-ANOVA evaluator over the {len(study.trials)} trials "
                f"that ended. With few trials this is a hint, not a measurement."
            ),
            study,
        )
        draw(
            plot_slices,
            "slices",
            "Score against the top parameters",
            (
                f"Each dot is an ended trial: its sampled value of the parameter (x) and its "
                f"{a.metric} (y). Darker dots are later trials, so a sampler converging shows as "
                f"dark dots gathering."
                + (
                    " Trials ASHA stopped count with the value they had reached, so they sit lower."
                    if asha
                    else ""
                )
            ),
            study,
            list(imp)[:3],
        )
    elif a.trials:
        a.notes.append(
            "parameter importance needs at least two ended trials with searched parameters"
        )
    if len(a.spec.objectives) > 1 and a.trials:
        draw(
            plot_objectives,
            "objectives",
            "Objectives side by side",
            (
                f"Each objective's trials at their {a.metric}: the box spans the middle half of "
                f"the trials that trained all epochs, the line is their median; crosses are trials "
                f"ASHA stopped, at the value they had reached (not comparable with a full "
                f"training)."
            ),
        )
    if len(a.spec.metrics) > 1 and a.trials:
        draw(
            plot_pareto,
            "pareto",
            "Pareto front",
            (
                f"Every trial at its {a.spec.metrics[0]} and {a.spec.metrics[1]}. Red: the "
                f"non-dominated trials, those no other trial beats on both at once; the table "
                f"below lists them."
            ),
        )
    data.update(analysis_data(a))
    (out / DATA_FILE).write_text(json.dumps(json_safe(data), indent=1, default=str))
    index = out / INDEX_FILE
    index.write_text(render_html(a, figures, out, imp))
    return Report(
        out, index, [out / f"{f.name}.png" for f in figures], a, time.perf_counter() - start
    )


def trial_data(t: TrialView) -> dict[str, Any]:
    return json_safe(
        {
            "trial": t.number,
            "trial_id": t.trial_id,
            "status": t.status,
            "epochs": t.epochs,
            "scores": t.scores,
            "test_acc": t.test_acc,
            "student_params": t.student_params,
            "student_macs": t.student_macs,
            "objective": t.objective,
            "config": t.config,
            "mlflow_run_id": t.run_id,
            "end_x": t.end_x,
            "error": t.error,
        }
    )


def analysis_data(a: Analysis) -> dict[str, Any]:
    """What the plots and tables show, as numbers."""
    return json_safe(
        {
            "search": a.spec.name,
            "state": a.state,
            "metric": a.metric,
            "mode": a.mode,
            "metrics": a.spec.metrics,
            "modes": a.spec.modes,
            "best": trial_data(a.best) if a.best else None,
            "counts": a.counts,
            "trial_epochs": a.trial_epochs,
            "budget_epochs": a.budget_epochs,
            "wall_seconds": a.wall_seconds,
            "compute_seconds": a.compute_seconds,
            "teacher": {k: a.teacher.get(k) for k in ("arch", "test_acc", "val_acc")}
            if a.teacher
            else None,
            "history": {"trial_epochs": a.history_x, "best": a.history_best},
            "rungs": a.rungs,
            "pareto": a.pareto,
            "top": [trial_data(t) for t in a.top],
            "trials": [trial_data(t) for t in a.trials],
            "mlflow": a.mlflow,
            "notes": a.notes,
            "final": read_final(a.search_dir),
        }
    )


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;\
margin:0;color:#1d232a;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:26px;margin:8px 0 4px} h2{font-size:20px;\
margin:34px 0 8px;border-bottom:1px solid #d8dde3;padding-bottom:4px}
.sub{color:#56606b;margin:0 0 16px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:10px;margin:14px 0}
.card{background:#fff;border:1px solid #dfe3e8;border-radius:8px;padding:10px 14px}
.card .k{font-size:12px;color:#5b6670;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:20px;font-weight:600;margin-top:2px} .card .d{font-size:13px;color:#4a545e}
figure{background:#fff;border:1px solid #dfe3e8;border-radius:8px;margin:12px 0;padding:12px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:14px;color:#3b444d;margin-top:8px;line-height:1.45}
table{border-collapse:collapse;background:#fff;font-size:13px;width:100%}
th,td{border:1px solid #dfe3e8;padding:5px 7px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600} \
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.best td{background:#fff8e1} \
code{background:#eef1f4;padding:1px 4px;border-radius:3px;font-size:13px}
.how li{margin:4px 0} .note{color:#8a5300} details{margin:10px 0} \
summary{cursor:pointer;font-weight:600}
.wrap{overflow-x:auto}
"""


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _cards(a: Analysis) -> str:
    c = a.counts
    best = a.best
    cards = []

    def card(k: str, v: str, d: str = "") -> None:
        cards.append(
            f'<div class="card"><div class="k">{html.escape(k)}</div>'
            f'<div class="v">{html.escape(v)}</div><div class="d">{html.escape(d)}</div></div>'
        )

    if best is not None:
        card(
            f"best {a.metric}",
            fmt(best.scores[a.metric], a.metric),
            f"trial {best.number}, test_acc {fmt(best.test_acc)}",
        )
    else:
        card(f"best {a.metric}", "–", "no trial has a score yet")
    t = a.teacher
    card(
        "teacher",
        f"{a.spec.teacher.arch}",
        f"test_acc {fmt(t.get('test_acc'))}" if t else "test_acc unknown (not in the cache)",
    )
    card(
        "trials",
        f"{len(a.trials)} of {a.spec.search.num_samples}",
        f"{c['finished']} finished, {c['stopped']} stopped by ASHA, {c['failed']} failed"
        + (f", {c['running']} running" if c["running"] else "")
        + (f", {c['unfinished']} unfinished" if c["unfinished"] else ""),
    )
    card(
        "trial-epochs",
        f"{a.trial_epochs} of {a.budget_epochs}",
        f"{a.trial_epochs / a.budget_epochs:.0%} of a search without early stopping"
        if a.budget_epochs
        else "",
    )
    card(
        "wall time",
        duration(a.wall_seconds),
        f"training time {duration(a.compute_seconds)} (sum of epochs)",
    )
    card("state", a.state, f"written {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return '<div class="cards">' + "".join(cards) + "</div>"


def _table(
    headers: list[str], rows: list[list[tuple[str, str]]], table_id: str, best: int | None = None
) -> str:
    """rows: cells as (text, class)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cls = ' class="best"' if best is not None and row and row[1][0] == str(best) else ""
        body.append(
            f"<tr{cls}>"
            + "".join(
                f'<td class="{c}">{html.escape(text)}</td>'
                if c
                else f"<td>{html.escape(text)}</td>"
                for text, c in row
            )
            + "</tr>"
        )
    return (
        f'<div class="wrap"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def trial_rows(
    a: Analysis, trials: list[TrialView]
) -> tuple[list[str], list[list[tuple[str, str]]]]:
    headers = [
        "rank",
        "trial",
        "status",
        *(["objective"] if len(a.spec.objectives) > 1 else []),
        *a.spec.metrics,
        "test_acc",
        "params",
        "MACs",
        "epochs",
        "config",
        "MLflow run",
    ]
    out = []
    for i, t in enumerate(trials, start=1):
        cells = [(str(i), "n"), (str(t.number), "n"), (STATUS_TEXT[t.status], "")]
        if len(a.spec.objectives) > 1:
            cells.append((t.objective, ""))
        cells += [(fmt(t.scores[m], m), "n") for m in a.spec.metrics]
        cells += [
            (fmt(t.test_acc), "n"),
            (fmt(t.student_params, "student_params"), "n"),
            (fmt(t.student_macs, "student_macs"), "n"),
            (str(t.epochs), "n"),
            (", ".join(f"{k}={short(v)}" for k, v in sorted(t.params.items())), ""),
            (t.run_id or "–", ""),
        ]
        out.append(cells)
    return headers, out


def render_html(a: Analysis, figures: list[Figure], out: Path, imp: dict[str, float]) -> str:
    spec = a.spec
    name = html.escape(spec.name)
    objective = "/".join(spec.objectives)
    metric_text = ", ".join(f"{m} ({md})" for m, md in zip(spec.metrics, spec.modes, strict=True))
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>searchkd report: {name}</title>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>Search {name}</h1>",
        f'<p class="sub">{html.escape(spec.teacher.arch)} → {html.escape(spec.student.arch)} on '
        f"{html.escape(spec.data.dataset)}, objective {html.escape(objective)}, metric "
        f"{html.escape(metric_text)}, sampler {spec.search.sampler}, scheduler "
        f"{spec.search.scheduler}, {spec.search.num_samples} trials × {spec.train.epochs} epochs. "
        f"Directory <code>{html.escape(str(a.search_dir))}</code>.</p>",
        _cards(a),
    ]
    if a.best is not None:
        b = a.best
        parts.append(
            f"<p><b>Best trial {b.number}</b> ({STATUS_TEXT[b.status]}, {b.epochs} epochs): "
            f"{a.metric} {fmt(b.scores[a.metric], a.metric)}, test_acc {fmt(b.test_acc)}, "
            f"{fmt(b.student_params, 'student_params')} parameters, "
            f"{fmt(b.student_macs, 'student_macs')} MACs per image. Config: <code>"
            f"{html.escape(', '.join(f'{k}={short(v)}' for k, v in sorted(b.config.items())))}"
            f"</code></p>"
        )
    how = [
        f"<li>Take the best student away: <code>searchkd best {html.escape(str(a.search_dir))} "
        f"--out best/</code></li>"
    ]
    if a.mlflow:
        how.append(
            f'<li>MLflow: <a href="{html.escape(a.mlflow["link"])}">'
            f"{html.escape(a.mlflow['link'])}</a>"
            + (
                ""
                if a.mlflow["tracking_uri"].startswith("http")
                else " (start it with <code>searchkd ui</code>)"
            )
            + f"; the search's parent run is "
            f"<code>{html.escape(a.mlflow['parent_run_id'])}</code>.</li>"
        )
    if a.journal is not None:
        how.append(
            f"<li>The Optuna study: <code>optuna-dashboard {html.escape(str(a.journal))}</code> "
            "(<code>pip install 'searchkd[dashboard]'</code>)</li>"
        )
    parts.append('<ul class="how">' + "".join(how) + "</ul>")
    for note in a.notes:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    if a.pareto:
        parts.append("<h2>Pareto front</h2>")
    for f in figures:
        if f.name == "pareto":
            parts.append(_figure(f, out))
            front = sorted(
                (a.by_number[n] for n in a.pareto), key=lambda t: t.scores[spec.metrics[1]]
            )
            headers, rows = trial_rows(a, front)
            parts.append(f"<p>The {len(front)} non-dominated trials, by {spec.metrics[1]}:</p>")
            parts.append(_table(headers, rows, "pareto"))
    parts.append(f"<h2>Top {min(TOP_N, len(a.top))} trials by {html.escape(a.metric)}</h2>")
    if a.top:
        headers, rows = trial_rows(a, a.top)
        parts.append(_table(headers, rows, "top", a.best.number if a.best else None))
        parts.append(
            f"<p>{a.metric} is the trial's kept student's value"
            + (
                " (its best_val_acc)"
                if a.metric == "val_acc"
                else f" (its best over epochs, {a.mode})"
            )
            + "; test_acc is that student's test accuracy, reported and never used to choose.</p>"
        )
    else:
        parts.append("<p>No trial has reported an epoch yet.</p>")
    final = read_final(a.search_dir)
    if final is not None:
        parts.append(final_html(final))
    for f in figures:
        if f.name != "pareto":
            parts.append(f"<h2>{html.escape(f.title)}</h2>")
            parts.append(_figure(f, out))
    if imp:
        parts.append(
            "<details><summary>Importance values</summary>"
            + _table(
                ["parameter", "importance"],
                [[(k, ""), (f"{v:.3f}", "n")] for k, v in imp.items()],
                "importances",
            )
            + "</details>"
        )
    if a.trials:
        ordered = sorted(a.trials, key=lambda t: t.number)
        headers, rows = trial_rows(a, ordered)
        headers[0] = "#"
        parts.append(
            f"<details><summary>All {len(ordered)} trials</summary>"
            + _table(headers, rows, "trials")
            + "</details>"
        )
    failed = [t for t in a.trials if t.error]
    if failed:
        parts.append(
            "<h2>Failed trials</h2><ul>"
            + "".join(f"<li>trial {t.number}: {html.escape(t.error or '')}</li>" for t in failed)
            + "</ul>"
        )
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _figure(f: Figure, out: Path) -> str:
    path = out / f"{f.name}.png"
    return (
        f'<figure id="fig-{f.name}"><img src="{_img(path)}" alt="{html.escape(f.title)}">'
        f'<figcaption>{html.escape(f.caption)} <a href="{f.name}.png">'
        f"{f.name}.png</a></figcaption></figure>"
    )


def summary_lines(report: Report, shown_dir: str | None = None, final: bool = True) -> list[str]:
    """What the command line prints about a report (with the final stage's summary, if the
    search has one, unless `final` is False: the caller printed it already)."""
    a = report.analysis
    where = shown_dir or os.path.relpath(report.index)
    lines = [f"report: {where}  ({len(report.figures)} plots, {report.seconds:.1f}s)"]
    if a.best is not None:
        lines.append(
            f"  best trial {a.best.number} by {kept_name(a.metric)}: "
            f"{fmt(a.best.scores[a.metric], a.metric)}, test_acc {fmt(a.best.test_acc)}  (export: "
            f"searchkd best {os.path.relpath(a.search_dir)})"
        )
    if a.pareto:
        lines.append(
            f"  Pareto front ({' vs '.join(a.spec.metrics[:2])}): trials "
            f"{', '.join(map(str, a.pareto))}"
        )
    if a.mlflow:
        lines.append(
            f"  MLflow: {a.mlflow['link']}"
            + ("" if a.mlflow["tracking_uri"].startswith("http") else "  (after: searchkd ui)")
        )
    summary = read_final(a.search_dir) if final else None
    if summary is not None:
        lines += final_lines(summary)
    return lines
