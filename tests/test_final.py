"""`searchkd final`: the statistics on known values, which configs it retrains, and one real
final stage after a tiny digits search (marked integration: it starts Ray)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import tiny_space, tune_command, write_space
from searchgen import make_search

from searchkd import final as fs
from searchkd import report as rp
from searchkd.cli import main
from searchkd.metrics import json_safe
from searchkd.objectives import get_objective
from searchkd.spec import Spec

T_975_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (tables)


# -- statistics ---------------------------------------------------------------------------------
def test_mean_and_sample_std() -> None:
    mean, std = fs.mean_std([0.90, 0.92, 0.94])
    assert mean == pytest.approx(0.92) and std == pytest.approx(0.02)
    assert fs.mean_std([0.5]) == (0.5, pytest.approx(math.nan, nan_ok=True))
    assert all(math.isnan(v) for v in fs.mean_std([]))


def test_t_quantiles_match_the_tables() -> None:
    assert fs.t_quantile(0.975, 2) == pytest.approx(T_975_2)
    assert fs.t_quantile(0.975, 1) == pytest.approx(12.706204736)


def test_mean_interval_is_the_t_interval_of_the_values() -> None:
    d = fs.mean_interval([0.90, 0.92, 0.94])  # mean 0.92, sd 0.02
    half = T_975_2 * 0.02 / math.sqrt(3)
    assert (d.mean, d.low, d.high, d.n) == pytest.approx((0.92, 0.92 - half, 0.92 + half, 3))
    one = fs.mean_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.low) and math.isnan(one.high) and one.n == 1


def test_paired_interval_and_verdicts() -> None:
    base = {1: 0.93, 2: 0.95, 3: 0.94}
    # differences 0.02, 0.01, 0.03: mean 0.02, sd 0.01, half-width t * 0.01 / sqrt(3)
    d = fs.paired_difference({1: 0.95, 2: 0.96, 3: 0.97}, base)
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert (d.mean, d.low, d.high, d.n) == pytest.approx((0.02, 0.02 - half, 0.02 + half, 3))
    assert d.verdict == "not distinguishable"
    # differences 0.021, 0.019, 0.020 (sd 0.001): the whole interval is above 0
    up = fs.paired_difference({1: 0.951, 2: 0.969, 3: 0.960}, base)
    assert up.low > 0 and up.verdict == "beats the default"
    down = fs.paired_difference({s: v - 0.02 + 0.001 * (s % 2) for s, v in base.items()}, base)
    assert down.high < 0 and down.verdict == "worse than the default"
    # Only the seeds both finished are paired; one pair has no interval.
    one = fs.paired_difference({1: 0.99, 7: 0.5}, base)
    assert one.n == 1 and math.isnan(one.low) and one.verdict == "not distinguishable"
    same = fs.paired_difference(base, base)
    assert (same.mean, same.low, same.high) == (
        0.0,
        0.0,
        0.0,
    ) and same.verdict == "not distinguishable"


def test_summary_pairs_each_config_with_the_default_by_seed() -> None:
    configs = fs.select_configs([(4, 0.99, {"loss.tau": 0.2})], {"loss.tau": 0.1}, top=3)
    top, default = configs
    accs = {
        (top.key, 1): 0.95,
        (top.key, 2): 0.96,
        (top.key, 3): 0.97,
        (default.key, 1): 0.93,
        (default.key, 2): 0.95,
        (default.key, 3): 0.94,
    }
    summary = fs.summarize(configs, [1, 2, 3], accs)
    first, base = summary["configs"]
    assert first["mean"] == pytest.approx(0.96) and first["std"] == pytest.approx(0.01)
    assert (
        first["diff"]["mean"] == pytest.approx(0.02) and first["verdict"] == "not distinguishable"
    )
    assert base["label"] == "default" and "diff" not in base and base["mean"] == pytest.approx(0.94)
    assert summary["complete"] and summary["runs_done"] == 6
    lines = rp.final_lines(json.loads(json.dumps(json_safe(summary))))
    assert "rank 1 (trial 4)" in lines[1] and "Δ vs default +0.0200" in lines[1]
    assert "not distinguishable" in lines[-1]
    partial = fs.summarize(configs, [1, 2, 3], {k: v for k, v in accs.items() if k[1] != 3})
    assert not partial["complete"] and partial["configs"][0]["n"] == 2


# -- which configs ----------------------------------------------------------------------------
def test_top_configs_by_score_collapse_duplicates_and_add_the_default() -> None:
    ranked = [(5, 0.99, {"w": 1}), (2, 0.98, {"w": 1}), (7, 0.97, {"w": 2}), (1, 0.96, {"w": 3})]
    configs = fs.select_configs(ranked, {"w": 9}, top=2)
    assert [(c.rank, c.trial_number, c.params, c.is_default) for c in configs] == [
        (1, 5, {"w": 1}, False),
        (2, 7, {"w": 2}, False),
        (None, None, {"w": 9}, True),
    ]
    assert [c.tag for c in configs] == ["1", "2", "default"]
    # A top config equal to the default is the default: it is trained once.
    both = fs.select_configs(ranked, {"w": 2}, top=3)
    assert [(c.rank, c.is_default) for c in both] == [(1, False), (2, True), (3, False)]
    assert [c.label for c in both] == ["rank 1", "rank 2 = default", "rank 3"]
    # Fewer distinct configs than asked: what there is.
    assert len(fs.select_configs(ranked[:2], {"w": 9}, top=3)) == 2


def test_default_config_is_every_searched_tunable_at_its_objective_default() -> None:
    spec = Spec.model_validate(
        tiny_space(
            params={
                **tiny_space()["params"],
                "train.lr": {"float": [0.01, 0.5]},
                "data.val_fraction": {"choice": [0.1, 0.2]},
            }
        )
    )
    msd = get_objective("msd").tunables
    defaults = {"msd": {k: t.default for k, t in msd.items()}}
    got = fs.default_params(spec, defaults, "msd")
    # loss keys at msd's defaults (even loss.scales, which the space also fixes), the student's
    # width and the recipe at the space's own values, nothing held out.
    assert got == {
        "student.width": 0.25,
        "loss.tau": msd["tau"].default,
        "loss.scales": msd["scales"].default,
        "train.lr": 0.1,
    }
    choice = Spec.model_validate(
        tiny_space(
            objective={"choice": ["msd", "kd"]},
            loss={},
            params={"loss.kd_weight": {"float": [0.0, 2.0]}},
        )
    )
    defaults["kd"] = {k: t.default for k, t in get_objective("kd").tunables.items()}
    # (tiny_space merges params: student.width is still searched)
    assert fs.default_params(choice, defaults, "kd") == {
        "objective": "kd",
        "student.width": 0.25,
        "loss.kd_weight": defaults["kd"]["kd_weight"],
    }


def test_prepare_ranks_as_the_report_does_and_plans_stable_runs(tmp_path: Path) -> None:
    search = make_search(tmp_path, "gen", trials=8, epochs=6, failed=(1,), running=(2,))
    stage = fs.prepare(search, top=3, seeds=2)
    a = rp.analyze(search)
    expected = [t.number for t in a.top if t.status in ("finished", "stopped")][:3]
    assert [c.trial_number for c in stage.configs if c.rank is not None] == expected
    assert 1 not in expected and 2 not in expected  # failed and unfinished trials are not retrained
    assert stage.configs[-1].is_default and stage.configs[-1].params["student.width"] == 0.5
    assert all("seed" not in c.params for c in stage.configs)
    assert len(stage.runs) == 8 and len(stage.todo) == 8 and not stage.done
    assert len(set(stage.seeds)) == 2 and [r.number for r in stage.runs] == list(range(8))
    # Again with more seeds: the runs it had keep their numbers, the new ones come after.
    more = fs.prepare(search, top=3, seeds=3)
    old = {(r.config.key, r.seed): r.number for r in stage.runs}
    assert all(
        old[(r.config.key, r.seed)] == r.number for r in more.runs if (r.config.key, r.seed) in old
    )
    assert sorted(r.number for r in more.runs) == list(range(12))


def test_prepare_retrains_the_trials_asked_for_in_their_order(tmp_path: Path, capsys) -> None:
    search = make_search(tmp_path, "gen", trials=8, epochs=6, failed=(1,), running=(2,))
    done = [t.number for t in rp.analyze(search).top if t.status in ("finished", "stopped")]
    chosen = [done[-1], done[0]]  # the worst completed trial first, then the best
    stage = fs.prepare(search, seeds=2, trials=chosen)
    picked = [c for c in stage.configs if c.rank is not None]
    assert [(c.rank, c.trial_number) for c in picked] == [(1, chosen[0]), (2, chosen[1])]
    assert stage.top == 2 and stage.configs[-1].is_default and len(stage.runs) == 6
    # A trial that did not complete (failed, running or absent) is one line, nothing planned.
    for n in (1, 2, 99):
        with pytest.raises(SystemExit) as exc:
            main(["final", str(search), "--trial", str(n)])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("searchkd: error: ") and "\n" not in err
        assert f"trial {n} has not completed" in err and str(chosen[0]) in err
    with pytest.raises(SystemExit) as exc:
        main(["final", str(search), "--trial", "-1"])
    assert exc.value.code == 2 and "trial number is 0 or more" in capsys.readouterr().err
    assert not (search / "final.parquet").exists()


def test_final_of_a_search_without_completed_trials_is_one_line(tmp_path: Path, capsys) -> None:
    make_search(tmp_path, "open", trials=2, epochs=4, running=(0, 1), state="interrupted")
    with pytest.raises(SystemExit) as exc:
        main(["final", str(tmp_path / "open")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("searchkd: error: ") and "no completed trial" in err and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        main(["final", "nope", "--trials-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "nope: no such search" in capsys.readouterr().err
    assert not (tmp_path / "open" / "final.parquet").exists()


def test_space_final_section() -> None:
    spec = Spec.model_validate(tiny_space(final={"top": 2, "seeds": 5}))
    assert (spec.final.top, spec.final.seeds) == (2, 5)
    assert Spec.model_validate(tiny_space(final={})).final.top == fs.DEFAULT_TOP
    assert Spec.model_validate(tiny_space()).final is None
    from searchkd.spec import SpecError, validate

    with pytest.raises(SpecError, match="final.seeds: Input should be greater than or equal to 1"):
        validate(tiny_space(final={"seeds": 0}), "x.yaml")


# -- one real final stage --------------------------------------------------------------------------
@pytest.mark.integration
def test_final_stage_after_a_tiny_search(ray_session, tmp_path: Path, capsys) -> None:
    """The space's `final:` section runs the stage when the search ends (1 seed); `searchkd
    final --seeds 2` then trains only the second seed; run again, it trains nothing."""
    from mlflow.tracking import MlflowClient

    trials = tmp_path / "trials"
    space = write_space(tmp_path / "tiny.yaml", tiny_space(final={"top": 1, "seeds": 1}))
    assert main(["tune", str(space), "--trials-dir", str(trials)]) == 0
    out = capsys.readouterr().out
    search = trials / "tiny"
    assert "final stage: 1 top config and the default" in out and "2 of 2 runs to train" in out
    assert (
        "verdict: the search's best config" in out and "not distinguishable" in out
    )  # 1 seed: no interval
    assert len(pq.read_table(search / "final.parquet")) == 2

    assert main(["final", str(search), "--seeds", "2"]) == 0  # --top from the space's final:
    out = capsys.readouterr().out
    assert "2 of 4 runs to train" in out and "verdict: the search's best config" in out
    # ... and refreshes the report, saying so: it shows the 2 seeds now.
    assert f"report: {os.path.relpath(search / 'report' / 'index.html')}" in out
    data = json.loads((search / "report" / "data.json").read_text())
    assert [c["n"] for c in data["final"]["configs"]] == [2, 2]
    assert any(v in out.split("verdict:")[-1] for v in fs.VERDICTS)

    table = pq.read_table(search / "final.parquet")
    rows = table.to_pylist()
    assert len(rows) == 4
    assert sorted(r["rank"] for r in rows) == ["1", "1", "default", "default"]
    best = rp.analyze(search).top[0]
    seeds = {r["seed"] for r in rows if r["rank"] == "1"}
    assert seeds == {r["seed"] for r in rows if r["rank"] == "default"} and len(seeds) == 2
    for r in rows:
        assert (
            r["epochs"] == 2 and 0.0 <= r["test_acc"] <= 1.0 and r["test_acc"] == r["test_acc_last"]
        )
        if r["rank"] == "1":
            assert r["trial_number"] == best.number and r["loss.tau"] == best.config["loss.tau"]
        else:
            assert r["trial_number"] is None
            assert (
                r["loss.tau"] == get_objective("msd").tunables["tau"].default
                and r["student.width"] == 0.25
            )
    summary = rp.read_final(search)
    assert summary["complete"] and summary["configs"][0]["verdict"] in fs.VERDICTS

    client = MlflowClient(f"sqlite:///{trials / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("searchkd.role") == "search")
    stage = [r for r in runs if r.data.tags.get("searchkd.role") == "final"]
    assert len(stage) == 1 and stage[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert stage[0].info.status == "FINISHED" and "rank1_diff_mean" in stage[0].data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == stage[0].info.run_id]
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    tags = sorted(
        (c.data.tags["rank"], c.data.tags["seed"], c.data.tags["trial_number"]) for c in children
    )
    assert tags == sorted(
        (r["rank"], str(r["seed"]), "" if r["trial_number"] is None else str(r["trial_number"]))
        for r in rows
    )
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "test_acc")]
        assert steps == [1, 2]

    # Again: nothing is retrained, nothing changes.
    ray_runs = sorted(p.name for p in (search / "final" / "ray").iterdir())
    assert main(["final", str(search), "--top", "1", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "nothing left to do" in out and "verdict:" in out
    assert pq.read_table(search / "final.parquet").to_pylist() == rows
    assert sorted(p.name for p in (search / "final" / "ray").iterdir()) == ray_runs
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
    # The report shows it too.
    assert main(["report", str(search), "--no-mlflow"]) == 0
    assert "final stage:" in capsys.readouterr().out
    assert 'id="final"' in (search / "report" / "index.html").read_text()


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_final_stage_goes_on_where_it_stopped(tmp_path: Path) -> None:
    """SIGKILL `searchkd final` (and its Ray) when one run has finished and another is mid-way;
    run again: the finished run is not retrained, the other goes on from its saved epoch."""
    import os
    import subprocess
    import sys

    from conftest import kill_tree, rows, wait_until

    trials = tmp_path / "trials"
    space = write_space(
        tmp_path / "kt.yaml",
        tiny_space("kt", train={**tiny_space()["train"], "epochs": 5, "batch_size": 32}),
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run(
        tune_command(space, trials),
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=900,
    )
    cmd = [
        sys.executable,
        "-m",
        "searchkd.cli",
        "final",
        str(trials / "kt"),
        "--top",
        "1",
        "--seeds",
        "2",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )

    def last_epochs() -> dict[int, int]:
        out: dict[int, int] = {}
        for r in rows(trials / "kt", "final"):
            out[r["trial_number"]] = max(out.get(r["trial_number"], 0), r["epoch"])
        return out

    def one_done_one_midway() -> bool:
        e = last_epochs().values()
        return 5 in e and any(2 <= x < 5 for x in e)

    try:
        wait_until(one_done_one_midway, "one final run done, another mid-way", proc, timeout=900)
    finally:
        kill_tree(proc)  # the driver, its Ray and the trials' workers, as if the machine died
    before = last_epochs()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    finished = sum(e == 5 for e in before.values())
    assert f"{4 - finished} of 4 runs to train" in done.stdout
    table = rows(trials / "kt", "final")
    keys = [(r["trial_number"], r["epoch"]) for r in table]
    assert len(keys) == len(set(keys)), "duplicated (run, epoch) rows"
    midway = [n for n, e in before.items() if 2 <= e < 5]
    assert all(max(r["start_epoch"] for r in table if r["trial_number"] == n) >= 2 for n in midway)
    assert len(pq.read_table(trials / "kt" / "final.parquet")) == 4
