"""The Optuna samplers a space may name in `search.sampler`, registered like every other part.

Each builder gets the space and the seed of the trial it will propose: a trial's values depend
only on the study as it stands and its own number, not on how many processes the search took
(a resumed search proposes what an uninterrupted one would).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import optuna

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
