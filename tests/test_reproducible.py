"""A reproducible search decides by trial number, not by timing: ASHA's decisions
(OrderedRungs) and the sampler's proposals (samplers.propose) are the same whatever ran at
once, in whatever order the reports came, and after a rebuild from the recorded rows."""

from __future__ import annotations

import random
from types import SimpleNamespace

import optuna
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState, create_trial
from ray.tune.schedulers.async_hyperband import _Bracket

from searchkd.samplers import propose, seen_by
from searchkd.scheduler import OrderedRungs, rung_epochs
from searchkd.spec import Spec

MAX_T = 12
values_st = st.lists(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=MAX_T, max_size=MAX_T),
    min_size=1,
    max_size=8,
)


def sequential(values: list[list[float]], grace: int, rf: float, mode: str) -> dict[int, int]:
    """Each trial's last epoch when the trials run one after another in number order."""
    rungs, last = OrderedRungs(grace, MAX_T, rf, mode), {}
    for n, curve in enumerate(values):
        for epoch, v in enumerate(curve, start=1):
            rungs.report(n, epoch, v)
            rungs.resolve()
            if epoch >= MAX_T or rungs.decision(n, epoch):
                break
        rungs.end(n, epoch)
        last[n] = epoch
    return last


def concurrent(
    values: list[list[float]], grace: int, rf: float, slots: int, picks: list[int]
) -> tuple[dict[int, int], list[tuple[int, int, float]]]:
    """The same trials, `slots` at once (started in number order), advanced in the order
    `picks` says; a trial at a rung waits there for its decision. Returns each one's last
    epoch and the rows in the order they came. Fails if no running trial can go on."""
    rungs = OrderedRungs(grace, MAX_T, rf, "max")
    epoch = dict.fromkeys(range(len(values)), 0)
    running: list[int] = []
    queue = list(range(len(values)))
    last: dict[int, int] = {}
    rows: list[tuple[int, int, float]] = []
    step = 0
    while queue or running:
        while queue and len(running) < slots:
            running.append(queue.pop(0))
        free = [
            n
            for n in running
            if epoch[n] not in rungs.rungs or rungs.decision(n, epoch[n]) is False
        ]
        assert free, f"deadlock: {running} all wait at their rungs"
        n = free[picks[step % len(picks)] % len(free) if picks else 0]
        step += 1
        epoch[n] += 1
        v = values[n][epoch[n] - 1]
        rows.append((n, epoch[n], v))
        rungs.report(n, epoch[n], v)
        rungs.resolve()
        for m in list(running):  # a stop decided now ends its trial where it waits
            if epoch[m] >= MAX_T or rungs.decision(m, epoch[m]):
                running.remove(m)
                rungs.end(m, epoch[m])
                last[m] = epoch[m]
    return last, rows


@settings(max_examples=150, deadline=None)
@given(
    values=values_st,
    slots=st.integers(1, 4),
    picks=st.lists(st.integers(0, 7), max_size=60),
    rf=st.sampled_from([2.0, 3.0, 4.0]),
    grace=st.integers(1, 3),
)
def test_decisions_do_not_depend_on_what_ran_at_once_or_in_what_order(
    values, slots, picks, rf, grace
) -> None:
    last, _ = concurrent(values, grace, rf, slots, picks)
    assert last == sequential(values, grace, rf, "max")


@settings(max_examples=150, deadline=None)
@given(values=values_st, rf=st.sampled_from([2.0, 3.0, 4.0]), grace=st.integers(1, 3))
def test_one_after_another_they_are_rays_decisions(values, rf, grace) -> None:
    """Run in number order, the rule is Ray's ASHA (one bracket, integer rungs)."""
    theirs = _Bracket(grace, MAX_T, rf, 0)
    for n, curve in enumerate(values):
        for epoch, v in enumerate(curve, start=1):
            stop = (
                epoch >= MAX_T or theirs.on_result(SimpleNamespace(trial_id=n), epoch, v) == "STOP"
            )
            if stop:
                break
        assert sequential(values, grace, rf, "max")[n] == epoch


@settings(max_examples=100, deadline=None)
@given(
    values=values_st,
    picks=st.lists(st.integers(0, 7), max_size=60),
    cut=st.integers(0, 80),
    mode=st.sampled_from(["max", "min"]),
)
def test_a_rebuild_from_any_prefix_of_the_rows_takes_the_same_decisions(
    values, picks, cut, mode
) -> None:
    _, rows = concurrent(values, 1, 2.0, 2, picks)
    sign = 1.0 if mode == "max" else -1.0
    whole = OrderedRungs(1, MAX_T, 2.0, mode)
    for n, e, v in rows:
        whole.report(n, e, sign * v)
    whole.resolve()
    seen = rows[:cut]
    shuffled = random.Random(cut).sample(seen, len(seen))  # the order rows were read in: any
    rebuilt = OrderedRungs.rebuilt(
        1, MAX_T, 2.0, mode, [(n, e, sign * v) for n, e, v in shuffled], {}
    )
    for key, stop in rebuilt.decided.items():
        assert whole.decided[key] == stop
    for n, e, v in rows[cut:]:
        rebuilt.report(n, e, sign * v)
        rebuilt.report(n, e, sign * v)  # a trial that runs again re-reports: no news
    rebuilt.resolve()
    assert rebuilt.decided == whole.decided


def test_a_decision_waits_for_every_lower_trial_to_reach_the_rung_or_end() -> None:
    rungs = OrderedRungs(1, 8, 2.0, "max")
    assert rungs.rungs == [1, 2, 4]
    rungs.report(1, 1, 0.1)
    assert rungs.resolve() == [] and rungs.decision(1, 1) is None  # trial 0 is not there yet
    rungs.report(0, 1, 0.9)
    assert rungs.resolve() == [(0, 1, False), (1, 1, True)]  # 0 goes on, 1 is below 0's 0.9
    rungs.report(2, 1, 0.4)
    assert rungs.resolve() == [(2, 1, True)]  # below the median of 0.9 and 0.1
    rungs.report(3, 1, 0.95)
    rungs.report(3, 2, 0.95)
    assert rungs.resolve() == [(3, 1, False)]  # at 2 it waits for trial 0 (1, 2 have stopped)
    rungs.end(0, 1)  # trial 0 failed after epoch 1: it will never reach 2
    assert rungs.resolve() == [(3, 2, False)]


def test_rung_epochs_are_the_first_epochs_reaching_ashas_milestones() -> None:
    assert rung_epochs(3, 12, 3.0) == [3, 9]
    assert rung_epochs(1, 5, 2.0) == [1, 2, 4]
    assert rung_epochs(2, 12, 1.5) == [2, 3, 5, 7, 11]
    assert rung_epochs(4, 4, 2.0) == []


def test_the_sampler_sees_the_cohorts_up_to_lag_minus_one_before() -> None:
    assert [seen_by(n, 1) for n in range(4)] == [0, 1, 2, 3]  # one at a time: all before it
    assert [seen_by(n, 2) for n in range(4)] == [0, 0, 1, 2]
    assert [seen_by(s, 2, pack=4) for s in (0, 4, 8, 12)] == [0, 0, 4, 8]


def _spec(sampler: str) -> Spec:
    from conftest import tiny_space

    raw = tiny_space(search={**tiny_space()["search"], "num_samples": 12, "sampler": sampler})
    return Spec.model_validate(raw)


@settings(max_examples=25, deadline=None)
@given(
    sampler=st.sampled_from(["tpe", "random"]),
    seen=st.integers(0, 5),
    later=st.lists(st.floats(0, 1, allow_nan=False), min_size=3, max_size=3),
)
def test_a_proposal_depends_only_on_the_trials_it_sees(sampler, seen, later) -> None:
    """Trial n's values are the same whatever trials seen..n-1 did since they started:
    running, finished with any value, or failed."""
    spec = _spec(sampler)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    n = seen + 3
    rng = random.Random(seen)
    base = [
        create_trial(
            state=TrialState.COMPLETE,
            params={"x": rng.random()},
            distributions=dist,
            value=rng.random(),
        )
        for _ in range(seen)
    ]

    def ask(trial: optuna.Trial) -> dict:
        return {"x": trial.suggest_float("x", 0, 1)}

    def with_later(states: list[TrialState]) -> list:
        out = list(base)
        for i, state in enumerate(states):
            value = later[i] if state == TrialState.COMPLETE else None
            out.append(
                create_trial(state=state, params={"x": 0.1 * i}, distributions=dist, value=value)
            )
        for number, t in enumerate(out):
            t.number = number
        return out

    one = propose(spec, with_later([TrialState.RUNNING] * 3), n, seen, ask)
    two = propose(
        spec, with_later([TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]), n, seen, ask
    )
    assert one.params == two.params
    assert one.state == TrialState.RUNNING


def _searcher(tmp_path, pack: int, num_samples: int):
    from conftest import tiny_space

    from searchkd.search import SearchSpace, StudySearcher, create_study

    raw = tiny_space("blocks")
    raw["search"].update(num_samples=num_samples, pack=pack, max_concurrent=2)
    spec = Spec.model_validate(raw)
    params = {k: p.model_dump(by_alias=True, exclude_none=True) for k, p in spec.params.items()}
    owners = {"loss.tau": ["msd"], "loss.scales": ["msd"]}
    space = SearchSpace(params, spec.objectives, owners, spec.search.seed)
    tmp_path.mkdir(parents=True, exist_ok=True)
    study = create_study(tmp_path, spec)

    def searcher(rerun: list[int]) -> StudySearcher:
        return StudySearcher(tmp_path, spec, space, rerun, lag=2)

    return spec, study, searcher


def test_a_proposal_waits_for_the_trials_it_must_see(tmp_path) -> None:
    """Two at a time: trial 2 is proposed once trial 0 has ended, whatever trial 1 does."""
    _, study, searcher = _searcher(tmp_path, 1, 4)
    s = searcher([])
    assert [s.suggest(t)["trial_number"] for t in ("a", "b")] == [0, 1]
    assert s.suggest("c") is None  # trial 0 has not ended
    s.on_trial_complete("b", {"score": 0.5, "epoch": 2})
    assert s.suggest("c") is None  # trial 1's end is not what trial 2 waits for
    s.on_trial_complete("a", {"score": 0.9, "epoch": 2})
    assert s.suggest("c")["trial_number"] == 2
    assert study.trials[2].state == TrialState.RUNNING  # recorded before it runs


def test_a_resumed_cohort_is_its_block_again_with_its_data_order(tmp_path) -> None:
    """pack 4: the driver died having asked trials 0-5; 0 and 3 had ended. The resume runs
    [1, 2] with block 0's data seed, then [4, 5, 6, 7] with block 1's, 6 and 7 proposed as the
    uninterrupted search proposed them."""
    from searchkd.samplers import trial_seed
    from searchkd.search import cohorts_to_run

    spec, _, searcher = _searcher(tmp_path / "straight", 4, 8)
    straight = searcher([])
    cohorts = [straight.suggest("a"), straight.suggest("b")]
    assert [c["cohort"] for c in cohorts] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    seed = spec.search.seed
    assert [c["data_seed"] for c in cohorts] == [trial_seed(seed, 0), trial_seed(seed, 4)]

    spec, study, searcher = _searcher(tmp_path / "killed", 4, 8)
    killed = searcher([])
    killed.suggest("a")
    for n in (4, 5):  # asked, then the driver died before 6 and 7
        study.add_trial(propose(spec, study.trials, n, seen_by(4, 2, 4), killed.space))
    for n in (0, 3):
        killed.tell(n, {"score": 0.5, "epoch": 2})
    open_ = [t.number for t in study.trials if not t.state.is_finished()]
    assert open_ == [1, 2, 4, 5]
    assert cohorts_to_run(study, spec) == 2
    again = searcher(open_)
    one, two = again.suggest("c"), again.suggest("d")
    assert one["cohort"] == [1, 2] and one["data_seed"] == trial_seed(seed, 0)
    assert two["cohort"] == [4, 5, 6, 7] and two["data_seed"] == trial_seed(seed, 4)
    assert two["students"] == cohorts[1]["students"]
    assert again.suggest("e") == "FINISHED"
