"""One Ray Tune trial: a thin adapter that drives the engine epoch by epoch.

The trial owns its files. Each epoch it writes its engine state (`state.pt`) and, when val
improves, its best student (`student_best.pt`) to the search's storage under its own key
(`trial-0003/`), and reports one metrics row to Tune without a Tune checkpoint. When Tune
restarts it (a resumed search, a retry after its node died) it finds its state there, on
whichever node it now runs, and goes on from that epoch. Nothing depends on Tune's snapshot
of which checkpoint it last saw. The teacher arrives as bytes through Ray's object store,
checked against its digest, so no node needs the driver's disk. MLflow is not touched here:
the driver logs (see tracking.py).

A packed trial (`search.pack` > 1, config `students`) trains a cohort of students over one
teacher forward per batch (engine.Cohort); each student still has its own trial number, rows,
files and end, and the driver stops it early through its stop file (search.PackedStops).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import time
from typing import Any

import ray
import torch
from ray import tune

from .data import DatasetNotFound
from .engine import Cohort, estimate_pack_bytes, pack_memory_problem
from .metrics import scores
from .objectives import get_objective
from .spec import Spec, students_of
from .storage import STATE_FILE, STUDENT_FILE, Storage, disk_full, read_decision, trial_key

# Keys the search adds to a trial's config beside the sampled dotted parameters.
META_KEYS = ("trial_number", "seed")
# In a packed student's re-reported last row: the driver had stopped it (its STOP_FILE).
STOPPED_KEY = "stopped_by_driver"
__all__ = ["students_of", "train_trial"]


class TrialSetupError(RuntimeError):
    """A trial that cannot start on its node (data missing, teacher corrupted): one line."""


def trial_spec(base: dict[str, Any], config: dict[str, Any]) -> Spec:
    """The base spec with this trial's sampled values written in.

    With a choice of objectives, fixed `loss:` keys may belong to only some of them; a trial
    keeps those its own objective declares.
    """
    sampled = {k: v for k, v in config.items() if k not in META_KEYS}
    spec = Spec.model_validate(base).resolved(sampled)
    own = get_objective(spec.objective).own_loss(spec.loss)
    if own != spec.loss:
        raw = spec.model_dump(by_alias=True, exclude_none=True)
        raw["loss"] = own
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
        raise TrialSetupError(
            f"node {node_label()}: teacher weights arrived with sha256 {got[:16]}, "
            f"expected {sha256[:16]}"
        )
    return blob


def stop_epoch(files: Storage) -> int | None:
    """The epoch at which the driver stopped this student (its STOP_FILE), or None."""
    return read_decision(files)[0]


# How often a trial waiting at a rung reads its decision file (seconds, growing to the last).
DECISION_POLL_S = (0.05, 0.1, 0.2, 0.5)


def wait_at_rungs(cohort: Cohort, files: list[Storage], rungs: list[int]) -> float:
    """In a reproducible search, each student at a rung epoch waits for the driver's decision
    there before it trains on (its rows and kept student must be those of a trial stopped
    there, should it be). The driver decides once the lower-numbered trials have reached the
    rung or ended; the lowest-numbered one never waits on a running trial. Returns the
    seconds it waited."""
    start = time.monotonic()
    for i, m in enumerate(cohort.members):
        polls = 0
        while m.active and m.epoch in rungs:
            stop, passed = read_decision(files[i])
            if (stop is not None and stop <= m.epoch) or passed >= m.epoch:
                break
            time.sleep(DECISION_POLL_S[min(polls, len(DECISION_POLL_S) - 1)])
            polls += 1
    return time.monotonic() - start


def train_trial(
    config: dict[str, Any],
    base: dict[str, Any],
    teacher: bytes | None,
    storage: Storage,
    teacher_sha256: str | None = None,
    cpus: float = 1.0,
    memory_fraction: float | None = None,
    rungs: list[int] | None = None,
) -> None:
    """One Tune trial: one student, or (`students` in the config) a packed cohort of several.

    Each student reports its own rows (with its `trial_number`) and keeps its own files under
    its own trial number. A packed student the driver stops early (it writes the student's
    STOP_FILE while it handles the report: Tune's reports are synchronous) leaves the cohort;
    the trial ends when every student has finished or stopped. With `rungs` (a reproducible
    search with ASHA) each student waits at those epochs for the driver's decision, packed or
    not, and leaves when it says stop.
    """
    torch.set_num_threads(max(1, int(cpus)))
    packed = "students" in config
    configs = list(students_of(config).items())
    specs = [trial_spec(base, c) for _, c in configs]
    weights = checked_teacher(teacher, teacher_sha256)
    try:
        cohort = Cohort(
            specs,
            [int(c.get("seed", 0)) for _, c in configs],
            teacher_checkpoint=weights,
            memory_fraction=memory_fraction,
            data_seed=config.get("data_seed"),
        )
    except DatasetNotFound as exc:
        raise TrialSetupError(f"node {node_label()}: data.dataset: {exc}") from None
    if packed:
        check_memory(cohort, memory_fraction)
    files = [storage.child(trial_key(number)) for number, _ in configs]
    for i, f in enumerate(files):
        resume_member(cohort, i, f)
    start_epoch = [m.epoch for m in cohort.members]
    extra = [
        {"trial_number": number, "data_seed": cohort.data_seed, "pack": len(configs)}
        if packed
        else {}
        for number, _ in configs
    ]
    node = {"node_id": ray.get_runtime_context().get_node_id()}
    metrics = specs[0].metrics
    decided = packed or bool(rungs)  # the driver's decisions come through the storage
    if decided:
        _leave_if_stopped(cohort, files)
    for i, m in enumerate(cohort.members):
        for j, past in enumerate(m.history):
            # The saved epochs again: any the driver had not recorded (it died, its disk was full)
            # are recorded now; the others are recorded once already and kept as they were. A
            # student the driver stopped says so with its last row, so the driver ends it even
            # if it died between writing the stop file and telling the study.
            said = {STOPPED_KEY: 1} if m.stopped and j == len(m.history) - 1 else {}
            tune.report({**past, "start_epoch": start_epoch[i], **node, **said})
    waited = 0.0  # at the last rung, before the epoch that follows (reported with it)
    if rungs:
        waited = wait_at_rungs(cohort, files, rungs)
        _leave_if_stopped(cohort, files)
    while not cohort.finished:
        kept = [m.kept_row for m in cohort.members]
        rows = cohort.run_epochs()
        reports = {}
        for i, row in rows.items():
            m = cohort.members[i]
            row["start_epoch"] = start_epoch[i]  # >0 proves a resumed trial did not restart at 0
            if rungs:
                row["rung_wait_s"] = waited
            report = {**row, **scores(m.kept_row, metrics), **extra[i]}
            m.history.append(report)
            try:
                if m.kept_row is not kept[i]:  # this epoch's student is the one it keeps now
                    files[i].write_bytes(STUDENT_FILE, _tensor_bytes(m.best_student))
                files[i].write_bytes(STATE_FILE, cohort.member_bytes(i))
            except OSError as exc:
                if disk_full(exc):
                    raise TrialSetupError(
                        f"node {node_label()}: no space left on device for {files[i].display}"
                    ) from None
                raise
            reports[i] = report
        for report in reports.values():
            tune.report({**report, **node})
        if rungs:
            waited = wait_at_rungs(cohort, files, rungs)
        if decided:
            _leave_if_stopped(cohort, files)


def _leave_if_stopped(cohort: Cohort, files: list[Storage]) -> None:
    """Students the driver stopped early leave the cohort (read from their STOP_FILEs)."""
    for i, m in enumerate(cohort.members):
        if m.active:
            at = stop_epoch(files[i])
            if at is not None and at <= m.epoch:
                cohort.stop(i)


def check_memory(cohort: Cohort, memory_fraction: float | None) -> None:
    """A cohort whose estimated memory exceeds its GPU share fails at once, in one line (on
    a CPU there is nothing to refuse)."""
    if cohort.device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(cohort.device).total_memory
    problem = pack_memory_problem(
        estimate_pack_bytes(cohort), len(cohort.members), total, memory_fraction
    )
    if problem:
        raise TrialSetupError(f"node {node_label()}: {problem}")


def resume_member(cohort: Cohort, i: int, files: Storage) -> bool:
    """Load student i's saved state if there is a readable one; otherwise it starts at 0."""
    blob = files.read_bytes(STATE_FILE)
    if blob is None:
        return False
    try:
        cohort.load_member_bytes(i, blob)
        return True
    except (
        RuntimeError,
        EOFError,
        KeyError,
        ValueError,
        pickle.UnpicklingError,
    ):  # cut short or garbage
        return False


def _tensor_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()
