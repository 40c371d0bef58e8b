"""The library API: the command line's behaviour as functions, mistakes as SearchkdError."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from conftest import tiny_space, write_space

import searchkd
from searchkd import api
from searchkd.spec import SpecError


def test_the_package_exposes_the_api_lazily() -> None:
    assert searchkd.tune is api.tune and searchkd.resume is api.resume
    assert searchkd.results is api.results and searchkd.load_student is api.load_student
    with pytest.raises(AttributeError, match="no attribute 'tunes'"):
        searchkd.tunes  # noqa: B018
    # The teacher cache and the final stage are the api's: their names are also modules.
    importlib.import_module("searchkd.final")
    importlib.import_module("searchkd.teacher")
    assert searchkd.api.teacher is api.teacher and searchkd.api.final is api.final


def test_a_space_diff_names_each_changed_leaf() -> None:
    old = {"train": {"epochs": 2, "lr": 0.1}, "name": "a", "params": {"x": {"float": [0, 1]}}}
    new = {"train": {"epochs": 3, "lr": 0.1}, "name": "a", "params": {}}
    assert api.space_diff(old, new) == [
        'params.x: {"float": [0, 1]} -> null',
        "train.epochs: 2 -> 3",
    ]
    assert api.space_diff(old, old) == []


def test_a_space_is_a_file_a_dict_or_a_spec(tmp_path: Path) -> None:
    raw = tiny_space("api")
    from_file = api.load_space(write_space(tmp_path / "s.yaml", raw))
    assert api.load_space(raw) == from_file == api.load_space(from_file)
    raw["student"]["arch"] = "resnet9000"
    with pytest.raises(SpecError, match="<space>: student.arch: unknown arch"):
        api.load_space(raw)


def test_mistakes_are_searchkd_errors_before_anything_is_written(tmp_path: Path) -> None:
    trials = tmp_path / "trials"
    (trials / "api").mkdir(parents=True)
    (trials / "api" / "space.yaml").write_text("name: api\n")
    before = sorted(p.name for p in trials.rglob("*"))
    with pytest.raises(api.SearchkdError, match="already exists: add --resume"):
        api.tune(tiny_space("api"), trials_dir=trials)
    with pytest.raises(api.SearchkdError, match="not a search directory"):
        api.resume(tmp_path)
    with pytest.raises(api.SearchkdError, match="--num-cpus sets the CPUs of a local Ray"):
        api.tune(tiny_space("other"), trials_dir=trials, address="auto", num_cpus=1)
    with pytest.raises(api.SearchkdError, match="the driver's files"):
        api.trials_root("s3://bucket/trials")
    assert sorted(p.name for p in trials.rglob("*")) == before


def test_results_are_the_records_rows_ordered_by_trial_and_epoch(tmp_path: Path) -> None:
    search = tmp_path / "s"
    search.mkdir()
    (search / "space.yaml").write_text("name: s\n")
    assert api.results(search).empty
    rows = [
        {
            "trial_number": n,
            "epoch": e,
            "val_acc": n + e / 10,
            "timestamp": 10.0 * e + n,
            "objective": "msd",
            "config": json.dumps({"loss.tau": 0.1 * (n + 1), "loss.scales": [1, 2], "seed": n}),
        }
        for e in (1, 2)
        for n in (1, 0)
    ]
    (search / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    frame = api.results(search)
    assert list(zip(frame.trial_number, frame.epoch, strict=True)) == [
        (0, 1),
        (0, 2),
        (1, 1),
        (1, 2),
    ]
    assert frame.val_acc.tolist() == [0.1, 0.2, 1.1, 1.2]
    # The config is one column per searched key, named as Ray Tune names them.
    assert "config" not in frame.columns and frame.objective.tolist() == ["msd"] * 4
    assert frame["config/loss.tau"].tolist() == [0.1, 0.1, 0.2, 0.2]
    assert frame["config/seed"].tolist() == [0, 0, 1, 1]
    assert frame["config/loss.scales"].tolist() == [[1, 2]] * 4


def test_a_summary_shows_config_floats_rounded() -> None:
    """The summary's config line: 3 significant digits (the exact values are in the table and
    `searchkd best`'s config.yaml), lists and the rest as they are."""
    assert api.shown(7.676576229980498) == "7.68" and api.shown(0.08231) == "0.0823"
    assert api.shown([1, 2]) == "[1, 2]" and api.shown(4005745526) == "4005745526"
    assert api.shown("msd") == '"msd"'
