"""One Ray Tune trial: a thin adapter that drives the engine epoch by epoch.

The trial owns its files. Each epoch it writes its engine state (`state.pt`) and, when val
improves, its best student (`student_best.pt`) to the search's storage under its own key
(`trial-0003/`), and reports one metrics row to Tune without a Tune checkpoint. When Tune
restarts it (a resumed search, a retry after its node died) it finds its state there, on
whichever node it now runs, and goes on from that epoch. Nothing depends on Tune's snapshot
of which checkpoint it last saw. The teacher arrives as bytes through Ray's object store,
checked against its digest, so no node needs the driver's disk. MLflow is not touched here:
the driver logs (see tracking.py).
"""

from __future__ import annotations

import hashlib
import io
import pickle
from typing import Any

import ray
import torch
from ray import tune

from .data import DatasetNotFound
from .engine import Engine
from .metrics import scores
from .objectives import get_objective
from .spec import Spec
from .storage import STATE_FILE, STUDENT_FILE, Storage, disk_full, trial_key

# Keys the search adds to a trial's config beside the sampled dotted parameters.
META_KEYS = ("trial_number", "seed")


class TrialSetupError(RuntimeError):
    """A trial that cannot start on its node (data missing, teacher corrupted): one line."""


def trial_spec(base: dict[str, Any], config: dict[str, Any]) -> Spec:
    """The base spec with this trial's sampled values written in.

    With a choice of objectives, fixed `loss:` keys may belong to only some of them; a trial
    keeps those its own objective declares.
    """
    sampled = {k: v for k, v in config.items() if k not in META_KEYS}
    spec = Spec.model_validate(base).resolved(sampled)
    own = get_objective(spec.objective).tunables
    if any(k not in own for k in spec.loss):
        raw = spec.model_dump(by_alias=True, exclude_none=True)
        raw["loss"] = {k: v for k, v in spec.loss.items() if k in own}
        spec = Spec.model_validate(raw)
    return spec


def node_label() -> str:
    """This worker's node, as messages name it."""
    return f"{ray.util.get_node_ip_address()} (node {ray.get_runtime_context().get_node_id()[:8]})"


def checked_teacher(blob: bytes | None, sha256: str | None) -> bytes | None:
    """The teacher's weights as shipped, refused if they are not the bytes the driver hashed."""
    if blob is None:
        return None
    got = hashlib.sha256(blob).hexdigest()
    if sha256 is not None and got != sha256:
        raise TrialSetupError(f"node {node_label()}: teacher weights arrived with sha256 {got[:16]}, "
                              f"expected {sha256[:16]}")
    return blob


def train_trial(
    config: dict[str, Any], base: dict[str, Any], teacher: bytes | None, storage: Storage,
    teacher_sha256: str | None = None, cpus: float = 1.0, memory_fraction: float | None = None,
) -> None:
    torch.set_num_threads(max(1, int(cpus)))
    spec = trial_spec(base, config)
    weights = checked_teacher(teacher, teacher_sha256)
    try:
        engine = Engine(spec, seed=int(config.get("seed", 0)), teacher_checkpoint=weights,
                        memory_fraction=memory_fraction)
    except DatasetNotFound as exc:
        raise TrialSetupError(f"node {node_label()}: data.dataset: {exc}") from None
    files = storage.child(trial_key(int(config.get("trial_number", 0))))
    resume(engine, files)
    start_epoch = engine.epoch
    node = {"node_id": ray.get_runtime_context().get_node_id()}
    metrics = spec.metrics
    for past in engine.history:
        # The saved epochs again: any the driver had not recorded (it died, its disk was full)
        # are recorded now; the others are recorded once already and kept as they were.
        tune.report({**past, "start_epoch": start_epoch, **node})
    while not engine.finished:
        kept = engine.kept_row
        row = engine.run_epoch()
        row["start_epoch"] = start_epoch  # >0 proves a resumed trial did not restart at 0
        report = {**row, **scores(engine.kept_row, metrics)}
        engine.history.append(report)
        try:
            if engine.kept_row is not kept:  # this epoch's student is the one the trial keeps now
                files.write_bytes(STUDENT_FILE, _tensor_bytes(engine.best_student))
            files.write_bytes(STATE_FILE, engine.to_bytes())
        except OSError as exc:
            if disk_full(exc):
                raise TrialSetupError(f"node {node_label()}: no space left on device for {files.display}") from None
            raise
        tune.report({**report, **node})


def resume(engine: Engine, files: Storage) -> bool:
    """Load the trial's saved state if there is a readable one; otherwise it starts at 0."""
    blob = files.read_bytes(STATE_FILE)
    if blob is None:
        return False
    try:
        engine.from_bytes(blob)
        return True
    except (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError):  # cut short or garbage
        return False


def _tensor_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()
