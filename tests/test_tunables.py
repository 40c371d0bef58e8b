"""The objectives' tunables: the published constants, defaults inside their own search ranges,
and weights that weigh the term they name and no other.

A tunable that exists but acts on nothing (kd's old `weight`, which replaced the real KD term
by `weight · 0`) makes a search look at a knob that does not exist; these tests pin that it
cannot happen again, for every objective registered now or later.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_objectives import CTX, NUM_CLASSES, SIZE, cnn, features, hp_for

from searchkd.objectives import (
    OBJECTIVES,
    Objective,
    common_tunables,
    get_objective,
    objective_names,
    register_objective,
)

ALL = objective_names()


def inside(tunable_search: dict, value: object) -> bool:
    if "choice" in tunable_search:
        return value in tunable_search["choice"]
    kind = "float" if "float" in tunable_search else "int"
    low, high = tunable_search[kind]
    return low <= value <= high


@pytest.mark.parametrize("name", ALL)
def test_every_default_lies_inside_its_own_search_range(name: str) -> None:
    """A search that never samples the default cannot find the published setting again."""
    for key, tunable in get_objective(name).tunables.items():
        assert inside(dict(tunable.search), tunable.default), (
            f"{name}.{key}: default {tunable.default!r} outside {dict(tunable.search)}"
        )


PUBLISHED = {
    # Tian et al. 2020 (CRD): 16384 negatives, τ 0.07, 128-d heads, bank momentum 0.5,
    # weight 0.8 on the NCE term beside CE at 1 and no KD.
    "crd": {
        "negatives": 16384,
        "tau": 0.07,
        "dim": 128,
        "momentum": 0.5,
        "weight": 0.8,
        "ce_weight": 1.0,
        "kd_weight": 0.0,
    },
    # Hinton et al. 2015 as the CRD paper's KD baseline runs it: T 4, 0.1 CE + 0.9 KD.
    "kd": {"kd_temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
    # CKTF's CIFAR-100 scripts: τ 0.1, final term 0.8, intermediate terms 0.1, CE 1, no KD,
    # 128-d heads and 16384 negatives of memory banks.
    "cktf": {
        "tau": 0.1,
        "weight": 0.8,
        "inter_weight": 0.1,
        "ce_weight": 1.0,
        "kd_weight": 0.0,
        "dim": 128,
        "negatives": 16384,
        "memory": "bank",
    },
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_defaults_are_the_published_constants(name: str) -> None:
    assert {k: get_objective(name).resolve({})[k] for k in PUBLISHED[name]} == PUBLISHED[name]


def test_cktf_banks_use_the_crd_momentum() -> None:
    from searchkd.objectives.cktf import CRD_MOMENTUM

    assert CRD_MOMENTUM == 0.5


# -- weights weigh their own term, and no own term replaces a label term ------------------------


def test_kd_declares_no_weight_of_its_own() -> None:
    """kd has no L_obj: a `weight` would be a dead knob (and used to zero the KD term)."""
    kd = get_objective("kd")
    assert "weight" not in kd.tunables
    with pytest.raises(KeyError, match="unknown loss key 'weight'"):
        kd.resolve({"weight": 1.0})


def ref_kd(zs: list[list[float]], zt: list[list[float]], temp: float) -> float:
    """KL(softmax(z_t/T) ‖ softmax(z_s/T)) · T², batch mean, in plain Python."""

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    total = 0.0
    for rs, rt in zip(zs, zt, strict=True):
        ps, pt = softmax(rs), softmax(rt)
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))
    return total / len(zs) * temp**2


@pytest.mark.parametrize("name", [n for n in ALL if "kd_weight" in get_objective(n).tunables])
def test_the_kd_term_is_kd_whatever_the_objectives_own_weights(name: str) -> None:
    """With every own weight at the top of its search range, the `kd` term is still
    kd_weight · KD(z_s, z_t; T) computed independently: no own term can take its place."""
    cls = get_objective(name)
    torch.manual_seed(0)
    teacher = cnn("resnet14", seed=1).eval().requires_grad_(False)
    student = cnn("resnet8", seed=2).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, SIZE, SIZE, generator=g)
    y = torch.arange(8) % NUM_CLASSES
    index = torch.arange(8)
    top = {
        w: cls.tunables[w].search.get("float", [None, 1.0])[1]
        for w in cls.own_term_weights().values()
    }
    hp = hp_for(name, kd_weight=0.7, kd_temperature=3.0, mix_alpha=0.0, **top)
    obj = cls(hp, features(teacher, x), features(student, x), CTX)
    _, terms = obj(student, teacher, x, y, index)
    zs, zt = student(x).tolist(), teacher(x).tolist()
    assert terms["kd"].item() == pytest.approx(0.7 * ref_kd(zs, zt, 3.0), rel=1e-5)


def test_an_own_term_named_like_a_label_term_is_refused() -> None:
    from searchkd.objectives import with_own_terms

    class Shadow(Objective):
        name = "kd"
        tunables = common_tunables()

    class Twin(Objective):
        name = "twin"
        tunables = {**common_tunables(), "inter_weight": common_tunables()["weight"]}

        @classmethod
        def own_term_weights(cls) -> dict[str, str]:
            return {"twin": "weight", "ce": "inter_weight"}

    registered = dict(OBJECTIVES.entries)
    with pytest.raises(ValueError, match="would overwrite the kd label term"):
        register_objective(Shadow)
    with pytest.raises(ValueError, match="would overwrite the ce label term"):
        register_objective(Twin)
    assert registered == OBJECTIVES.entries  # the registry is untouched

    ones = torch.ones(())
    with pytest.raises(ValueError, match="replace the ce label term"):
        with_own_terms({"ce": ones}, {"ce": 2 * ones})
    assert with_own_terms({"ce": ones}, {"msd": ones}).keys() == {"ce", "msd"}


@pytest.mark.parametrize("name", ALL)
def test_own_term_keys_never_collide_with_label_terms(name: str) -> None:
    from searchkd.objectives import LABEL_TERMS

    own = get_objective(name).own_term_weights()
    assert not set(own) & set(LABEL_TERMS)
    for weight in own.values():
        assert weight in get_objective(name).tunables
