"""ASHA keyed by trial number, rebuilt from recorded rows: the same decisions as Ray's ASHA,
and the same decisions after a rebuild as without one."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st
from ray.tune.schedulers.async_hyperband import _Bracket

from searchkd.scheduler import Rungs

trials_st = st.lists(
    st.tuples(
        st.integers(1, 12), st.lists(st.floats(0, 1, allow_nan=False), min_size=12, max_size=12)
    ),
    min_size=1,
    max_size=8,
)


def _interleave(trials: list, order: list[int]) -> list[tuple[int, int, float]]:
    """Each trial reports epochs 1..its length in order; trials interleave as `order` says."""
    pending = {
        n: list(enumerate(vals[:length], start=1)) for n, (length, vals) in enumerate(trials)
    }
    out = []
    for pick in order:
        alive = [n for n in sorted(pending) if pending[n]]
        if not alive:
            break
        n = alive[pick % len(alive)]
        epoch, value = pending[n].pop(0)
        out.append((n, epoch, value))
    for n in sorted(pending):
        out += [(n, e, v) for e, v in pending[n]]
    return out


@settings(max_examples=200, deadline=None)
@given(
    trials=trials_st,
    order=st.lists(st.integers(0, 7), max_size=120),
    rf=st.sampled_from([2.0, 3.0, 4.0]),
    grace=st.integers(1, 3),
    mode=st.sampled_from(["max", "min"]),
)
def test_decisions_are_rays(trials, order, rf, grace, mode) -> None:
    max_t = 12
    ours, theirs = Rungs(grace, max_t, rf, mode), _Bracket(grace, max_t, rf, 0)
    sign = 1.0 if mode == "max" else -1.0
    stopped: set[int] = set()
    for n, epoch, value in _interleave(trials, order):
        if n in stopped:
            continue
        mine = ours.on_result(n, epoch, value)
        ray_stop = (
            epoch >= max_t
            or theirs.on_result(SimpleNamespace(trial_id=n), epoch, sign * value) == "STOP"
        )
        assert mine == ray_stop
        if mine:
            stopped.add(n)
    assert ours.milestones == [m for m, _ in theirs._rungs]


@settings(max_examples=100, deadline=None)
@given(trials=trials_st, order=st.lists(st.integers(0, 7), max_size=120), cut=st.integers(0, 60))
def test_a_rebuild_from_the_rows_decides_as_before(trials, order, cut) -> None:
    """Run until row `cut`, rebuild from the rows recorded so far, go on: the same decisions as
    an uninterrupted run, including a trial that re-reports the epoch it resumes from."""
    rows = _interleave(trials, order)
    whole, decisions = Rungs(1, 12, 2.0, "max"), []
    stopped: set[int] = set()
    for n, e, v in rows:
        if n not in stopped:
            stop = whole.on_result(n, e, v)
            decisions.append((n, e, stop))
            stopped |= {n} if stop else set()
    seen = [d for d in decisions][:cut]
    history, ended = [], {n for n, _, s in seen if s}
    for n, e, _ in seen:
        v = next(val for (m, ep, val) in rows if m == n and ep == e)
        last = n in ended and e == max(ep for m, ep, _ in seen if m == n)
        history.append((n, e, v, last))
    rebuilt = Rungs(1, 12, 2.0, "max")
    rebuilt.replay(history)
    again: list[tuple[int, int, bool]] = list(seen)
    stopped = set(ended)
    for n, e, v in rows:
        if n in stopped or (n, e) in {(a, b) for a, b, _ in seen}:
            if (n, e) in {(a, b) for a, b, _ in seen} and n not in stopped:
                assert not rebuilt.on_result(n, e, v)  # a re-report of a recorded epoch is no news
            continue
        stop = rebuilt.on_result(n, e, v)
        again.append((n, e, stop))
        stopped |= {n} if stop else set()
    assert again == decisions


def test_a_trial_stopped_before_its_driver_died_is_stopped_again() -> None:
    """Trial 1 falls below the rung-2 cutoff; the driver dies before Optuna hears it ended.
    Rebuilt from the rows, the re-run trial re-reports epoch 2 and is stopped there again."""
    rows = [(0, 1, 0.9), (0, 2, 0.9), (1, 1, 0.9), (1, 2, 0.1)]
    live = Rungs(1, 8, 2.0, "max")
    assert [live.on_result(*r) for r in rows] == [False, False, False, True]
    rebuilt = Rungs(1, 8, 2.0, "max")
    rebuilt.replay((n, e, v, False) for n, e, v in rows)  # trial 1 never ended in the study
    assert rebuilt.on_result(1, 2, 0.1)
    assert not rebuilt.on_result(0, 3, 0.9)
