"""The Optuna samplers a space may name in `search.sampler`, registered like every other part.

Each builder gets the space and the seed of the trial it will propose: a trial's values depend
only on the study as it stands and its own number, not on how many processes the search took
(a resumed search proposes what an uninterrupted one would).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState, create_trial

from .registry import Registry
from .spec import Spec

SamplerBuilder = Callable[[Spec, int], optuna.samplers.BaseSampler]
SAMPLERS: Registry[SamplerBuilder] = Registry("sampler")


def trial_seed(search_seed: int, trial_number: int) -> int:
    """A per-trial seed derived from the search seed and the trial number (stable, recorded)."""
    digest = hashlib.sha256(f"{search_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def make_sampler(spec: Spec, number: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler that proposes trial `number`."""
    return SAMPLERS.get(spec.search.sampler)(spec, trial_seed(spec.search.seed, number))


def seen_by(start: int, lag: int, pack: int = 1) -> int:
    """How many trials (0..N-1) a reproducible search's sampler sees finished when it proposes
    the cohort of `pack` students that starts at trial `start`, with `lag` cohorts at once:
    every trial of the cohorts up to the one `lag` − 1 before it (one at a time: all before it).
    In an ideal schedule, where trials end in number order, they have all ended by then."""
    return max(0, start - (lag - 1) * pack)


def view_of(
    spec: Spec, trials: list[FrozenTrial], number: int, seen: int, failed: Collection[int] = ()
) -> optuna.Study:
    """An in-memory study holding trials 0..number-1 as the sampler of trial `number` sees them:
    the first `seen` as they ended (those that failed in this run as FAIL), the others as
    running with their values only (what `constant_liar` needs), whatever they did since. With
    the sampler seeded by the trial number, the proposal is a function of the search seed, the
    space and the results of exactly those `seen` trials."""
    directions = ["maximize" if m == "max" else "minimize" for m in spec.modes]
    view = optuna.create_study(directions=directions, sampler=make_sampler(spec, number))
    for t in trials[:number]:
        state = t.state if t.number < seen else TrialState.RUNNING
        if t.number < seen and not t.state.is_finished():
            if t.number not in failed:
                raise ValueError(f"trial {t.number} has not ended: the sampler cannot see it")
            state = TrialState.FAIL
        finished = state.is_finished()
        view.add_trial(
            create_trial(
                state=state,
                values=t.values if state == TrialState.COMPLETE else None,
                params=t.params,
                distributions=t.distributions,
                user_attrs=t.user_attrs if finished else {},
                system_attrs=t.system_attrs,
                intermediate_values=t.intermediate_values if finished else {},
            )
        )
    return view


def propose(
    spec: Spec,
    trials: list[FrozenTrial],
    number: int,
    seen: int,
    ask: Callable[[optuna.Trial], dict[str, Any]],
    failed: Collection[int] = (),
) -> FrozenTrial:
    """Trial `number` as a reproducible search proposes it (`view_of`); `ask` suggests the
    values. Returns the trial to record in the search's study (RUNNING)."""
    view = view_of(spec, trials, number, seen, failed)
    ask(view.ask())
    asked = view.trials[number]
    return create_trial(
        state=TrialState.RUNNING,
        params=asked.params,
        distributions=asked.distributions,
        user_attrs=asked.user_attrs,
        system_attrs=asked.system_attrs,
    )


@SAMPLERS.register("tpe")
def tpe(spec: Spec, seed: int) -> optuna.samplers.BaseSampler:
    # A quarter of the budget (2 to 10 trials) random first; multivariate+group handle the
    # conditional (per-objective) parameters; constant_liar keeps concurrent trials apart.
    startup = max(2, min(10, spec.search.num_samples // 4))
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup, multivariate=True, group=True, constant_liar=True
    )


@SAMPLERS.register("random")
def random(spec: Spec, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


@SAMPLERS.register("nsga2")
def nsga2(spec: Spec, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed)


@SAMPLERS.register("gp")
def gp(spec: Spec, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=seed)
