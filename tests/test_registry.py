"""One registry type for models, datasets, objectives and samplers, and what it promises:
a new part is one file that registers itself, and everything downstream lists it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
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
from searchkd.spec import Spec, SpecError
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
    assert {"gp", "nsga2", "random", "tpe"} <= set(SAMPLERS.names())


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


@contextlib.contextmanager
def plug_in(tmp_path: Path, registry: Registry, package: str, source: str) -> Iterator[None]:
    """A package holding one new part's file, loaded as searchkd's own packages load theirs;
    the registry is as it was afterwards."""
    pkg = tmp_path / package
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "toy.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    saved = dict(registry.entries)
    try:
        load_package(package, [str(pkg)])
        yield
    finally:
        registry.entries.clear()
        registry.entries.update(saved)
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith(package)]:
            del sys.modules[name]


@pytest.fixture
def toy_package(tmp_path: Path):
    with plug_in(tmp_path, OBJECTIVES, "extra_objectives", NEW_OBJECTIVE):
        yield


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
        == f"searchkd: error: {path}: search.sampler: unknown sampler 'cmaes2'; known: "
        + ", ".join(SAMPLERS.names())
    )


NEW_MODEL = '''\
"""toy: two conv stages and a linear head (a test's own model)."""
from torch import nn
from searchkd.models.base import Features, TappedModel, register_model, run_stages, scaled


class Toy(TappedModel):
    def __init__(self, num_classes, width=1.0, in_channels=3, image_size=32):
        super().__init__()
        c1, c2 = scaled(8, width), scaled(16, width)
        self.stem = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU()),
        ])
        self.stage_channels, self.feature_dim = [c1, c2], c2
        self.fc = nn.Linear(c2, num_classes)

    def forward_features(self, x):
        stem = self.stem(x)
        out, maps = run_stages(self.stages, stem)
        pool = out.mean((2, 3))
        return Features(stem=stem, stages=maps, pool=pool, logits=self.fc(pool))


@register_model("toy_net")
def toy_net(num_classes, width=1.0, in_channels=3, image_size=32, **kw):
    return Toy(num_classes, width, in_channels, image_size)
'''


def test_a_new_model_file_is_held_to_the_zoo_contract(tmp_path: Path) -> None:
    """The zoo's contract tests are parametrised over `model_names()`: a model file that
    registers itself is among them, and passes them, without editing a list."""
    import test_models

    from searchkd.models import model_names

    with plug_in(tmp_path, MODELS, "extra_models", NEW_MODEL):
        assert "toy_net" in model_names()
        test_models.test_builds_runs_and_exposes_taps("toy_net")
        test_models.test_digits_sized_grayscale_input_trains("toy_net")
        test_models.test_width_grows_parameter_count("toy_net")
    assert "toy_net" not in model_names()


NEW_DATASET = '''\
"""toy: four classes of constant grey images (a test's own dataset)."""
import torch
from searchkd.data.base import ArrayDataset, register_dataset


@register_dataset("toy_grey")
def toy_grey(root=None, download=False, size=40):
    y = torch.arange(size) % 4
    x = (y * 60).to(torch.uint8)[:, None, None, None].expand(size, 1, 8, 8).contiguous()
    return ArrayDataset(x, y, x[:8], y[:8], 4, (0.5,), (0.25,), 1, False)
'''


def test_a_new_dataset_file_is_validated_and_served(tmp_path: Path) -> None:
    """A dataset file that registers itself is a `data.dataset` (its keyword options become
    `data.options`) and is served by the engine's one entry point."""
    from searchkd.api import load_space
    from searchkd.data import build_loaders

    with plug_in(tmp_path, DATASETS, "extra_datasets", NEW_DATASET):
        raw = tiny_space("grey", data={"dataset": "toy_grey", "options": {"size": 48}})
        assert load_space(raw).data.dataset == "toy_grey"
        with pytest.raises(SpecError, match="data.options.colour: not an option of dataset"):
            load_space(tiny_space("grey", data={"dataset": "toy_grey", "options": {"colour": 1}}))
        loaders = build_loaders("toy_grey", val_fraction=0.25, batch_size=8, size=48)
        assert loaders.num_classes == 4 and loaders.num_train == 36
        x, y, _ = next(iter(loaders.train))
        assert x.shape[1:] == (1, 8, 8) and len(y) == 8


NEW_SAMPLER = '''\
"""toy: Optuna's random sampler under another name (a test's own sampler)."""
import optuna
from searchkd.samplers import SAMPLERS


@SAMPLERS.register("toy_random")
def toy_random(spec, seed):
    return optuna.samplers.RandomSampler(seed=seed)
'''


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_a_sampler_proposes_what_its_trial_number_decides(name: str) -> None:
    """Every registered sampler, given the same study and trial number, proposes the same
    values (a resumed search proposes what an uninterrupted one would)."""
    import optuna

    from searchkd.api import load_space
    from searchkd.samplers import make_sampler
    from searchkd.search import search_space

    spec = load_space(tiny_space("s", search={**tiny_space()["search"], "sampler": name}))
    space = search_space(spec, {o: set() for o in spec.objectives})

    def proposed() -> list[dict]:
        study = optuna.create_study(directions=["maximize"])
        out = []
        for number in range(3):
            study.sampler = make_sampler(spec, number)
            trial = study.ask()
            out.append(space(trial))
            study.tell(trial, float(number))
        return out

    assert proposed() == proposed()


def test_a_new_sampler_is_named_in_spaces_and_held_to_the_same_test(tmp_path: Path) -> None:
    from searchkd.api import load_space

    with plug_in(tmp_path, SAMPLERS, "extra_samplers", NEW_SAMPLER):
        assert "toy_random" in SAMPLERS.names()
        raw = tiny_space("s", search={**tiny_space()["search"], "sampler": "toy_random"})
        assert load_space(raw).search.sampler == "toy_random"
        test_a_sampler_proposes_what_its_trial_number_decides("toy_random")
