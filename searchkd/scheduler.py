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

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .metrics import rung_epochs, rung_milestones


class Rungs:
    """ASHA's bookkeeping for one bracket; values are signed so that larger is better."""

    def __init__(self, grace_period: int, max_t: int, reduction_factor: float, mode: str) -> None:
        self.max_t = max_t
        self.rf = reduction_factor
        self.sign = 1.0 if mode == "max" else -1.0
        self.milestones = rung_milestones(grace_period, max_t, reduction_factor)[::-1]
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
    """Tune's scheduler face of `Rungs`: trials are known by their Optuna trial number.

    With `ordered` (a reproducible search) the decisions are `OrderedRungs`': a trial at a rung
    waits (in its own loop) until its decision is taken, and each decision is sent to its trial
    through `deliver` (its decision file in the storage) when it is taken, whichever trial's
    report or end made it possible.
    """

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
        self.ordered: OrderedRungs | None = None
        self.deliver: Callable[[int, int, bool], None] | None = None

    def _value(self, result: dict[str, Any]) -> float | None:
        value = result.get(self.metric)
        return float(value) if isinstance(value, int | float) else None

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if self.time_attr not in result or self.metric not in result:
            return TrialScheduler.CONTINUE
        number = int(trial.config.get("trial_number", -1))
        if self.ordered is not None:
            return self._ordered_result(number, int(result[self.time_attr]), result)
        stop = self.rungs.on_result(number, result[self.time_attr], self._value(result))
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE

    def _send(self, number: int, epoch: int, stop: bool) -> None:
        if self.deliver is not None:
            self.deliver(number, epoch, stop)

    def _ordered_result(self, number: int, epoch: int, result: dict) -> str:
        assert self.ordered is not None
        self.ordered.report(number, epoch, self._value(result))
        for other, at, stop in self.ordered.resolve():
            if (other, at) != (number, epoch):
                self._send(other, at, stop)  # it waits at that rung: this frees it
        if epoch >= self.ordered.max_t:
            self.ordered.end(number, epoch)
            return TrialScheduler.STOP
        stop = self.ordered.decision(number, epoch)
        if stop is None:  # not a rung, or not decided yet (the trial waits at the rung)
            return TrialScheduler.CONTINUE
        self._send(number, epoch, stop)  # again after a resume: the file may predate it
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE

    def _ordered_end(self, trial: Any) -> None:
        assert self.ordered is not None
        epoch = int((trial.last_result or {}).get(self.time_attr, 0) or 0)
        self.ordered.end(int(trial.config.get("trial_number", -1)), epoch)
        for number, at, stop in self.ordered.resolve():
            self._send(number, at, stop)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        # Tune says so for a trial it retries too: only a trial that stays failed has ended.
        if self.ordered is not None and not trial.should_recover():
            self._ordered_end(trial)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if self.ordered is not None:
            self._ordered_end(trial)
            return
        if result and self.time_attr in result and self.metric in result:
            self.rungs.record(
                int(trial.config.get("trial_number", -1)),
                result[self.time_attr],
                self._value(result),
            )


class OrderedRungs:
    """ASHA decided by trial number, not by timing: a reproducible search's stopping rule.

    Trial n at rung epoch e is stopped when its value there falls below the (1 − 1/rf) quantile
    of the values at e of exactly the lower-numbered trials that reached e (Ray's rule, with the
    trials taken in number order, as if they had run one after another). The decision waits
    until every lower-numbered trial has reached e or ended before it, so it is the same
    whatever ran at once, however loaded the machine, and rebuilt from the recorded rows after
    a kill. The lowest-numbered unfinished trial never waits: every trial below it has ended.
    """

    def __init__(self, grace_period: int, max_t: int, reduction_factor: float, mode: str) -> None:
        self.max_t, self.rf = max_t, reduction_factor
        self.sign = 1.0 if mode == "max" else -1.0
        self.rungs = rung_epochs(grace_period, max_t, reduction_factor)
        self.values: dict[int, dict[int, float]] = {e: {} for e in self.rungs}
        self.ended: dict[int, int] = {}  # trial -> the last epoch it reported before it ended
        self.stopped_at: dict[int, int] = {}
        self.decided: dict[tuple[int, int], bool] = {}  # (trial, rung epoch) -> stop
        self.waiting: set[tuple[int, int]] = set()

    def report(self, number: int, epoch: int, value: float | None) -> None:
        """A reported epoch (the first report of a (trial, epoch) stands: re-reports are news
        to no one)."""
        epoch = int(epoch)
        if epoch not in self.values or number in self.values[epoch]:
            return
        self.values[epoch][number] = math.nan if value is None else self.sign * float(value)
        self.waiting.add((number, epoch))

    def end(self, number: int, last_epoch: int) -> None:
        """Trial `number` ended (finished, failed or stopped) after `last_epoch`."""
        self.ended.setdefault(number, int(last_epoch))

    def _gone_before(self, number: int, epoch: int) -> bool | None:
        """Whether trial `number` ended before reaching `epoch`; None while that is unknown."""
        if number in self.values[epoch]:
            return False
        # Stopped before, or ended (a trial ended past e with no row at e has none to compare).
        return True if number in self.stopped_at or number in self.ended else None

    def _decide(self, number: int, epoch: int) -> bool | None:
        below: list[float] = []
        for m in range(number):
            gone = self._gone_before(m, epoch)
            if gone is None:
                return None
            if not gone:
                below.append(self.values[epoch][m])
        if not below or all(math.isnan(v) for v in below):
            return False
        cutoff = float(np.nanpercentile(below, (1 - 1 / self.rf) * 100))
        return bool(self.values[epoch][number] < cutoff)

    def resolve(self) -> list[tuple[int, int, bool]]:
        """The decisions that can be taken now, each once: (trial, rung epoch, stop)."""
        out = []
        for number, epoch in sorted(self.waiting):  # lower trials first: others wait on them
            stop = self._decide(number, epoch)
            if stop is None:
                continue
            self.waiting.discard((number, epoch))
            self.decided[(number, epoch)] = stop
            if stop:
                self.stopped_at.setdefault(number, epoch)
            out.append((number, epoch, stop))
        return out

    def decision(self, number: int, epoch: int) -> bool | None:
        """The decision for trial `number` at rung epoch `epoch`: stop, go on, or None (not
        yet taken)."""
        return self.decided.get((number, int(epoch)))

    @classmethod
    def rebuilt(
        cls,
        grace_period: int,
        max_t: int,
        reduction_factor: float,
        mode: str,
        rows: Iterable[tuple[int, int, float | None]],
        ended: dict[int, int],
    ) -> OrderedRungs:
        """From the recorded rows (any order) and the trials that ended: the same decisions."""
        rungs = cls(grace_period, max_t, reduction_factor, mode)
        for number, epoch, value in rows:
            rungs.report(number, epoch, value)
        for number, last in ended.items():
            rungs.end(number, last)
        rungs.resolve()
        return rungs
