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
"""

from __future__ import annotations

import json
from typing import Any

UI_VIEW = "searchkd"
UI_KIND = "custom_model_development"


def ui_tags(space: dict[str, Any]) -> dict[str, str]:
    """The experiment tags for a search's space (the parsed space.yaml)."""
    search = space.get("search") or {}
    metrics = search.get("metric", "val_acc")
    modes = search.get("mode", "max")
    metrics = metrics if isinstance(metrics, list) else [metrics]
    modes = modes if isinstance(modes, list) else [modes]
    sort = "best_val_acc" if metrics[0] == "val_acc" else metrics[0]  # the kept student's value
    shown = dict.fromkeys(
        [*metrics, "best_val_acc", "test_acc", "student_params", "student_macs", "epoch"]
    )
    searched = (["objective"] if isinstance(space.get("objective"), dict) else []) + list(
        space.get("params") or {}
    )
    state = {
        "searchFilter": "tags.trial_number LIKE '%'",  # the trials' runs, not the search's own
        "orderByKey": f"metrics.`{sort}`",
        "orderByAsc": modes[0] == "min",
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [f"metrics.`{m}`" for m in shown]
        + [f"params.`{p}`" for p in searched]
        + ["tags.`stopped_early`"],
        "runsHiddenMode": "SHOW_ALL",
        "columnOrder": [],
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
