"""Cross-objective searches and the shipped space files.

A search over `objective: {choice: [...]}` must keep each trial's MLflow run honest: the
objective it ran, and only the loss params that objective has (a kd run with a `loss.tau`
would claim a temperature that never acted). The shipped spaces must all validate, and the
spaces meant to share a cached teacher must ask for the very same one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import tiny_space, write_space
from mlflow.tracking import MlflowClient

from searchkd.api import load_space
from searchkd.cli import main
from searchkd.objectives import get_objective, objective_names
from searchkd.record import RESULTS_FILE
from searchkd.spec import Spec, teacher_key
from searchkd.trial import trial_spec

SPACES = Path(__file__).resolve().parent.parent / "spaces"
sys.path.insert(0, str(SPACES.parent / "bench"))
from digits_objectives import space_of  # noqa: E402  (the bench's own maker of digits spaces)

SHIPPED = ("ce", "kd", "crd", "msd", "stkd", "lfcc", "cktf")  # each has a digits-<o>.yaml
CIFAR = ("kd", "crd", "msd", "stkd", "cktf", "lfcc", "cross")


# ----------------------------------------------------------------- the shipped space files


def test_the_expected_spaces_are_shipped() -> None:
    names = {p.stem for p in SPACES.glob("*.yaml")}
    assert {
        *CIFAR,
        "quickstart",
        "fashion",
        *(f"digits-{o}" for o in SHIPPED),
        *(f"repro-{o}" for o in ("ce", "kd", "crd", "cktf")),
    } <= names


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_space_validates(
    path: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A teacher checkpoint named under ~ (the reproduction spaces') must exist and load.
    monkeypatch.setenv("HOME", str(tmp_path))
    checkpoint = Spec.model_validate(yaml.safe_load(path.read_text())).teacher.checkpoint
    if checkpoint and checkpoint.startswith("~/"):
        (tmp_path / checkpoint[2:]).parent.mkdir(parents=True)
        # its dataset is not on disk here, so validation only reads the checkpoint
        torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / checkpoint[2:])
    assert main(["validate", str(path)]) == 0
    assert f"{path}: ok" in capsys.readouterr().out


def test_cifar_spaces_share_one_teacher_and_the_published_recipe() -> None:
    """One 240-epoch resnet32x4 serves every CIFAR-100 space (the cache is keyed by content)."""
    specs = {name: load_space(SPACES / f"{name}.yaml") for name in CIFAR}
    keys = {name: teacher_key(s) for name, s in specs.items()}
    assert all(k == keys["kd"] for k in keys.values())
    assert keys["kd"]["arch"] == "resnet32x4" and keys["kd"]["data"]["dataset"] == "cifar100"
    for name, s in specs.items():
        assert s.train.epochs == 240 and s.train.batch_size == 64, name
        if name != "lfcc":  # the ViT student trains with AdamW; its teacher has the CNN recipe
            assert (s.train.lr, s.train.lr_milestones, s.train.weight_decay) == (
                0.05,
                [150, 180, 210],
                5.0e-4,
            )
        assert "student.width" in s.params, name
    assert specs["lfcc"].student.arch == "vit_tiny"
    assert specs["cross"].objectives == ["msd", "lfcc", "cktf"]


def test_digits_spaces_differ_only_by_objective() -> None:
    """The bench compares objectives: teacher (the quickstart's), student, recipe, seeds equal;
    it makes each registered objective's space from digits-ce.yaml as these files are made."""
    quickstart = teacher_key(load_space(SPACES / "quickstart.yaml"))
    dumps: dict[str, dict[str, Any]] = {}
    for o in objective_names():
        shipped = SPACES / f"digits-{o}.yaml"
        spec = load_space(shipped) if shipped.exists() else None
        assert spec is None or spec == load_space(space_of(o, SPACES / "digits-ce.yaml"))
        spec = spec or load_space(space_of(o, SPACES / "digits-ce.yaml"))
        assert spec.objective == o and not spec.params and not spec.loss
        assert spec.search.scheduler == "none" and spec.search.num_samples == 3
        assert teacher_key(spec) == quickstart  # the cached quickstart teacher is reused
        dumps[o] = spec.model_dump(exclude={"name", "objective"})
    assert all(d == dumps["ce"] for d in dumps.values())


def test_fixed_loss_key_of_one_objective_does_not_reach_the_others() -> None:
    """`loss: {memory: batch}` is valid for {choice: [kd, cktf]} (cktf has it); a kd trial must
    build its objective without it, as the engine does with `resolve(spec.loss)`."""
    raw = tiny_space("fixed", objective={"choice": ["kd", "cktf"]})
    raw["loss"], raw["params"] = {"memory": "batch"}, {}
    base = Spec.model_validate(raw).model_dump(mode="json", by_alias=True)
    spec = trial_spec(base, {"objective": "kd", "seed": 1, "trial_number": 0})
    assert get_objective(spec.objective).resolve(spec.loss)["kd_weight"] == 0.9


# ------------------------------------------------------------ a real cross-objective search

CROSS_PARAMS: dict[str, Any] = {
    "student.width": {"choice": [0.25, 0.5]},
    "loss.kd_temperature": {"float": [2.0, 6.0]},  # kd, msd, cktf
    "loss.tau": {"float": [0.05, 0.5], "log": True},  # msd, cktf
    "loss.scales": {"choice": [[1], [1, 2]]},  # msd
    "loss.inter_weight": {"float": [0.05, 0.5], "log": True},  # cktf
}


@pytest.mark.integration
def test_cross_objective_runs_carry_only_their_own_params(
    ray_session: None, tmp_path: Path
) -> None:
    trials = tmp_path / "trials"
    raw = tiny_space(
        "cross", objective={"choice": ["msd", "kd", "cktf"]}, train={"epochs": 1, "batch_size": 128}
    )
    # A fixed key all three declare; keys of only some objectives are covered by the test above.
    raw["loss"] = {"kd_weight": 0.5}
    raw["params"] = CROSS_PARAMS
    raw["search"].update(num_samples=4, sampler="random", seed=13)
    space = write_space(tmp_path / "cross.yaml", raw)
    assert main(["tune", str(space), "--trials-dir", str(trials)]) == 0

    client = MlflowClient(f"sqlite:///{trials / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cross")
    children = [
        r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags
    ]
    assert len(children) == 4
    seen = set()
    for run in children:
        objective = run.data.tags["objective"]
        assert run.info.status == "FINISHED", run.data.tags.get("error")
        assert run.data.params["objective"] == objective
        seen.add(objective)
        own = {
            k
            for k in CROSS_PARAMS
            if k.startswith("loss.")
            and k.removeprefix("loss.") in get_objective(objective).tunables
        }
        loss_params = {k for k in run.data.params if k.startswith("loss.")}
        assert loss_params == own, (objective, loss_params)
        assert {"student.width", "seed"} <= set(run.data.params)
    assert seen == {"msd", "kd", "cktf"}  # seed 13 draws msd, kd, cktf, msd
    kd = next(r for r in children if r.data.tags["objective"] == "kd")
    assert "loss.tau" not in kd.data.params and "loss.scales" not in kd.data.params

    # results.parquet names each row's objective too, the same as its run's tag.
    by_number = {int(r.data.tags["trial_number"]): r.data.tags["objective"] for r in children}
    rows = pq.read_table(trials / "cross" / RESULTS_FILE).to_pylist()
    assert {(r["trial_number"], r["objective"]) for r in rows} == set(by_number.items())
