"""One registry type for models, datasets, objectives and samplers, and what it promises:
a new part is one file that registers itself, and everything downstream lists it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_space

from searchkd.cli import main
from searchkd.data import DATASETS
from searchkd.engine import Engine
from searchkd.models import MODELS
from searchkd.objectives import OBJECTIVES
from searchkd.registry import Registry, load_package
from searchkd.samplers import SAMPLERS
from searchkd.spec import Spec
from searchkd.teacher import ensure_teacher


def test_a_name_registers_once_and_an_unknown_one_is_one_line() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("a", "b")(1)
    assert (
        reg.names() == ["a", "b"] and reg.get("b") == 1 and "a" in reg and list(reg) == ["a", "b"]
    )
    with pytest.raises(ValueError, match="widget 'a' registered twice"):
        reg.add("a", 2)
    assert reg.get("a") == 1
    with pytest.raises(KeyError, match="unknown widget 'c'; known: a, b"):
        reg.get("c")


def test_the_shipped_parts_are_registered() -> None:
    assert {"ce", "kd", "crd", "msd", "stkd", "lfcc", "cktf"} <= set(OBJECTIVES.names())
    assert {"resnet8", "resnet8x4", "resnet32x4", "wrn_40_2", "wrn_16_2", "vit_tiny"} <= set(
        MODELS.names()
    )
    assert {"digits", "cifar10", "cifar100", "imagefolder"} <= set(DATASETS.names())
    assert SAMPLERS.names() == ["gp", "nsga2", "random", "tpe"]


NEW_OBJECTIVE = '''\
"""toy: the student's logits pulled towards the teacher's (a test's own objective)."""
from searchkd.objectives.base import Objective, Tunable, common_tunables, register_objective


@register_objective
class Toy(Objective):
    name = "toy"
    tunables = {**common_tunables(weight=1.0),
                "gain": Tunable("float", 0.5, "how hard", {"float": [0.1, 1.0]})}

    def distill(self, s, t, y, index):
        return self.hp["gain"] * (s.logits - t.logits.detach()).pow(2).mean()
'''


@pytest.fixture
def toy_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A package holding one new objective file, loaded as searchkd's own packages load theirs."""
    pkg = tmp_path / "extra_objectives"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "toy.py").write_text(NEW_OBJECTIVE)
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = dict(OBJECTIVES.entries)
    load_package("extra_objectives", [str(pkg)])
    yield
    OBJECTIVES.entries.clear()
    OBJECTIVES.entries.update(saved)
    for name in [m for m in sys.modules if m.startswith("extra_objectives")]:
        del sys.modules[name]


def test_a_new_objective_file_is_listed_validated_and_trained(
    toy_package, capsys, tmp_path: Path
) -> None:
    assert "toy" in OBJECTIVES
    assert main(["objectives"]) == 0
    out = capsys.readouterr().out
    assert "toy: toy: the student's logits pulled towards the teacher's" in out
    assert "loss.gain" in out
    raw = tiny_space("toy", objective="toy")
    raw["loss"] = {}
    raw["params"] = {"loss.gain": {"float": [0.2, 0.8]}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 0
    assert "toy: " in capsys.readouterr().out
    # and the engine trains a student under it, the teacher trained once from the space's recipe
    spec = Spec.model_validate({**raw, "params": {}})
    teacher = ensure_teacher(spec, tmp_path / "teachers", log=lambda _: None).path
    row = Engine(spec, seed=0, teacher_checkpoint=teacher, device="cpu").run_epoch()
    assert row["epoch"] == 1 and 0 <= row["val_acc"] <= 1 and row["loss_toy"] > 0


def test_an_unknown_sampler_is_one_line_naming_the_registered_ones(tmp_path: Path, capsys) -> None:
    raw = tiny_space("s")
    raw["search"]["sampler"] = "cmaes2"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"searchkd: error: {path}: search.sampler: unknown sampler 'cmaes2'; known: gp, nsga2, "
        "random, tpe"
    )
