"""`searchkd best`: the best student of a search, taken away as plain files.

The student is the best trial's `student_best.pt` from the search's storage (the best-on-val
student the trial kept), written as `student.pt` = `{'model': state_dict}`, beside:

- `model.json`: the keyword arguments of `searchkd.models.build_model` that rebuild it;
- `config.yaml`: the resolved space of that trial (the search's space with the trial's
  sampled values written in, one objective, no `params`), what `searchkd tune` would train;
- `model_card.md`: teacher, data, objective, metric, accuracies, size, config.

Loading it needs nothing but torch and searchkd's model factory:

    model = build_model(**json.load(open("best/model.json")))
    model.load_state_dict(torch.load("best/student.pt", weights_only=True)["model"])
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .analysis import Analysis, TrialView, analyze, fmt, short
from .storage import replace_atomically

STUDENT_OUT = "student.pt"
MODEL_OUT = "model.json"
CONFIG_OUT = "config.yaml"
CARD_OUT = "model_card.md"


class ExportError(RuntimeError):
    """Nothing to export (no trial yet, the weights are gone): one line."""


@dataclass
class Exported:
    directory: Path
    trial: TrialView
    model: dict[str, Any]
    files: list[Path]


def trial_storage(search_dir: Path) -> Any:
    """Where the search's trials wrote (storage.json, fixed when it started)."""
    from .record import STORAGE_FILE
    from .storage import Storage

    path = search_dir / STORAGE_FILE
    info = json.loads(path.read_text()) if path.exists() else {}
    uri = info.get("uri")
    return Storage(uri) if uri else Storage(str(search_dir / "checkpoints"))


def input_shape(spec: Any) -> dict[str, int]:
    """num_classes, in_channels and image_size of the space's dataset, as the engine sees them."""
    from .data import load_dataset
    from .data.base import ArrayDataset

    d = spec.data
    ds = load_dataset(d.dataset, root=d.root, download=False, **d.options)
    if isinstance(ds, ArrayDataset):
        return {
            "num_classes": int(ds.num_classes),
            "in_channels": int(ds.train_x.shape[1]),
            "image_size": int(ds.train_x.shape[-1]),
        }
    return {"num_classes": len(ds.classes), "in_channels": 3, "image_size": int(ds.image_size)}


@dataclass
class Student:
    """A trial's kept student, rebuilt: the module, its weights and what rebuilds it."""

    analysis: Analysis
    trial: TrialView
    spec: Any  # the trial's resolved space
    model_args: dict[str, Any]  # `build_model(**model_args)` rebuilds it
    state: dict[str, Any]
    model: Any


def best_student(search_dir: str | Path, trial: int | None = None) -> Student:
    """The best trial's kept student (or trial `trial`'s), loaded with weights_only=True."""
    import torch

    from .models import build_model
    from .storage import STUDENT_FILE, trial_key
    from .trial import trial_spec

    search_dir = Path(search_dir).resolve()
    a = analyze(search_dir)
    chosen = a.best if trial is None else a.by_number.get(trial)
    if chosen is None:
        raise ExportError(
            f"{search_dir}: no trial {trial} in results.parquet"
            if trial is not None
            else f"{search_dir}: no trial has a {a.metric} yet"
        )
    files = trial_storage(search_dir).child(trial_key(chosen.number))
    blob = files.read_bytes(STUDENT_FILE)
    if blob is None:
        raise ExportError(f"trial {chosen.number}: no {STUDENT_FILE} in {files.display}")
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    spec = trial_spec(a.spec.model_dump(mode="json", by_alias=True), chosen.config)
    model_args: dict[str, Any] = {
        "arch": spec.student.arch,
        "width": spec.student.width,
        **input_shape(spec),
    }
    if spec.student.depth:
        model_args["depth"] = spec.student.depth
    model = build_model(**model_args)
    model.load_state_dict(state)  # strict: the kwargs rebuild exactly this student
    return Student(a, chosen, spec, model_args, state, model.eval())


def export_best(
    search_dir: str | Path, out: str | Path | None = None, trial: int | None = None
) -> Exported:
    """Write the best trial's student (or trial `trial`'s) to `out` (default `<search>/best/`)."""
    import torch
    import yaml

    search_dir = Path(search_dir).resolve()
    st = best_student(search_dir, trial)
    a, chosen, spec, model_args = st.analysis, st.trial, st.spec, st.model_args
    raw = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    raw["name"] = f"{a.spec.name}-trial-{chosen.number}"
    raw["params"] = {}
    raw["search"] = {**raw["search"], "num_samples": 1, "seed": a.spec.search.seed}

    out = Path(out) if out else search_dir / "best"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / STUDENT_OUT, out / MODEL_OUT, out / CONFIG_OUT, out / CARD_OUT]
    replace_atomically(out / STUDENT_OUT, lambda p: torch.save({"model": st.state}, p))
    (out / MODEL_OUT).write_text(json.dumps(model_args, indent=1) + "\n")
    header = (
        f"# searchkd: trial {chosen.number} of search {a.spec.name} ({a.metric} "
        f"{fmt(chosen.scores[a.metric])}, test_acc {fmt(chosen.test_acc)}); "
        f"seed {chosen.config.get('seed')}\n"
    )
    (out / CONFIG_OUT).write_text(header + yaml.safe_dump(raw, sort_keys=False))
    (out / CARD_OUT).write_text(model_card(a, chosen, spec, model_args))
    return Exported(out, chosen, model_args, files)


def model_card(a: Analysis, t: TrialView, spec: Any, model_args: dict[str, Any]) -> str:
    teacher = a.teacher or {}
    metrics = ", ".join(f"{m} {fmt(t.scores[m], m)}" for m in a.spec.metrics)
    rank = (
        "the best trial"
        if a.best is not None and a.best.number == t.number
        else f"trial {t.number}"
    )
    lines = [
        f"# {spec.student.arch} (width {spec.student.width:g}) distilled from {spec.teacher.arch}",
        "",
        f"Exported by `searchkd best` from search `{a.spec.name}`: {rank} by {a.metric} ({a.mode}) "
        f"of {len(a.trials)} trials ({a.state}).",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | {spec.teacher.arch} (width {spec.teacher.width:g}), test_acc "
        f"{fmt(teacher.get('test_acc'))} |",
        f"| data | {spec.data.dataset}, val_fraction {spec.data.val_fraction:g} (val chooses, test "
        f"only reports) |",
        f"| objective | {spec.objective} |",
        f"| search metric | {metrics} |",
        f"| best_val_acc | {fmt(_row(a, t, 'best_val_acc'))} |",
        f"| test accuracy | {fmt(t.test_acc)} (the best-on-val student's; it chose nothing) |",
        f"| parameters | {fmt(t.student_params, 'student_params')} "
        f"({int(t.student_params) if math.isfinite(t.student_params) else '-'}) |",
        f"| MACs per image | {fmt(t.student_macs, 'student_macs')} "
        f"({int(t.student_macs) if math.isfinite(t.student_macs) else '-'}) |",
        f"| epochs trained | {t.epochs} of {spec.train.epochs} ({t.status}) |",
        f"| trial | {t.number}, MLflow run {t.run_id or '-'} |",
        "",
        "## Load it",
        "",
        "```python",
        "import json, torch; from searchkd.models import build_model",
        'model = build_model(**json.load(open("model.json")))',
        'model.load_state_dict(torch.load("student.pt", weights_only=True)["model"]); model.eval()',
        "```",
        "",
        f"Inputs: "
        f"{model_args['in_channels']}×{model_args['image_size']}×{model_args['image_size']} "
        f"images, normalised as searchkd's `{spec.data.dataset}` loader does; "
        f"{model_args['num_classes']} classes. The objective's own heads were trained beside the "
        f"student and are not part of it.",
        "",
        "## Configuration",
        "",
        "`config.yaml` is this trial's resolved space: the search's space with the trial's sampled "
        "values written in and nothing left to search (`searchkd tune config.yaml` trains the same "
        "configuration again, under a seed of its own). The trial's values, with the seed it ran "
        "under:",
        "",
        *[f"- `{k}`: {short(v)}" for k, v in sorted(t.config.items())],
        "",
    ]
    return "\n".join(lines)


def _row(a: Analysis, t: TrialView, key: str) -> Any:
    from .analysis import read_rows

    mine = [r for r in read_rows(a.search_dir) if r["trial_number"] == t.number]
    return max(mine, key=lambda r: r["epoch"]).get(key) if mine else None
