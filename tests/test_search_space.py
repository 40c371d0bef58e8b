"""The Optuna define-by-run space built from a spec's params."""

from __future__ import annotations

import pickle

import optuna
from conftest import tiny_space
from hypothesis import given, settings
from hypothesis import strategies as st

from searchkd.api import lookups
from searchkd.samplers import trial_seed
from searchkd.search import SearchSpace, tunable_owners
from searchkd.spec import Spec
from searchkd.trial import trial_spec


def space_of(raw: dict) -> SearchSpace:
    spec = Spec.model_validate(raw)
    params = {k: p.model_dump(by_alias=True, exclude_none=True) for k, p in spec.params.items()}
    return SearchSpace(
        params, spec.objectives, tunable_owners(spec, lookups()["objectives"]), seed=7
    )


def sample(space: SearchSpace, n: int = 12) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = space(trial)
        out.append({**trial.params, **constants})
        study.tell(trial, 0.5)
    return out


def test_samples_stay_in_range_and_lists_are_decoded() -> None:
    for cfg in sample(space_of(tiny_space())):
        assert cfg["student.width"] in (0.25, 0.5)
        assert 0.05 <= cfg["loss.tau"] <= 0.5
        assert cfg["loss.scales"] in ([1], [1, 2])


def test_trial_config_resolves_into_a_valid_spec() -> None:
    raw = tiny_space()
    for cfg in sample(space_of(raw), 4):
        spec = trial_spec(Spec.model_validate(raw).model_dump(mode="json", by_alias=True), cfg)
        assert spec.student.width == cfg["student.width"]
        assert spec.loss["scales"] == cfg["loss.scales"]


def test_conditional_space_samples_only_the_chosen_objectives_params() -> None:
    raw = tiny_space(objective={"choice": ["msd", "kd"]})
    raw["params"]["loss.kd_weight"] = {"float": [0.0, 1.0]}
    configs = sample(space_of(raw), 30)
    seen = {c["objective"] for c in configs}
    assert seen == {"msd", "kd"}
    for c in configs:
        if c["objective"] == "kd":
            assert "loss.tau" not in c and "loss.scales" not in c
        else:
            assert "loss.tau" in c and "loss.scales" in c
        assert "loss.kd_weight" in c  # both declare it


def test_trial_seeds_are_derived_and_distinct() -> None:
    configs = sample(space_of(tiny_space()), 5)
    seeds = [c["seed"] for c in configs]
    assert len(set(seeds)) == 5
    assert seeds == [trial_seed(7, n) for n in range(5)]
    assert trial_seed(7, 0) != trial_seed(8, 0)


def test_space_pickles_for_tuner_restore() -> None:
    space = space_of(tiny_space())
    again = pickle.loads(pickle.dumps(space))
    assert again.params == space.params and again.objectives == space.objectives


@settings(max_examples=40, deadline=None)
@given(
    low=st.floats(1e-4, 10.0),
    span=st.floats(0.0, 100.0),
    log=st.booleans(),
    ilow=st.integers(-50, 50),
    ispan=st.integers(0, 50),
)
def test_any_valid_range_samples_inside_it(
    low: float, span: float, log: bool, ilow: int, ispan: int
) -> None:
    raw = tiny_space()
    raw["params"] = {
        "loss.tau": {"float": [low, low + span], "log": log},
        "train.epochs": {"int": [max(1, ilow), max(1, ilow) + ispan]},
    }
    spec = Spec.model_validate(raw)
    for cfg in sample(space_of(raw), 3):
        assert low <= cfg["loss.tau"] <= low + span
        assert max(1, ilow) <= cfg["train.epochs"] <= max(1, ilow) + ispan
        resolved = spec.resolved({"train.epochs": cfg["train.epochs"]})
        assert resolved.train.epochs == cfg["train.epochs"]


def test_a_search_over_weight_leaves_kd_trials_their_kd_term() -> None:
    """`loss.weight` searched across {kd, msd}: only msd owns it, so a kd trial trains with
    its real KD term (it used to receive a weight that replaced KD by weight · 0)."""
    import torch

    from searchkd.models import build_model
    from searchkd.objectives import ObjectiveContext, get_objective, kd_loss

    raw = tiny_space(objective={"choice": ["kd", "msd"]})
    raw["params"] = {"loss.weight": {"float": [0.1, 10.0], "log": True}}
    configs = sample(space_of(raw), 12)
    kd_configs = [c for c in configs if c["objective"] == "kd"]
    assert kd_configs and all("loss.weight" not in c for c in kd_configs)
    assert all("loss.weight" in c for c in configs if c["objective"] == "msd")
    base = Spec.model_validate(raw).model_dump(mode="json", by_alias=True)
    spec = trial_spec(base, kd_configs[0])
    torch.manual_seed(0)
    student = build_model("resnet8", 10, width=0.25, in_channels=1, image_size=8).eval()
    teacher = build_model("resnet8", 10, width=0.5, in_channels=1, image_size=8).eval()
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    cls = get_objective(spec.objective)
    obj = cls(
        cls.resolve(spec.loss),
        teacher.forward_features(x),
        student.forward_features(x),
        ObjectiveContext(10, 4),
    )
    _, terms = obj(student, teacher, x, y, None)
    expected = 0.9 * kd_loss(student(x), teacher(x), 4.0)
    assert terms["kd"].item() == expected.item() > 0


def test_a_journal_torn_mid_record_is_cut_back_to_its_last_whole_record(tmp_path) -> None:
    """A kill mid-append leaves a partial line; Optuna would append after it and never read
    the study again (it fails on the next ask). Cut back, the study is whole and usable."""
    from searchkd.record import JOURNAL_FILE
    from searchkd.search import journal_storage, load_study, repair_journal

    study = optuna.create_study(study_name="s", storage=journal_storage(tmp_path))
    for i in range(3):
        t = study.ask()
        t.suggest_float("x", 0, 1)
        study.tell(t, float(i))
    whole = (tmp_path / JOURNAL_FILE).read_bytes()
    assert repair_journal(tmp_path) == 0
    with (tmp_path / JOURNAL_FILE).open("ab") as f:
        f.write(b'{"op_code": 4, "worker_id": "ab')
    assert repair_journal(tmp_path) == len(b'{"op_code": 4, "worker_id": "ab')
    assert (tmp_path / JOURNAL_FILE).read_bytes() == whole
    again = load_study(tmp_path, "s")
    assert [t.value for t in again.trials] == [0.0, 1.0, 2.0]
    again.tell(again.ask(), 3.0)
    assert len(load_study(tmp_path, "s").trials) == 4


def test_memory_caps_how_many_trials_run_at_once(monkeypatch) -> None:
    """`resources: {cpu: 0.02}` on 2 cores fits 100 trials by CPU; each trial's process holds
    about half a GiB, so Ray's memory caps them, with one line saying so."""
    from searchkd import driver
    from searchkd.api import load_space
    from searchkd.engine import TRIAL_PROCESS_BYTES, DataShape, trial_memory

    raw = tiny_space("many")
    raw["search"].update(num_samples=50, max_concurrent=0, resources={"cpu": 0.02, "gpu": 0})
    spec = load_space(raw)
    per_trial = trial_memory(spec, DataShape.of(spec))
    assert per_trial > TRIAL_PROCESS_BYTES
    lines: list[str] = []
    monkeypatch.setattr(driver.ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 4 * 2**30})
    held = driver.concurrency(spec, log=lines.append)
    assert held == (4 * 2**30) // per_trial < 50
    assert len(lines) == 1 and lines[0].startswith(
        f"searchkd: running {held} trials at once, not 50"
    )
    lines.clear()  # plenty of memory: the resources decide, nothing said
    monkeypatch.setattr(driver.ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 2**40})
    assert driver.concurrency(spec, log=lines.append) == 50 and not lines


def test_the_study_names_its_metrics_and_says_which_trials_asha_stopped(tmp_path) -> None:
    """optuna-dashboard shows the study's metric names (not "Objective 0"); a trial ASHA
    stopped stays COMPLETE (what TPE sees) but carries why it is short as a user attr."""
    from searchkd.search import SearchSpace, StudySearcher, create_study, load_study

    spec = Spec.model_validate(tiny_space(train={"epochs": 4}))
    study = create_study(tmp_path, spec)
    assert study.metric_names == ["val_acc"]
    for _ in range(2):
        study.ask()
    teller = StudySearcher(tmp_path, spec, SearchSpace({}, spec.objectives, {}, 0), [])
    teller.tell(0, {"score": 0.9, "epoch": 4})
    teller.tell(1, {"score": 0.5, "epoch": 2})
    done, stopped = load_study(tmp_path, spec.name).trials
    assert stopped.state == done.state == optuna.trial.TrialState.COMPLETE
    assert stopped.user_attrs["searchkd"] == "stopped by ASHA at epoch 2"
    assert stopped.user_attrs["stopped_early"] and not done.user_attrs["stopped_early"]
    assert "searchkd" not in done.user_attrs
    assert load_study(tmp_path, spec.name).metric_names == ["val_acc"]


def test_progress_names_the_epochs_val_acc_and_the_kept_students_apart() -> None:
    """One name per meaning (`metrics.kept_name`): `val_acc` is the epoch's, `best_val_acc` the
    kept student's (the score, what the summary, the report and MLflow rank by)."""
    from types import SimpleNamespace

    from searchkd.search import Progress

    lines: list[str] = []
    progress = Progress("val_acc", "max", 8, 12, log=lines.append)
    trial = SimpleNamespace(config={"trial_number": 7}, status="TERMINATED")
    last = {"epoch": 12, "val_acc": 0.9815, "best_val_acc": 0.9954, "score": 0.9954}
    progress.on_trial_result(trial, last, [trial])
    progress.on_trial_complete(SimpleNamespace(**vars(trial), last_result=last), [trial])
    text, right = lines[-1].split("] ", 1)[1].split(" | ")[0], lines[-1].split(" | ")[-1]
    assert text.rstrip() == "trial 7 finished at epoch 12: val_acc 0.9815, best_val_acc 0.9954"
    assert right == "best trial 7: best_val_acc 0.9954"
    stopped = {"epoch": 3, "val_acc": 0.8241, "score": 0.8300}
    progress.on_student_end(2, "stopped", stopped, [trial])
    assert "trial 2 stopped by ASHA at epoch 3: val_acc 0.8241, best_val_acc 0.8300" in lines[-1]
    other = Progress("val_top5", "max", 8, 12, log=lines.append)
    other.on_student_end(1, "finished", {"epoch": 12, "val_top5": 0.9, "score": 0.95}, [])
    assert "val_top5 0.9000, score_val_top5 0.9500" in lines[-1]
