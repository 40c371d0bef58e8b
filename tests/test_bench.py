"""Smoke tests of the benchmarks in their smallest CPU form: they run, and say what they found.

Nothing here asserts a speed: a CI machine's timings prove nothing about a GPU's. Each test
runs the benchmark's documented entry point with a few steps of batch 4 and checks that every
figure is there and positive. One torch thread per process: on a CPU shared with other jobs,
several OpenMP threads per process can be ten times slower than one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import concurrency  # noqa: E402
import digits_objectives  # noqa: E402
import final_objectives  # noqa: E402
import gpu  # noqa: E402
import gpu_rows  # noqa: E402
import overhead  # noqa: E402
import packing  # noqa: E402
import pareto  # noqa: E402
import reproducibility  # noqa: E402
import search_efficiency  # noqa: E402
import throughput  # noqa: E402
import yaml  # noqa: E402
from test_fashion import write_idx  # noqa: E402  (the real IDX layout, small)

from searchkd.analysis import analyze, dominates, read_spec  # noqa: E402
from searchkd.final import mean_interval, paired_difference  # noqa: E402
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


def test_reproducibility_counts_idle_slot_time_per_tune_run(tmp_path: Path) -> None:
    """Two slots over a 10 s window: one trial lived 10 s and waited 2 s at a rung, the other
    lived 6 s: 14 s of training in 20 slot-seconds, 30 % idle, 10 % of it waiting at rungs."""
    run = tmp_path / "ray" / "run-001"
    lines = {
        "a": [
            {"timestamp": 103, "time_total_s": 3, "epoch": 1},
            {"timestamp": 110, "time_total_s": 10, "epoch": 2, "rung_wait_s": 2.0},
        ],
        "b": [
            {"timestamp": 104, "time_total_s": 2, "epoch": 1},
            {"timestamp": 108, "time_total_s": 6, "epoch": 2},
        ],
    }
    for name, rows in lines.items():
        (run / name).mkdir(parents=True)
        (run / name / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    use = reproducibility.slot_use(tmp_path, 2)
    assert use["slot_seconds"] == 20 and use["training_seconds"] == 14
    assert use["idle_share"] == pytest.approx(0.3)
    assert use["rung_wait_share"] == pytest.approx(0.1)


# ------------------------------------------------------------------ bench/gpu.py

# Put first on a process's path, it makes every module of a distribution the device image
# lacks unimportable in that process and in every process it starts (the variable is
# inherited): what runs under it runs with the image's packages and the carried wheels alone.
BLOCKER = """
import os, sys

BLOCKED = frozenset(os.environ["SEARCHKD_TEST_BLOCKED"].split(","))


class Hide:
    # Every finder, wrapped: a blocked module is not found (find_spec None, import
    # ModuleNotFoundError), as on a machine without it; torch probes with find_spec.
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
"""


def _normal(dist: str) -> str:
    return dist.lower().replace("_", "-").replace(".", "-")


def not_on_image() -> set[str]:
    """Top-level modules installed here whose distribution is neither on the device image (nor
    a dependency of one of its packages) nor carried as a wheel."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, requires

    from packaging.requirements import Requirement

    allowed: set[str] = set()
    todo = [*gpu.IMAGE, *gpu.CARRIED.values()]
    while todo:
        dist = _normal(todo.pop())
        if dist in allowed:
            continue
        allowed.add(dist)
        try:
            reqs = requires(dist) or []
        except PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return {
        module
        for module, dists in packages_distributions().items()
        if module != "searchkd" and not any(_normal(d) in allowed for d in dists)
    }


def test_the_engine_path_needs_nothing_the_image_lacks_but_the_carried_wheels() -> None:
    blocked = not_on_image()
    assert set(gpu.FRAMEWORKS) | {"pydantic_settings"} <= blocked
    assert not set(gpu.CARRIED) & blocked and not set(gpu.ON_IMAGE) & blocked


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """`python bench/gpu.py --device cpu --small --json OUT`, with every module the device image
    lacks (Ray, Optuna, MLflow, ...) hidden in all its processes; its JSON and its output."""
    tmp = tmp_path_factory.mktemp("gpu")
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp / "site"), str(BENCH.parent)]),
        "SEARCHKD_TEST_BLOCKED": ",".join(sorted(not_on_image())),
    }
    out = tmp / "gpu.json"
    cmd = [sys.executable, str(BENCH / "gpu.py"), "--device", "cpu", "--small", "--json", str(out)]
    done = subprocess.run(
        [*cmd, "--data-root", str(tmp / "data")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text()), done.stdout


def test_gpu_dry_run_measures_every_step_with_the_image_packages_alone(
    dry_run: tuple[dict[str, Any], str],
) -> None:
    """Each step ran in its own process, within its time box, and recorded its figures."""
    data, stdout = dry_run
    first = stdout.splitlines()[0]
    assert first.startswith("preflight: ") and "missing" not in first and "cannot" not in first
    assert data["device"].startswith("CPU") and data["small"] is True
    assert {"torch", "python", "command", "date"} <= set(data["environment"])
    steps = data["steps"]
    assert list(steps) == [s.name for s in gpu.STEPS]
    measured = [n for n in steps if n != "fashion_mnist"]
    for name in measured:
        assert steps[name]["status"] == "done", (name, steps[name])
        assert steps[name]["seconds"] <= steps[name]["limit_s"]
    eager, compiled, b256 = (steps[n]["figures"]["crd"] for n in measured[:3])
    for r in (eager, b256):
        assert r["engine"]["img_s"] > 0 and r["reference"]["img_s"] > 0
        assert r["ratio"] == pytest.approx(r["engine"]["img_s"] / r["reference"]["img_s"])
    assert (eager["batch_size"], b256["batch_size"]) == (4, 8)
    assert compiled["engine"]["img_s"] > 0 and "reference" not in compiled
    row = steps["concurrency"]["figures"]["trials=1"]
    assert row["procs"] == 1 and row["aggregate_img_s"] > 0
    packed = steps["packing"]["figures"]["wrn"]
    assert [r["k"] for r in packed["results"]] == [1, 2]
    assert all(r["teacher_calls_per_step"] == 1.0 for r in packed["results"])
    fashion = steps["fashion_mnist"]
    if not data["preflight"]["fashion_mnist"]:
        assert fashion["status"] == "skipped" and data["preflight"]["problems"]
        pytest.skip("no Fashion-MNIST on this machine: " + "; ".join(data["preflight"]["problems"]))
    assert fashion["status"] == "done", fashion
    runs = [v for k, v in fashion["figures"].items() if k != "verdict"]
    assert sorted(r["precision"] for r in runs) == ["bf16", "fp32"]
    assert all(0.0 <= r["test_acc_last"] <= 1.0 and r["test_images"] == 10_000 for r in runs)
    verdict = fashion["figures"]["verdict"]
    diff = verdict["bf16"]["mean"] - verdict["fp32"]["mean"]
    assert verdict["difference"] == pytest.approx(diff)
    assert verdict["within_noise"] == (abs(diff) <= 2 * verdict["se_difference"])


def test_a_step_past_its_time_box_is_killed_with_what_it_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The box kills the step's whole process group; the figures it sent first are kept.
    The clock jumps past the box once the first figure is recorded, so the test waits on that
    event, not on how fast a loaded machine gets there."""
    import multiprocessing
    import time

    gpu.STEP_FUNCTIONS["_hang"] = _hang_after_one_figure
    record: dict[str, Any] = {}
    saved: list[dict[str, Any]] = []
    jump = [0.0]
    real = time.monotonic
    monkeypatch.setattr(gpu.time, "monotonic", lambda: real() + jump[0])

    def save() -> None:
        saved.append(json.loads(json.dumps(record)))
        if record.get("figures"):
            jump[0] = 3600.0

    ctx = multiprocessing.get_context("fork")  # the step function exists in this process only
    opts = {"start_method": "fork", "pid_file": str(tmp_path / "pids")}
    try:
        gpu.run_step(ctx, "_hang", opts, 60.0, record, save)
    finally:
        del gpu.STEP_FUNCTIONS["_hang"]
    assert record["status"] == "timed out" and record["figures"] == {"first": {"n": 1}}
    assert saved[-1]["status"] == "timed out"
    for pid in map(int, (tmp_path / "pids").read_text().split()):
        assert not _alive(pid)  # the step and the child it started: both killed


def _hang_after_one_figure(opts: dict[str, Any], emit: Any) -> None:
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(opts["pid_file"]).write_text(f"{os.getpid()} {child.pid}")
    emit("first", {"n": 1})
    time.sleep(600)


def _alive(pid: int) -> bool:
    """Running (a killed process may linger as a zombie until its new parent reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_gpu_rows_render_the_dry_runs_figures_as_measured(
    dry_run: tuple[dict[str, Any], str], tmp_path: Path
) -> None:
    data, _ = dry_run
    table = gpu_rows.render(data, "dry.json")
    eager = data["steps"]["throughput"]["figures"]["crd"]
    [row] = [line for line in table.splitlines() if "crd (wrn_40_2 → wrn_16_2) engine vs" in line]
    assert f"| {eager['ratio']:.2f}× ({eager['engine']['img_s']:,.0f} img/s vs" in row
    assert f"| {data['device']} | {data['environment']['torch']} |" in row
    target = [line for line in table.splitlines() if line.startswith("| msd engine, batch 64")]
    assert target and "| not in this run | — |" in target[0]  # --small measures no msd
    assert table.startswith("<!-- gpu-rows:begin source=dry.json -->")
    copy = tmp_path / "RESULTS.md"
    copy.write_text((BENCH / "RESULTS.md").read_text())
    (tmp_path / "dry.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="is not a GPU run .*only a GPU run's figures"):
        gpu_rows.main([str(tmp_path / "dry.json"), "--write", str(copy)])
    gpu_like = {**data, "small": False, "environment": {**data["environment"], "gpu": "GPU X"}}
    (tmp_path / "gpu.json").write_text(json.dumps(gpu_like))
    assert gpu_rows.main([str(tmp_path / "gpu.json"), "--write", str(copy)]) == 0
    written = copy.read_text()
    assert gpu_rows.render(gpu_like, str(tmp_path / "gpu.json")) in written
    before, after = (BENCH / "RESULTS.md").read_text().split(gpu_rows.END)
    assert written.startswith(before.split("<!-- gpu-rows:begin")[0]) and written.endswith(after)


def test_gpu_rows_judge_each_target_on_its_figure(dry_run: tuple[dict[str, Any], str]) -> None:
    """The dry run's figures, relabelled as the msd rows a GPU run has and given made-up
    values on both sides of each target: each row says met or not met by its own figure."""
    import copy

    data = copy.deepcopy(dry_run[0])
    steps = data["steps"]
    msd = copy.deepcopy(steps["throughput"]["figures"]["crd"])
    msd["ratio"], msd["engine"]["img_s"] = 9.0, 29_000.0  # ratio met, speed not met
    steps["throughput"]["figures"]["msd"] = msd
    four = {**steps["concurrency"]["figures"]["trials=1"], "procs": 4, "speedup_vs_1": 2.5}
    steps["concurrency"]["figures"]["trials=4"] = four
    packed = copy.deepcopy(steps["packing"]["figures"]["wrn"])
    packed["results"].append({**packed["results"][-1], "k": 4, "efficiency": 0.95})
    steps["packing"]["figures"]["msd"] = packed
    rows = {
        line.split(" | ")[0].lstrip("| "): line for line in gpu_rows.render(data, "x").splitlines()
    }
    assert "| 9.00× (" in rows["msd (wrn_40_2 → wrn_16_2) engine vs classic loop, batch 64"]
    assert rows["msd (wrn_40_2 → wrn_16_2) engine vs classic loop, batch 64"].count("**met**") == 1
    assert "| 29,000 img/s | **not met** |" in rows["msd (wrn_40_2 → wrn_16_2) engine, batch 64"]
    assert "| 2.50× (" in rows["4 trials sharing the device vs 1, aggregate"]
    assert "**not met**" in rows["4 trials sharing the device vs 1, aggregate"]
    k4 = rows["packed trials, wrn_40_2 → wrn_16_2 (crd), K = 4 vs 4 separate"]
    assert "| ≥ 90 % of ideal | 95 % of ideal" in k4 and "**met**" in k4
    fashion = rows[next(k for k in rows if k.startswith("Fashion-MNIST"))]
    verdict = steps["fashion_mnist"]["figures"].get("verdict")
    if verdict is not None:
        assert ("**met**" if verdict["within_noise"] else "**not met**") in fashion


def test_results_md_gpu_tables_are_those_rendered_from_their_source() -> None:
    """The GPU tables of RESULTS.md are gpu_rows.py's rendering of the JSON they name (or of
    no run at all): no figure in them was typed by hand."""
    text = (BENCH / "RESULTS.md").read_text()
    match = gpu_rows.BLOCK.search(text)
    assert match, "bench/RESULTS.md has no gpu-rows markers"
    source = match["source"]
    paths = [BENCH.parent / path for path in source.split(",")]
    payload = None if source == gpu_rows.NONE else gpu_rows.load(paths)
    assert match[0] == gpu_rows.render(payload, source)


def test_a_rerun_replaces_the_steps_it_measured_with_its_own_date(
    dry_run: tuple[dict[str, Any], str], tmp_path: Path
) -> None:
    import copy

    first = copy.deepcopy(dry_run[0])
    first["steps"]["throughput_compile"] = {"status": "timed out", "error": "killed", "figures": {}}
    rerun = copy.deepcopy(dry_run[0])
    rerun["environment"]["date"] = "2099-01-01 00:00 UTC"
    rerun["steps"] = {
        "throughput_compile": dry_run[0]["steps"]["throughput_compile"],
        "packing": {"status": "failed", "error": "boom", "figures": {}},  # worse: not taken
    }
    paths = [tmp_path / "run.json", tmp_path / "rerun.json"]
    for path, run in zip(paths, (first, rerun), strict=True):
        path.write_text(json.dumps(run))
    merged = gpu_rows.load(paths)
    assert merged["steps"]["throughput_compile"]["status"] == "done"
    assert merged["steps"]["packing"]["status"] == "done"
    lines = gpu_rows.render(merged, "run.json,rerun.json").splitlines()
    [compiled] = [line for line in lines if line.startswith("| crd engine with train.compile")]
    [eager] = [line for line in lines if line.startswith("| crd (wrn_40_2 → wrn_16_2) engine vs")]
    assert compiled.endswith("| 2099-01-01 00:00 UTC |")
    assert eager.endswith(f"| {first['environment']['date']} |")
    other = {**rerun, "device": "another device"}
    paths[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="one table is one device"):
        gpu_rows.load(paths)


def _wheel(folder: Path, module: str) -> Path:
    """A minimal valid wheel holding one module that defines VALUE = 42."""
    import zipfile

    dist = f"{module}-0.1.dist-info"
    path = folder / f"{module}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}.py", "VALUE = 42\n")
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
        z.writestr(
            f"{dist}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(
            f"{dist}/RECORD", f"{module}.py,,\n{dist}/METADATA,,\n{dist}/WHEEL,,\n{dist}/RECORD,,\n"
        )
    return path


@pytest.mark.parametrize("pip", [True, False], ids=["pip", "no-pip"])
def test_carried_wheels_install_offline_first_on_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pip: bool
) -> None:
    import importlib

    module = f"searchkd_test_wheel_{'pip' if pip else 'zip'}"
    (tmp_path / "whl").mkdir()
    _wheel(tmp_path / "whl", module)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setattr(gpu, "_has_pip", lambda: pip)
    line = gpu.install_wheels(tmp_path / "whl", tmp_path / "site")
    assert line.endswith("(pip)" if pip else "(unpacked: this Python has no pip)")
    assert importlib.import_module(module).VALUE == 42
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "site")
    monkeypatch.delitem(sys.modules, module)


def test_a_wheel_for_another_python_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "whl").mkdir()
    wheel = _wheel(tmp_path / "whl", "searchkd_test_wheel_old")
    wheel.rename(wheel.with_name("searchkd_test_wheel_old-0.1-cp27-cp27mu-manylinux1_x86_64.whl"))
    with pytest.raises(SystemExit, match=r"^gpu.py: pip could not install the wheels of .*: \S"):
        gpu.install_wheels(tmp_path / "whl", tmp_path / "site")


def test_the_preflight_names_what_is_missing_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "CARRIED", {**gpu.CARRIED, "searchkd_no_such_module": "no-such-dist"})
    pre = gpu.preflight("cpu", Path("/nonexistent"), fashion=False)
    line = gpu.preflight_line(pre)
    assert pre["fatal"] and "\n" not in line
    assert line.startswith(
        "preflight: cannot run: missing searchkd_no_such_module (pip: no-such-dist)"
    )


def _exit_after_one_figure(opts: dict[str, Any], emit: Any) -> None:
    emit("first", {"n": 1})
    os._exit(3)  # a segfault or an OOM kill: the process ends without a word


def _raise_after_one_figure(opts: dict[str, Any], emit: Any) -> None:
    emit("first", {"n": 1})
    raise ValueError("boom")


@pytest.mark.parametrize(
    ("step", "error"),
    [
        (_exit_after_one_figure, "its process ended with 3"),
        (_raise_after_one_figure, "ValueError: boom"),
    ],
    ids=["dies", "raises"],
)
def test_a_failing_step_is_recorded_with_what_it_measured(step: Any, error: str) -> None:
    import multiprocessing

    gpu.STEP_FUNCTIONS["_fail"] = step
    record: dict[str, Any] = {}
    try:
        gpu.run_step(
            multiprocessing.get_context("fork"),
            "_fail",
            {"start_method": "fork"},
            60.0,
            record,
            lambda: None,
        )
    finally:
        del gpu.STEP_FUNCTIONS["_fail"]
    assert record["status"] == "failed" and record["error"] == error
    assert record["figures"] == {"first": {"n": 1}}
