"""Smoke tests of the benchmarks in their smallest CPU form: they run, and say what they found.

Nothing here asserts a speed: a CI machine's timings prove nothing about a GPU's. Each test
runs the benchmark's documented entry point with a few steps of batch 4 and checks that every
figure is there and positive. One torch thread per process: on a CPU shared with other jobs,
several OpenMP threads per process can be ten times slower than one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import concurrency  # noqa: E402
import digits_objectives  # noqa: E402
import final_objectives  # noqa: E402
import overhead  # noqa: E402
import packing  # noqa: E402
import pareto  # noqa: E402
import search_efficiency  # noqa: E402
import throughput  # noqa: E402
import yaml  # noqa: E402
from test_fashion import write_idx  # noqa: E402  (the real IDX layout, small)

from searchkd.final import mean_interval, paired_difference  # noqa: E402
from searchkd.report import analyze, dominates, read_spec  # noqa: E402
from searchkd.spec import Spec  # noqa: E402

SPACES = BENCH.parent / "spaces"

# CIFAR-10-format files, 10 classes and batch 4: the smallest form of each benchmark.
SMALL = ["--device", "cpu", "--num-classes", "10", "--batch-size", "4"]
TINY_SET = ["--train-size", "40"]  # 10 batches of 4: room for the warm-up and measured steps
ENV_KEYS = {"device", "torch", "command", "date"}


def _run(module: Any, args: list[str], tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "out.json"
    assert module.main([*args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_throughput_measures_engine_and_reference_for_both_pairs(tmp_path: Path) -> None:
    data = _run(
        throughput,
        [*SMALL, *TINY_SET, "--steps", "1", "--threads", "1", "--workers", "1"],
        tmp_path,
    )
    assert set(data) >= ENV_KEYS
    assert [r["objective"] for r in data["results"]] == ["msd", "crd"]
    for r in data["results"]:
        assert r["engine"]["steps"] == 1 and r["reference"]["steps"] == 1
        assert r["engine"]["img_s"] > 0 and r["reference"]["img_s"] > 0
        assert r["engine"]["ops_per_step"] > 0 and r["reference"]["ops_per_step"] > 0
        assert r["ratio"] == pytest.approx(r["engine"]["img_s"] / r["reference"]["img_s"])


def test_throughput_refuses_an_unknown_pair() -> None:
    with pytest.raises(SystemExit, match="unknown pair 'kd'; known: msd, crd"):
        throughput.main(["--device", "cpu", "--pairs", "kd"])


def test_concurrency_aggregates_one_and_two_trial_processes(tmp_path: Path) -> None:
    data = _run(
        concurrency,
        [*SMALL, *TINY_SET, "--procs", "1,2", "--steps", "1", "--threads", "1"],
        tmp_path,
    )
    assert set(data) >= ENV_KEYS
    assert [r["procs"] for r in data["results"]] == [1, 2]
    for r in data["results"]:
        assert len(r["per_process"]) == r["procs"]
        assert r["aggregate_img_s"] > 0 and r["window_s"] > 0
        assert all(p["img_s"] > 0 and p["end"] > p["start"] for p in r["per_process"])
    one = data["results"][0]["aggregate_img_s"]  # the first row is a single trial process
    assert [r["speedup_vs_1"] for r in data["results"]] == [
        pytest.approx(r["aggregate_img_s"] / one) for r in data["results"]
    ]


def test_overhead_summary_separates_fixed_and_per_epoch_costs() -> None:
    """The arithmetic alone, on made-up times: 2 s per epoch, 1 s fixed, 0.5 s per epoch extra."""
    bare = {"construct_s": 1.0, "epoch_s": [3.0, 2.0, 2.0], "checkpoint_s": 0.1}
    searches = {
        "short": {"trial_wall_s": 5.5, "process_s": 10.5, "ray_time_total_s": 5.0},
        "long": {"trial_wall_s": 10.5, "process_s": 20.5, "ray_time_total_s": 10.0},
    }
    r = overhead.summarize(bare, searches, short=1, long=3)
    assert r["per_epoch_overhead_s"] == pytest.approx(0.5)
    assert r["fixed_trial_overhead_s"] == pytest.approx(1.0)
    assert r["bare_epoch_s"] == pytest.approx(2.0)
    assert r["overhead_long_pct"] == pytest.approx(100 * 2.5 / 10.5)
    assert r["search_startup_s"] == {"short": pytest.approx(5.0), "long": pytest.approx(10.0)}
    assert r["outside_function_s"] == {"short": pytest.approx(0.5), "long": pytest.approx(0.5)}
    assert r["overhead_lower_bound_long_pct"] == pytest.approx(100 * (0.5 + 3 * 0.1) / 10.5)


@pytest.mark.integration
def test_overhead_runs_searchkd_tune_and_the_bare_engine(tmp_path: Path) -> None:
    data = _run(overhead, [*SMALL, "--small", "--train-size", "60", "--epochs", "1,2"], tmp_path)
    assert set(data) >= ENV_KEYS
    assert len(data["bare"]["epoch_s"]) == 2 and data["bare"]["construct_s"] > 0
    for label, epochs in (("short", 1), ("long", 2)):
        s = data["searches"][label]
        assert s["trial_wall_s"] > 0 and s["process_s"] > s["trial_wall_s"]
        assert len(s["ray_epoch_s"]) == epochs
    assert data["bare"]["checkpoint_s"] > 0
    for key in (
        "overhead_long_pct",
        "per_epoch_overhead_s",
        "fixed_trial_overhead_s",
        "projected_240_epoch_overhead_pct",
        "overhead_lower_bound_long_pct",
    ):
        assert isinstance(data[key], float)


def test_packing_measures_packed_cohorts_against_separate_trials(tmp_path: Path) -> None:
    data = _run(
        packing, ["--device", "cpu", "--small", "--configs", "msd", "--threads", "1"], tmp_path
    )
    assert set(data) >= ENV_KEYS
    [config] = data["configs"]
    assert (config["teacher"], config["student"], config["objective"]) == (
        "resnet32x4",
        "resnet8x4",
        "msd",
    )
    assert 0.0 < config["teacher_share"] <= 1.0
    assert [r["k"] for r in config["results"]] == [1, 2]
    for r in config["results"]:
        assert r["student_img_s"] > 0 and r["separate_img_s"] > 0 and r["peak_memory_mib"] > 0
        assert r["teacher_calls_per_step"] == 1.0  # one teacher forward per batch, whatever K
        assert r["ideal_speedup"] == pytest.approx(
            1 / (config["teacher_share"] / r["k"] + 1 - config["teacher_share"])
        )
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal_speedup"])


def test_packing_refuses_an_unknown_configuration() -> None:
    with pytest.raises(SystemExit, match="unknown configuration 'kd'; known: msd, crd, wrn"):
        packing.main(["--device", "cpu", "--configs", "kd"])


def test_search_efficiency_curve_and_reach_arithmetic() -> None:
    """Made-up rows in arrival order: the running best, its test_acc, ties, and the reach."""

    def row(n: int, epoch: int, val: float, test: float) -> dict[str, Any]:
        return {"trial_number": n, "epoch": epoch, "best_val_acc": val, "test_acc": test}

    rnd_rows = [row(0, 1, 0.5, 0.4), row(1, 1, 0.6, 0.5), row(0, 2, 0.8, 0.7), row(1, 2, 0.8, 0.9)]
    tpe_rows = [row(0, 1, 0.5, 0.4), row(1, 1, 0.9, 0.85), row(0, 2, 0.5, 0.45)]
    rnd = search_efficiency.summarize("random", 0, "r", rnd_rows, 1.0, epochs=2)
    tpe = search_efficiency.summarize("tpe-asha", 0, "t", tpe_rows, 1.0, epochs=2)
    assert [(p.val_acc, p.test_acc, p.trial) for p in rnd.curve] == [
        (0.5, 0.4, 0),
        (0.6, 0.5, 1),
        (0.8, 0.7, 0),
        (0.8, 0.7, 0),
    ]  # a tie keeps the incumbent
    assert rnd.trial_epochs == 4 and rnd.stopped_early == 0 and rnd.reached(0.8) == 3
    assert tpe.trial_epochs == 3 and tpe.stopped_early == 1 and tpe.epochs_per_trial == {0: 2, 1: 1}
    assert tpe.at(10).val_acc == 0.9  # an ended search holds its final best
    result = search_efficiency.compare([tpe, rnd], budget=4)
    seed = result["per_seed"][0]
    assert seed["tpe_reached_random_final_at"] == 2 and seed["tpe_test_when_reached"] == 0.85
    assert seed["random_reached_own_final_at"] == 3 and not seed["within_goal"]  # 2 > 4 / 3
    assert result["mean_tpe_reached_mean_random_final_at"] == 2 and result["pairs_within_goal"] == 0
    assert result["mean_curves"]["random"] == [0.5, 0.6, 0.8, 0.8]


@pytest.mark.integration
def test_search_efficiency_counts_trial_epochs_of_both_searches(
    ray_session, tmp_path: Path
) -> None:
    """Two real searches (TPE + ASHA, random) of 2 trials × 2 epochs: the curves and the
    trial-epoch accounting, not which search wins (2 trials decide nothing)."""
    args = [
        "--small",
        "--trials-dir",
        str(tmp_path / "trials"),
        "--teacher-trials-dir",
        str(tmp_path / "teacher"),
    ]
    data = _run(search_efficiency, args, tmp_path)
    env = data["environment"]
    assert {"date", "machine", "torch", "ray", "optuna", "mlflow", "python", "command"} <= set(env)
    assert data["settings"]["budget_trial_epochs"] == 4
    searches = {s["method"]: s for s in data["searches"]}
    assert set(searches) == {"tpe-asha", "random"} and len(data["searches"]) == 2
    rnd, tpe = searches["random"], searches["tpe-asha"]
    assert rnd["trial_epochs"] == 2 * 2 and rnd["stopped_early"] == 0  # random: trials × epochs
    assert rnd["epochs_per_trial"] == {"0": 2, "1": 2}
    assert tpe["trials"] == 2 and 2 < tpe["trial_epochs"] <= 2 * 2  # ASHA: at least the first rung
    assert tpe["trial_epochs"] == sum(tpe["epochs_per_trial"].values())
    for s in (rnd, tpe):
        curve = s["curve"]
        assert [p["trial_epochs"] for p in curve] == list(range(1, s["trial_epochs"] + 1))
        vals = [p["val_acc"] for p in curve]
        assert vals == sorted(vals) and all(0 <= v <= 1 for v in vals)  # a running best
        assert all(0 <= p["test_acc"] <= 1 and p["trial"] in (0, 1) for p in curve)
    seed = data["per_seed"][0]
    assert seed["random_final_val"] == rnd["curve"][-1]["val_acc"]
    assert seed["random_trial_epochs"] == 4 and data["goal_trial_epochs"] == pytest.approx(4 / 3)
    k = seed["tpe_reached_random_final_at"]
    assert k is None or tpe["curve"][k - 1]["val_acc"] >= seed["random_final_val"]
    assert seed["within_goal"] == (k is not None and k <= 4 / 3)
    assert len(data["mean_curves"]["random"]) == len(data["mean_curves"]["tpe-asha"]) == 4


# ----------------------------------------------------------- the accuracy benchmarks (issue 18)


def test_objectives_are_paired_with_ce_and_kd_by_seed() -> None:
    rows = [
        digits_objectives.summarize("ce", {0: 0.80, 1: 0.82, 2: 0.81}, 1.0),
        digits_objectives.summarize("kd", {0: 0.82, 1: 0.83, 2: 0.84}, 1.0),
        digits_objectives.summarize("msd", {0: 0.80, 1: 0.83, 2: 0.81}, 1.0),
    ]
    digits_objectives.compare(rows)
    ce, kd, msd = rows
    assert set(ce.versus) == {"kd"} and set(kd.versus) == {"ce"} and set(msd.versus) == {"ce", "kd"}
    ci = mean_interval([0.80, 0.82, 0.81])
    assert (ce.mean, ce.low, ce.high) == pytest.approx((0.81, ci.low, ci.high))
    d = paired_difference(msd.test_acc, ce.test_acc)
    assert (msd.versus["ce"].mean, msd.versus["ce"].low) == pytest.approx((d.mean, d.low))
    assert msd.versus["ce"].record == "1/2/0" and msd.versus["kd"].record == "0/1/2"
    assert msd.beats_ce and kd.beats_ce and ce.beats_ce is None
    text = digits_objectives.table(rows)
    assert "Δ vs ce" in text and "Δ vs kd" in text and text.count("(baseline)") == 2


def test_objective_spaces_change_objective_and_name_and_pack_their_seeds(tmp_path: Path) -> None:
    base = SPACES / "fashion-ce.yaml"
    raw = yaml.safe_load(base.read_text())
    assert digits_objectives.space_of("kd", base) == {
        **raw,
        "name": "fashion-kd",
        "objective": "kd",
    }
    packed = digits_objectives.space_of("crd", base, seeds=4, pack=True)
    assert packed["name"] == "fashion-crd" and packed["search"]["num_samples"] == 4
    assert packed["search"]["pack"] == 4 and Spec.model_validate(packed).search.pack == 4
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**raw, "name": "mine"}))
    assert digits_objectives.space_of("kd", other)["name"] == "mine-kd"
    # --override: one command at another size, e.g. the GPU column of bench/README.md
    full = digits_objectives.space_of(
        "kd",
        base,
        overrides=[
            "data.options=null",
            "teacher.arch=resnet20",
            "search.resources={cpu: 4, gpu: 0.25}",
        ],
    )
    assert "options" not in full["data"] and full["teacher"]["arch"] == "resnet20"
    assert full["search"]["resources"] == {"cpu": 4, "gpu": 0.25}
    assert full["teacher"]["train"] == raw["teacher"]["train"] and full["train"] == raw["train"]
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        digits_objectives.load_base(base, ["train.epochs"])


def test_search_variants_change_only_the_searched_side(tmp_path: Path) -> None:
    base = yaml.safe_load((SPACES / "fashion-efficiency.yaml").read_text())
    settings = search_efficiency.parse_settings(
        ["search.grace_period=2", "search.reduction_factor=2.5", "search.sampler=gp"]
    )
    assert settings == {"grace_period": 2, "reduction_factor": 2.5, "sampler": "gp"}
    tpe = search_efficiency.variant(base, "tpe-asha", 1, 12, 6, False, settings)
    rnd = search_efficiency.variant(base, "random", 1, 12, 6, False, settings)
    assert tpe["name"] == "fashion-efficiency-tpe-asha-g2-rf2p5-gp-s1"
    assert Spec.model_validate(tpe).search.sampler == "gp"
    assert {k: tpe["search"][k] for k in settings} == settings
    assert rnd["name"] == "fashion-efficiency-random-s1"
    assert (rnd["search"]["sampler"], rnd["search"]["scheduler"]) == ("random", "none")
    assert rnd["search"]["grace_period"] == base["search"]["grace_period"]
    for s in (tpe, rnd):
        assert (s["search"]["seed"], s["search"]["num_samples"], s["train"]["epochs"]) == (1, 12, 6)
    with pytest.raises(SystemExit, match="search.KEY=VALUE"):
        search_efficiency.parse_settings(["train.lr=0.1"])


def test_pareto_points_are_the_ends_of_the_front_first() -> None:
    front = [
        {"trial": 3, "val_acc": 0.7, "student_macs": 10.0},
        {"trial": 5, "val_acc": 0.8, "student_macs": 20.0},
        {"trial": 1, "val_acc": 0.9, "student_macs": 40.0},
    ]
    assert pareto.chosen(front, "val_acc", 2) == [1, 3]  # most accurate, then smallest
    assert pareto.chosen(front, "val_acc", 3) == [1, 3, 5]
    assert pareto.chosen(front[:1], "val_acc", 2) == [3]


def _fashion_space(tmp_path: Path, name: str, **changes: Any) -> Path:
    """A bench space on small Fashion-MNIST IDX files in torchvision's layout: 300 training and
    100 test images, a 1-epoch teacher, 1-epoch trials."""
    write_idx(tmp_path / "data" / "FashionMNIST" / "raw", 300, 100, seed=0, gz=False)
    raw = yaml.safe_load((SPACES / f"{name}.yaml").read_text())
    raw["data"] = {
        "dataset": "fashion_mnist",
        "root": str(tmp_path / "data"),
        "val_fraction": 0.2,
        "options": {"train_images": 120},
    }
    raw["teacher"] = {
        **search_efficiency.SMALL_TEACHER,
        "train": {**search_efficiency.SMALL_TEACHER["train"], "epochs": 1},
    }
    raw["train"] = {**raw["train"], "epochs": 1}
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.integration
def test_objectives_on_fashion_packed_against_ce_and_kd(ray_session, tmp_path: Path) -> None:
    """ce, kd and stkd on small Fashion-MNIST files, 2 seeds packed into one trial each."""
    base = _fashion_space(tmp_path, "fashion-ce")
    trials = tmp_path / "trials"
    args = ["--base", str(base), "--objectives", "stkd", "--seeds", "2", "--pack"]
    args += ["--trials-dir", str(trials), "--teacher-trials-dir", str(tmp_path / "teacher")]
    data = _run(digits_objectives, args, tmp_path)
    assert {"torch", "ray", "optuna", "mlflow", "python", "command", "date"} <= set(
        data["environment"]
    )
    rows = {r["objective"]: r for r in data["rows"]}
    assert list(rows) == ["ce", "kd", "stkd"]
    for name, r in rows.items():
        assert set(r["test_acc"]) == {"0", "1"} and all(0 <= v <= 1 for v in r["test_acc"].values())
        assert read_spec(trials / f"fashion-{name}").search.pack == 2  # one packed trial
    stkd = rows["stkd"]["versus"]
    assert set(stkd) == {"ce", "kd"}
    for v in stkd.values():
        assert sum(int(x) for x in v["record"].split("/")) == 2
    # A second run in the same folder reads the finished searches again and trains nothing.
    again = _run(digits_objectives, args, tmp_path)
    assert [r["test_acc"] for r in again["rows"]] == [r["test_acc"] for r in data["rows"]]


@pytest.mark.integration
def test_pareto_front_and_the_final_stage_on_two_points(ray_session, tmp_path: Path) -> None:
    """A 4-trial two-metric search on small Fashion-MNIST files; the final stage retrains two
    points of its front (`searchkd final --trial`), then final_objectives --search ranks it."""
    space = _fashion_space(
        tmp_path,
        "fashion-pareto",
        search={"num_samples": 4},
        params={
            "student.width": {"choice": [0.25, 0.5, 1.0]},
            "loss.kd_weight": {"float": [0.0, 2.0]},
        },
    )
    trials = tmp_path / "trials"
    common = ["--trials-dir", str(trials), "--teacher-trials-dir", str(tmp_path / "teacher")]
    data = _run(pareto, ["--space", str(space), "--seeds", "2", *common], tmp_path)
    front, summary = data["front"], data["final"]
    scores = {
        t.number: (t.scores["val_acc"], t.scores["student_macs"])
        for t in analyze(trials / "fashion-pareto").trials
    }
    on = {p["trial"] for p in front}
    assert on and [p["student_macs"] for p in front] == sorted(p["student_macs"] for p in front)
    for n, point in scores.items():  # the front is exactly the non-dominated trials
        beaten = any(dominates(q, point, ["max", "min"]) for m, q in scores.items() if m != n)
        assert (n in on) == (not beaten)
    points = data["settings"]["points"]
    assert points == pareto.chosen(front, "val_acc", 2)
    picked = [c for c in summary["configs"] if c["rank"] is not None]
    assert [c["trial_number"] for c in picked] == points
    assert any(c["is_default"] for c in summary["configs"]) and summary["complete"]
    assert all(c["n"] == 2 for c in summary["configs"])
    # The final stage of the same search by its best val_acc: the most accurate point, whose
    # runs are already done.
    out = _run(
        final_objectives, ["--search", str(trials / "fashion-pareto"), "--seeds", "2"], tmp_path
    )
    [row] = out["rows"]
    assert row["search"] == "fashion-pareto" and row["winner"]["trial"] == points[0]
