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
import overhead  # noqa: E402
import packing  # noqa: E402
import throughput  # noqa: E402

# CIFAR-10-format files, 10 classes and batch 4: the smallest form of each benchmark.
SMALL = ["--device", "cpu", "--num-classes", "10", "--batch-size", "4"]
TINY_SET = ["--train-size", "40"]  # 10 batches of 4: room for the warm-up and measured steps
ENV_KEYS = {"device", "torch", "command", "date"}


def _run(module: Any, args: list[str], tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "out.json"
    assert module.main([*args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_throughput_measures_engine_and_reference_for_both_pairs(tmp_path: Path) -> None:
    data = _run(throughput, [*SMALL, *TINY_SET, "--steps", "1", "--threads", "1", "--workers", "1"], tmp_path)
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
    data = _run(concurrency, [*SMALL, *TINY_SET, "--procs", "1,2", "--steps", "1", "--threads", "1"], tmp_path)
    assert set(data) >= ENV_KEYS
    assert [r["procs"] for r in data["results"]] == [1, 2]
    for r in data["results"]:
        assert len(r["per_process"]) == r["procs"]
        assert r["aggregate_img_s"] > 0 and r["window_s"] > 0
        assert all(p["img_s"] > 0 and p["end"] > p["start"] for p in r["per_process"])
    one = data["results"][0]["aggregate_img_s"]  # the first row is a single trial process
    assert [r["speedup_vs_1"] for r in data["results"]] == [pytest.approx(r["aggregate_img_s"] / one)
                                                            for r in data["results"]]


def test_overhead_summary_separates_fixed_and_per_epoch_costs() -> None:
    """The arithmetic alone, on made-up times: 2 s per epoch, 1 s fixed, 0.5 s per epoch extra."""
    bare = {"construct_s": 1.0, "epoch_s": [3.0, 2.0, 2.0], "checkpoint_s": 0.1}
    searches = {"short": {"trial_wall_s": 5.5, "process_s": 10.5, "ray_time_total_s": 5.0},
                "long": {"trial_wall_s": 10.5, "process_s": 20.5, "ray_time_total_s": 10.0}}
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
    for key in ("overhead_long_pct", "per_epoch_overhead_s", "fixed_trial_overhead_s",
                "projected_240_epoch_overhead_pct", "overhead_lower_bound_long_pct"):
        assert isinstance(data[key], float)


def test_packing_measures_packed_cohorts_against_separate_trials(tmp_path: Path) -> None:
    data = _run(packing, ["--device", "cpu", "--small", "--configs", "msd", "--threads", "1"], tmp_path)
    assert set(data) >= ENV_KEYS
    [config] = data["configs"]
    assert (config["teacher"], config["student"], config["objective"]) == ("resnet32x4", "resnet8x4", "msd")
    assert 0.0 < config["teacher_share"] <= 1.0
    assert [r["k"] for r in config["results"]] == [1, 2]
    for r in config["results"]:
        assert r["student_img_s"] > 0 and r["separate_img_s"] > 0 and r["peak_memory_mib"] > 0
        assert r["teacher_calls_per_step"] == 1.0  # one teacher forward per batch, whatever K
        assert r["ideal_speedup"] == pytest.approx(1 / (config["teacher_share"] / r["k"] + 1 - config["teacher_share"]))
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal_speedup"])


def test_packing_refuses_an_unknown_configuration() -> None:
    with pytest.raises(SystemExit, match="unknown configuration 'kd'; known: msd, crd, wrn"):
        packing.main(["--device", "cpu", "--configs", "kd"])
