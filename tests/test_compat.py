"""What searchkd needs from a library beyond its public API, run against the installed one."""

from __future__ import annotations

import optuna

from searchkd.compat import open_trial


def test_a_trial_asked_by_another_process_is_reopened(tmp_path) -> None:
    from optuna.storages.journal import JournalFileBackend

    def storage() -> optuna.storages.JournalStorage:
        return optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))

    first = optuna.create_study(study_name="s", storage=storage())
    asked = first.ask()
    asked.suggest_float("x", 0, 1)
    # A new process: only the journal is shared.
    study = optuna.load_study(study_name="s", storage=storage())
    trial = open_trial(study, asked.number)
    trial.report(0.25, 3)
    trial.set_user_attr("k", "v")
    study.tell(asked.number, 0.5)
    again = optuna.load_study(study_name="s", storage=storage()).trials[0]
    assert again.state == optuna.trial.TrialState.COMPLETE and again.value == 0.5
    assert again.intermediate_values == {3: 0.25} and again.user_attrs == {"k": "v"}
