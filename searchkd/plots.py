"""The report's PNG plots, each drawn from an `Analysis` (matplotlib, headless).

Every plot draws only what `analyze` computed, so a figure can be checked against data.json.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from .analysis import STATUS_TEXT, STATUSES, Analysis, axis_label, scale_of

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
