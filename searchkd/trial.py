"""One Ray Tune trial: a thin adapter that drives the engine epoch by epoch.

Each epoch it reports one metrics row with a checkpoint (engine state + best student), so
ASHA can stop it at any epoch boundary and a resumed trial continues from its last epoch.
MLflow is not touched here: the driver logs (see tracking.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from .engine import Engine
from .objectives import get_objective
from .spec import Spec

ENGINE_FILE = "engine.pt"
STUDENT_FILE = "student_best.pt"
# Keys the search adds to a trial's config beside the sampled dotted parameters.
META_KEYS = ("trial_number", "seed")


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


def train_trial(
    config: dict[str, Any], base: dict[str, Any], teacher: str | None, cpus: float = 1.0,
    memory_fraction: float | None = None,
) -> None:
    torch.set_num_threads(max(1, int(cpus)))
    spec = trial_spec(base, config)
    engine = Engine(spec, seed=int(config.get("seed", 0)), teacher_checkpoint=teacher,
                    memory_fraction=memory_fraction)
    checkpoint = tune.get_checkpoint()
    if not load_checkpoint(engine, checkpoint):
        trial_dir = Path(checkpoint.path).parent if checkpoint else Path(tune.get_context().get_trial_dir())
        load_newest_local(engine, trial_dir)
    start_epoch = engine.epoch
    if engine.last_row:
        # The checkpoint's own epoch again, without a new checkpoint: if the driver died before
        # it recorded that epoch, it is recorded now; if not, the callbacks keep one copy.
        tune.report({**engine.last_row, "start_epoch": start_epoch})
    while not engine.finished:
        row = engine.run_epoch()
        row["start_epoch"] = start_epoch  # >0 proves a resumed trial did not restart at 0
        with tempfile.TemporaryDirectory(prefix="searchkd-ckpt-") as d:
            engine.save(os.path.join(d, ENGINE_FILE))
            torch.save(engine.best_student, os.path.join(d, STUDENT_FILE))
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(d))


def load_checkpoint(engine: Engine, checkpoint: tune.Checkpoint | None) -> bool:
    """Resume from the checkpoint Tune restored the trial with, if it is still there."""
    if checkpoint is None:
        return False
    try:
        with checkpoint.as_directory() as d:
            engine.load(Path(d) / ENGINE_FILE)
            return True
    except (OSError, RuntimeError, EOFError, KeyError):  # gone, or cut short by a kill
        return False


def load_newest_local(engine: Engine, trial_dir: Path) -> None:
    """Resume from the newest readable checkpoint left in the trial's directory.

    Tune keeps one checkpoint and snapshots its own state every ~10 s: a driver killed in
    between restores a trial pointing at a checkpoint already replaced (or at none yet),
    while a newer one lies in the trial directory. A half-copied newest one is skipped.
    """
    for path in sorted(trial_dir.glob(f"checkpoint_*/{ENGINE_FILE}"), reverse=True):
        try:
            engine.load(path)
            return
        except (OSError, RuntimeError, EOFError, KeyError):
            continue
