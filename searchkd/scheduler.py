"""ASHA that a resumed search rebuilds, so that it stops the trials an uninterrupted one would.

Asynchronous successive halving (Li et al., "A System for Massively Parallel Hyperparameter
Tuning", MLSys 2020) keeps, for each rung (epochs grace · rf^k up to max_t), the value every
trial had when it first reached that rung; a trial reaching a rung is stopped when its value is
below the (1 − 1/rf) quantile of the values recorded there before it. The decisions therefore
depend on everything recorded so far, in order. Tune does not save its scheduler, so a restored
ASHA would start with empty rungs and judge resumed trials against nothing. Here the rungs are
keyed by Optuna trial number and rebuilt from the rows the search recorded (results.jsonl),
in the order they arrived; a trial that runs again re-reports epochs its rungs already hold,
which changes nothing. The rule and the quantile are Ray's ASHAScheduler's (one bracket).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .metrics import rung_epochs


class Rungs:
    """ASHA's bookkeeping for one bracket; values are signed so that larger is better."""

    def __init__(self, grace_period: int, max_t: int, reduction_factor: float, mode: str) -> None:
        self.max_t = max_t
        self.rf = reduction_factor
        self.sign = 1.0 if mode == "max" else -1.0
        self.milestones = rung_epochs(grace_period, max_t, reduction_factor)[::-1]
        self.recorded: dict[float, dict[int, float]] = {m: {} for m in self.milestones}
        # Trials stopped, and at which epoch: a trial stopped just before its driver died runs
        # again, re-reports that epoch, and is stopped there again.
        self.stopped_at: dict[int, float] = {}

    def cutoff(self, milestone: float) -> float | None:
        values = list(self.recorded[milestone].values())
        return float(np.nanpercentile(values, (1 - 1 / self.rf) * 100)) if values else None

    def record(self, number: int, epoch: float, value: float | None) -> bool:
        """Record `value` at the highest rung `epoch` reaches that does not hold this trial yet;
        True when it falls below that rung's cutoff (the trial stops)."""
        for milestone in self.milestones:
            recorded = self.recorded[milestone]
            if epoch < milestone or number in recorded:
                continue
            if value is None:
                return False
            cutoff = self.cutoff(milestone)
            signed = self.sign * value
            recorded[number] = signed
            return cutoff is not None and signed < cutoff
        return False

    def on_result(self, number: int, epoch: float, value: float | None) -> bool:
        """A reported epoch: True when the trial should stop (a trial at max_t always does)."""
        if epoch >= self.max_t or epoch >= self.stopped_at.get(number, float("inf")):
            return True
        stop = self.record(number, epoch, value)
        if stop:
            self.stopped_at[number] = epoch
        return stop

    def replay(self, rows: Iterable[tuple[int, float, float | None, bool]]) -> None:
        """Rebuild from recorded rows, in the order they arrived: (trial number, epoch, value,
        whether it was the trial's last row of a trial that has ended)."""
        for number, epoch, value, last_of_ended in rows:
            if epoch < self.max_t:
                self.on_result(number, epoch, value)
            if last_of_ended:
                self.record(number, epoch, value)  # as Tune tells a completing trial's last result


class ResumableASHA(FIFOScheduler):
    """Tune's scheduler face of `Rungs`: trials are known by their Optuna trial number."""

    def __init__(
        self,
        metric: str,
        mode: str,
        time_attr: str,
        grace_period: int,
        max_t: int,
        reduction_factor: float,
    ) -> None:
        super().__init__()
        self.set_search_properties(metric, mode)
        self.time_attr = time_attr
        self.rungs = Rungs(grace_period, max_t, reduction_factor, mode)
        self.stopped_early = 0

    def _value(self, result: dict[str, Any]) -> float | None:
        value = result.get(self.metric)
        return float(value) if isinstance(value, int | float) else None

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if self.time_attr not in result or self.metric not in result:
            return TrialScheduler.CONTINUE
        number = int(trial.config.get("trial_number", -1))
        stop = self.rungs.on_result(number, result[self.time_attr], self._value(result))
        if stop and result[self.time_attr] < self.rungs.max_t:
            self.stopped_early += 1
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if result and self.time_attr in result and self.metric in result:
            self.rungs.record(
                int(trial.config.get("trial_number", -1)),
                result[self.time_attr],
                self._value(result),
            )
