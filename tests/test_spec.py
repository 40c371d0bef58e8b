"""The space file: parsing, validation (one line naming file and key) and resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny_space, write_space

from searchkd import spec as S
from searchkd.api import load_space, lookups


def check(space: dict, tmp_path: Path):
    return S.load(write_space(tmp_path / "s.yaml", space), **lookups())


def test_tiny_space_validates_and_resolves(tmp_path: Path) -> None:
    spec = check(tiny_space(), tmp_path)
    assert spec.objectives == ["msd"]
    resolved = spec.resolved({"student.width": 0.5, "loss.scales": [1], "loss.tau": 0.2})
    assert resolved.student.width == 0.5
    assert resolved.loss["scales"] == [1] and resolved.loss["tau"] == 0.2
    assert resolved.loss["dim"] == 16  # fixed loss values survive
    assert spec.student.width == 0.25  # the base spec is not mutated


def test_quickstart_space_is_valid() -> None:
    spec = load_space(Path(__file__).parents[1] / "spaces" / "quickstart.yaml")
    assert spec.search.num_samples >= 8 and spec.search.scheduler == "asha"
    searched = set(spec.params)
    assert {
        "student.width",
        "loss.kd_weight",
        "loss.kd_temperature",
        "loss.weight",
        "loss.tau",
        "loss.scales",
    } <= searched


BAD = [
    # (mutation of the tiny space, expected fragment of the one-line error)
    (lambda s: s["student"].update(widht=1), "student.widht: unknown key"),
    (lambda s: s["student"].update(width=0), "student.width"),
    (lambda s: s.update(objective="nope"), "objective: unknown objective 'nope'"),
    (lambda s: s["student"].update(arch="resnet9000"), "student.arch: unknown arch 'resnet9000'"),
    (lambda s: s["data"].update(dataset="mnist"), "data.dataset: unknown dataset 'mnist'"),
    (
        lambda s: s["params"].update({"loss.tau": {"float": [0.5, 0.1]}}),
        "params.loss.tau: range low 0.5 > high 0.1",
    ),
    (
        lambda s: s["params"].update({"loss.tau": {"float": [0.0, 0.1], "log": True}}),
        "log range must be > 0",
    ),
    (
        lambda s: s["params"].update({"loss.tau": {"choice": []}}),
        "choice must list at least one value",
    ),
    (
        lambda s: s["params"].update({"loss.bogus": {"choice": [1]}}),
        "params.loss.bogus: unknown loss key 'bogus'; valid:",
    ),
    (
        lambda s: s["params"].update({"loss.pooling": {"choice": ["grid", "max"]}}),
        "params.loss.pooling: loss.pooling must be one of",
    ),
    (
        lambda s: s["params"].update({"teacher.arch": {"choice": ["a"]}}),
        "params.teacher.arch: not a searchable key",
    ),
    (
        lambda s: s["params"].update({"train.lr": {"float": [-1.0, 0.1]}}),
        "params.train.lr: value -1.0",
    ),
    (lambda s: s["loss"].update(bogus=1), "loss.bogus: unknown key"),
    (
        lambda s: s["search"].update(
            metric=["val_acc", "student_macs"], mode=["max", "min"], scheduler="asha"
        ),
        "ASHA stops trials on one metric",
    ),
    (lambda s: s["search"].update(metric="accuracy"), "search.metric: 'accuracy' is not reported"),
    (lambda s: s["search"].update(num_samples=0), "search.num_samples"),
    (lambda s: s.update(name="../escape"), "name: must be letters"),
    (lambda s: s["teacher"].pop("train"), "teacher: give teacher.checkpoint or teacher.train"),
    (lambda s: s.pop("student"), "student: required key is missing"),
    (lambda s: s["train"].update(epochs="ten"), "train.epochs: Input should be a valid integer"),
    (
        lambda s: s["train"].update(precision="fp8"),
        "train.precision: Input should be 'fp32' or 'bf16'",
    ),
    (
        lambda s: s["data"].update(val_fraction=1.5),
        "data.val_fraction: Input should be less than 1",
    ),
    (
        lambda s: s["data"].update(val_fraction=-0.1),
        "data.val_fraction: Input should be greater than or equal to 0",
    ),
    (
        lambda s: s["data"].update(val_fraction=0.0),
        "search.metric: 'val_acc' is measured on the validation split, but data.val_fraction can "
        "be 0",
    ),
    (
        lambda s: s["params"].update({"data.val_fraction": {"float": [0.0, 0.2]}}),
        "search.metric: 'val_acc' is measured on the validation split",
    ),
    (
        lambda s: s["search"].update(metric="test_acc"),
        "search.metric: 'test_acc' is measured on the test split",
    ),
    (
        lambda s: s["train"].update(nesterov=True, momentum=0.0),
        "train: nesterov applies to optimizer sgd with momentum > 0",
    ),
    (
        lambda s: s["train"].update(nesterov=True, optimizer="adamw"),
        "train: nesterov applies to optimizer sgd",
    ),
    # Every term weighted 0: no loss to train on (it would fail in the first batch).
    (
        lambda s: s.update(objective="kd", loss={"ce_weight": 0, "kd_weight": 0}),
        "loss: objective kd can have every term weighted 0 (ce_weight: 0, kd_weight: 0)",
    ),
    (
        lambda s: s.update(
            objective="ce", loss={}, params={"loss.ce_weight": {"choice": [0.0, 1.0]}}
        ),
        "loss: objective ce can have every term weighted 0",
    ),
    # Non-finite values, steps that cannot step and seeds no generator takes (issue 21).
    (
        lambda s: s["params"].update({"loss.tau": {"float": [float("nan"), 0.5]}}),
        "params.loss.tau: range bounds must be finite numbers, got [nan, 0.5]",
    ),
    (
        lambda s: s["params"].update({"loss.tau": {"float": [0.1, float("inf")]}}),
        "params.loss.tau: range bounds must be finite numbers, got [0.1, inf]",
    ),
    (
        lambda s: s["params"].update({"loss.tau": {"float": [0.1, 0.5], "step": 0}}),
        "params.loss.tau.step: Input should be greater than 0",
    ),
    (
        lambda s: s["params"].update({"train.epochs": {"int": [1, 4], "step": -1}}),
        "params.train.epochs.step: Input should be greater than 0",
    ),
    (
        lambda s: s["params"].update({"train.epochs": {"int": [1, 4], "step": 0.5}}),
        "params.train.epochs: the step of an int range is a whole number, got 0.5",
    ),
    (lambda s: s["student"].update(width=float("inf")), "student.width: Input should be a finite"),
    (lambda s: s["train"].update(lr=float("nan")), "train.lr: Input should be a finite number"),
    (lambda s: s["search"].update(seed=2**80), "search.seed: must be in [0, 2**64), got 1208925"),
    (lambda s: s["search"].update(seed=-1), "search.seed: must be in [0, 2**64), got -1"),
]


@pytest.mark.parametrize(("mutate", "fragment"), BAD)
def test_bad_input_is_one_clear_line(tmp_path: Path, mutate, fragment: str) -> None:
    space = tiny_space()
    mutate(space)
    with pytest.raises(S.SpecError) as err:
        check(space, tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "s.yaml") + ": ")
    assert fragment in message


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nobjective: [msd\n")
    with pytest.raises(S.SpecError, match=r"broken.yaml: YAML syntax error \(line \d+"):
        S.load(path)


def test_a_space_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- msd\n- kd\n")
    with pytest.raises(S.SpecError, match="list.yaml: a space file is a YAML mapping"):
        S.load(path)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(S.SpecError, match="YAML"):
        S.load(path)


def test_choice_of_objectives_checks_loss_keys_against_the_union(tmp_path: Path) -> None:
    space = tiny_space(objective={"choice": ["msd", "kd"]})
    spec = check(space, tmp_path)
    assert spec.objectives == ["msd", "kd"]
    space["params"]["loss.kd_weight"] = {"float": [0.0, 1.0]}
    check(space, tmp_path)


def test_to_yaml_round_trips(tmp_path: Path) -> None:
    spec = check(tiny_space(), tmp_path)
    again = S.Spec.model_validate(yaml.safe_load(spec.to_yaml()))
    assert again == spec


def test_a_run_without_val_split_that_selects_nothing_is_valid(tmp_path: Path) -> None:
    """A reproduction: every training image trained on, one trial, no params, last-epoch test
    accuracy reported as its metric (nothing is chosen on it)."""
    space = tiny_space(
        data={"dataset": "digits", "val_fraction": 0.0},
        search={**tiny_space()["search"], "num_samples": 1, "metric": "test_acc_last"},
    )
    space["params"] = {}
    spec = check(space, tmp_path)
    assert spec.data.val_fraction == 0.0 and spec.metrics == ["test_acc_last"]
    assert spec.train.nesterov is False  # plain momentum unless asked
    space["search"]["num_samples"] = 2  # two trials: the better one would be chosen on test
    with pytest.raises(S.SpecError, match="'test_acc_last' is measured on the test split"):
        check(space, tmp_path)


def test_yaml_aliases_and_huge_files_are_refused_before_they_expand(tmp_path) -> None:
    """A "billion laughs" file (aliases of aliases) would expand to gigabytes; it is refused
    from its events, before anything is built, in one short line."""
    from searchkd.spec import MAX_SPACE_BYTES, SpecError, parse

    laughs = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n"
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        laughs += (
            f"{cur}: &{cur} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},"
            f"*{prev}]\n"
        )
    with pytest.raises(
        SpecError, match=r"^x\.yaml: YAML alias \*a \(line 2\): aliases are not allowed"
    ) as err:
        parse(laughs, "x.yaml")
    assert len(str(err.value)) < 200
    inside = "name: t\ndata: {dataset: synthetic, options: {x: &x [1, 2], y: *x}}\n"
    with pytest.raises(SpecError, match="aliases are not allowed"):
        parse(inside, "x.yaml")
    with pytest.raises(SpecError, match=r"at most 1 MiB; this one is 1\.0 MiB"):
        parse("#" * (MAX_SPACE_BYTES + 10), "x.yaml")


def test_values_quoted_in_messages_are_cut_short(space_file) -> None:
    from searchkd.api import load_space

    path = space_file(student={"arch": "resnet" + "9" * 5000})
    with pytest.raises(S.SpecError) as err:
        load_space(path)
    assert len(str(err.value)) < 1000 and "..." in str(err.value)


def test_dataset_options_are_checked_when_the_space_is_validated(space_file) -> None:
    from searchkd.api import load_space

    path = space_file(
        data={"dataset": "imagefolder", "root": "/nowhere", "options": {"image_sise": 64}}
    )
    with pytest.raises(
        S.SpecError,
        match=r"data\.options\.image_sise: not an option of dataset imagefolder; "
        r"valid: image_size, num_workers, resize_size",
    ):
        load_space(path)
    with pytest.raises(
        S.SpecError, match=r"data\.options\.size: not an option of dataset digits; valid: none"
    ):
        load_space(space_file(data={"dataset": "digits", "options": {"size": 1}}))
