"""What a trial reports each epoch, and how a trial's score is read and compared.

One leaf module, so that the space's validation, the trial, the driver's record, MLflow and the
report agree on the key set, on which trial is better, and on when a trial stopped early.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# The metrics a search may target: measured on the validation split (NaN without one), on the
# test split (never chosen on), on the training batches, and the student's size and speed.
VAL_METRICS = ("val_acc", "val_top5", "best_val_acc")
TEST_METRICS = ("test_acc", "test_acc_last")
REPORTED_METRICS = (
    *VAL_METRICS,
    *TEST_METRICS,
    "train_loss",
    "student_params",
    "objective_params",
    "student_macs",
    "images_per_second",
    "epoch_seconds",
)
# Bookkeeping beside them: `start_epoch` > 0 proves a resumed trial did not restart at 0; a
# packed trial's students add `data_seed` (the seed of the data order and augmentation their
# cohort shared) and `pack` (how many students that cohort had); in a reproducible search,
# `rung_wait_s` is how long the trial waited at its last rung for ASHA's decision before it
# trained this epoch (the cost of reproducibility, bench/RESULTS.md).
BOOKKEEPING = ("epoch", "lr", "start_epoch", "data_seed", "pack", "rung_wait_s")
# Prefixes of the other numbers kept: each loss term (`loss_kd`, ...) and the scores.
PREFIXES = ("loss_", "score")
# Text a row carries: where it ran.
TEXT_KEYS = ("node_id", "node_ip")


def is_logged(key: str) -> bool:
    """A number a trial reports that the search keeps: a metric, a loss term or a score."""
    return key in REPORTED_METRICS or key in BOOKKEEPING or key.startswith(PREFIXES)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def logged(result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a reported result that the search keeps."""
    return {k: float(v) for k, v in result.items() if is_number(v) and is_logged(k)}


def scores(kept_row: Mapping[str, float], metrics: Sequence[str]) -> dict[str, float]:
    """The trial's score: the search metric of the student it keeps (best on val, or the last
    without a val split), as of this epoch; `score_<metric>` for each metric of the search."""
    return {"score": kept_row[metrics[0]], **{f"score_{m}": kept_row[m] for m in metrics}}


def kept_name(metric: str) -> str:
    """What a trial's score on `metric` is called wherever it is shown (progress, summaries,
    MLflow): `best_val_acc` for `val_acc` (the kept student's, not an epoch's val_acc),
    `score_<metric>` (its row's column) for any other metric."""
    return "best_val_acc" if metric == "val_acc" else f"score_{metric}"


def stopped_early(epochs_run: int, epochs: int) -> bool:
    """A trial that ended before its last epoch was stopped by the scheduler."""
    return epochs_run < epochs


def finite(v: Any) -> bool:
    return is_number(v) and math.isfinite(v)


def trial_score(rows: Sequence[Mapping[str, Any]], metric: str, mode: str) -> float:
    """A trial's value on `metric`: the value of the student the trial keeps.

    `rows` are the trial's rows (any order). The trial records it as `score_<metric>` each
    epoch; rows written before that existed fall back to the last row's `best_val_acc` for
    `val_acc`, and to the best finite value over the rows in `mode` for any other metric.
    NaN when there is none.
    """
    if not rows:
        return math.nan
    last = max(rows, key=lambda r: r["epoch"])
    if finite(last.get(f"score_{metric}")):
        return float(last[f"score_{metric}"])
    if metric == "val_acc":
        if finite(last.get("best_val_acc")):
            return float(last["best_val_acc"])
        metric, mode = "val_acc", "max"
    values = [float(r[metric]) for r in rows if finite(r.get(metric))]
    if not values:
        return math.nan
    return max(values) if mode == "max" else min(values)


def rung_milestones(grace_period: int, max_t: int, reduction_factor: float) -> list[float]:
    """ASHA's milestones, ascending: grace · rf^k up to max_t (one bracket, as Ray's
    `_Bracket`)."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor**k for k in range(count)]


def rung_epochs(grace_period: int, max_t: int, reduction_factor: float) -> list[int]:
    """The epochs at which a trial of `max_t` epochs is judged: the first epoch that reaches
    each of ASHA's milestones, below max_t (a trial at max_t has finished). The scheduler
    decides there; the report draws them."""
    milestones = rung_milestones(grace_period, max_t, reduction_factor)
    return sorted({math.ceil(m - 1e-9) for m in milestones} - {max_t})


def better(a: float, b: float, mode: str) -> bool:
    """Whether score `a` beats `b` in `mode` (NaN never beats anything)."""
    if not math.isfinite(a):
        return False
    if not math.isfinite(b):
        return True
    return a > b if mode == "max" else a < b


def pick_best(
    scores: Mapping[int, float], mode: str, failed: set[int] | frozenset[int] = frozenset()
) -> int | None:
    """The best trial number: the best finite score in `mode` among trials that did not fail;
    ties go to the lowest trial number (never to test accuracy, which chooses nothing)."""
    best: int | None = None
    for number in sorted(scores):
        if number in failed:
            continue
        if better(scores[number], scores[best] if best is not None else math.nan, mode):
            best = number
    return best


def json_safe(value: Any) -> Any:
    """NaN and infinities as null, in nested dicts and lists: JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
