"""The places where searchkd reaches past a library's public API, kept in this one file.

Optuna's public API hands out a writable `optuna.Trial` only from `study.ask()`. A resumed
search runs again trials a previous process asked (they are RUNNING in the journal), and must
report their intermediate values and set their attributes; the `Trial` is re-opened from the
storage's trial id, which `FrozenTrial` keeps in a private attribute. tests/test_compat.py runs
this against the installed Optuna, so an upgrade that changes it fails there first.
"""

from __future__ import annotations

import optuna


def open_trial(study: optuna.Study, number: int) -> optuna.Trial:
    """A writable handle on the study's trial `number` (RUNNING: asked, not yet told)."""
    return optuna.trial.Trial(study, study.trials[number]._trial_id)
