"""How MLflow's UI opens a search: experiment tags and a direct link (no MLflow import here,
so a report can print the link without loading MLflow).

MLflow 3 opens an experiment on its GenAI overview unless told otherwise. What it allows, found
in its 3.17 UI: the experiment tag `mlflow.experimentKind` (custom_model_development = "Machine
learning"), the URL parameter `workflowType=machine_learning` (the "Model training" side, whose
experiment page is the runs table), and a shared view, an experiment tag
`mlflow.sharedViewState.<key>` holding the runs table's state (sort, filter, columns) that a
URL opens with `viewStateShareKey=<key>`. Expanded rows are not part of a shared view; a table
sorted by a metric lists the child runs flat instead of nested under the parent.

Seen in headless Chromium on MLflow 3.17.2: with the experiment tag alone, a fresh browser
still opens `#/experiments/<id>` on the GenAI overview (its GenAI / Model training switch
defaults to GenAI); the link below, with `workflowType` and the shared view, opens the runs
table of the trials, best first, with the metrics and the searched params as columns. What the
UI cannot be told: which rows are expanded, and a browser's own saved column choice outlives
the shared view only if the user presses "Override saved view".

Read from 3.17.2's bundled UI (mlflow/server/js/build), not yet seen in a browser: a shared
view may hold `selectedColumns`, `columnOrder`, `columnWidths`, `runsExpanded`, `runsPinned`,
`runsHidden`, `runsHiddenMode`, `compareRunCharts`, `compareRunSections`, `groupBy`, ...; the
runs table (AG Grid) applies `columnOrder`, a list of the same column ids as `selectedColumns`
(`metrics.`val_acc``), listed columns first. The Compare page's parallel-coordinates plot
(#/compare-runs) keeps its choice in the component, never in a view or a tag: it starts with
the first three differing params, sorted, and the first metric key the runs share, in the
order the store returns them, which is the order a run first logged them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

UI_VIEW = "searchkd"
UI_KIND = "custom_model_development"
LOCAL_STORE = "mlflow.db"  # the default store: this file in the trials directory


def local_store(trials_dir: Path) -> str:
    """The trials directory's own store (`trials/mlflow.db`), as an absolute sqlite URI."""
    return f"sqlite:///{(Path(trials_dir) / LOCAL_STORE).resolve()}"


def tracking_json(state: dict[str, Any], trials_dir: Path) -> str:
    """A tracking.json's text: the run ids, and the store as `store: mlflow.db` (relative to the
    trials directory) when it is the local one, so a search directory copied or moved with its
    trials directory logs into the store beside it, never the original's."""
    out = dict(state)
    if out.get("tracking_uri") == local_store(trials_dir):
        out["store"] = LOCAL_STORE
    return json.dumps(out, indent=1)


def read_tracking(path: Path, trials_dir: Path) -> dict[str, str]:
    """A tracking.json's `tracking_uri`, `experiment_id` and `parent_run_id`, the local store
    resolved against the trials directory it is in now (a file written before `store` existed
    keeps its recorded URI)."""
    state = json.loads(Path(path).read_text())
    uri = local_store(trials_dir) if state.get("store") == LOCAL_STORE else state["tracking_uri"]
    return {
        "tracking_uri": str(uri),
        "experiment_id": str(state["experiment_id"]),
        "parent_run_id": str(state["parent_run_id"]),
    }


def lead_metrics(metrics: list[str]) -> list[str]:
    """The metrics a trial's run shows first: its `score` (the kept student's value on the first
    metric, what ranks), each search metric as of the epoch, and `test_acc`. The runs table takes
    them as its first columns; each run logs them first, because MLflow's compare view plots the
    first metric key a run was logged with (its parallel coordinates default, train_loss
    otherwise)."""
    return list(dict.fromkeys(["score", *metrics, "test_acc"]))


def ui_tags(space: dict[str, Any]) -> dict[str, str]:
    """The experiment tags for a search's space (the parsed space.yaml)."""
    search = space.get("search") or {}
    metrics = search.get("metric", "val_acc")
    modes = search.get("mode", "max")
    metrics = metrics if isinstance(metrics, list) else [metrics]
    modes = modes if isinstance(modes, list) else [modes]
    lead = lead_metrics(metrics)
    shown = dict.fromkeys([*lead, "student_params", "student_macs", "epoch"])
    searched = (["objective"] if isinstance(space.get("objective"), dict) else []) + list(
        space.get("params") or {}
    )
    state = {
        "searchFilter": "tags.trial_number LIKE '%'",  # the trials' runs, not the search's own
        "orderByKey": "metrics.`score`",  # what ranks: the kept student's value
        "orderByAsc": modes[0] == "min",
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [f"metrics.`{m}`" for m in shown]
        + [f"params.`{p}`" for p in searched]
        + ["tags.`stopped_early`"],
        "runsHiddenMode": "SHOW_ALL",
        # The runs table lists metric columns in the order it first saw the keys, after the
        # run's attributes; these come first (after the pinned run name) at any width.
        "columnOrder": [f"metrics.`{m}`" for m in lead],
        "columnWidths": {},
    }
    return {
        "mlflow.experimentKind": UI_KIND,
        f"mlflow.sharedViewState.{UI_VIEW}": json.dumps(state),
    }


def ui_link(tracking_uri: str, experiment_id: str, local_ui: str = "http://127.0.0.1:5000") -> str:
    """The search's trials in the MLflow UI: the server itself, or where `searchkd ui` serves."""
    base = (
        tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else local_ui
    )
    return (
        f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={UI_VIEW}"
        f"&workflowType=machine_learning"
    )
