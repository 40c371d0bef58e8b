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
plots as `data.json`, so what a plot shows can be checked against the Parquet rows. The parts
change apart: `analysis.py` computes, `plots.py` draws, this module writes the page (and
re-exports what it is made of).
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .analysis import (
    STATUS_TEXT,
    TOP_N,
    Analysis,
    ReportError,
    TrialView,
    analyze,
    duration,
    fmt,
    importances,
    pareto_set,
    pick_best,
    rank_trials,
    read_rows,
    read_spec,
    score_study,
    short,
    teacher_meta,
    trial_score,
)
from .metrics import (
    finite,
    json_safe,
    kept_name,
)
from .plots import (
    plot_curves,
    plot_history,
    plot_importances,
    plot_objectives,
    plot_pareto,
    plot_slices,
    plotting,
)
from .record import (
    read_final,
    ui_command,
)
from .record import shown as shown_path

# What this module's callers (the CLI, the API, tests) reach through it: the page, and the
# analysis and plots it is made of.
__all__ = [
    "Analysis",
    "Report",
    "ReportError",
    "TrialView",
    "analyze",
    "final_lines",
    "fmt",
    "pareto_set",
    "pick_best",
    "plot_curves",
    "plot_history",
    "plot_objectives",
    "plot_pareto",
    "plotting",
    "rank_trials",
    "read_final",
    "read_rows",
    "read_spec",
    "short",
    "summary_lines",
    "teacher_meta",
    "trial_score",
    "write_report",
]

REPORT_DIR = "report"
INDEX_FILE = "index.html"
DATA_FILE = "data.json"


# -- the final stage (searchkd final): its summary, kept in final.parquet's metadata -------------
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
                else f" (start it with <code>{html.escape(ui_command(a.search_dir))}</code>)"
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
            f"searchkd best {shown_path(a.search_dir)})"
        )
    if a.pareto:
        lines.append(
            f"  Pareto front ({' vs '.join(a.spec.metrics[:2])}): trials "
            f"{', '.join(map(str, a.pareto))}"
        )
    if a.mlflow:
        lines.append(
            f"  MLflow: {a.mlflow['link']}"
            + (
                ""
                if a.mlflow["tracking_uri"].startswith("http")
                else f"  (after: {ui_command(a.search_dir)})"
            )
        )
    summary = read_final(a.search_dir) if final else None
    if summary is not None:
        lines += final_lines(summary)
    return lines
