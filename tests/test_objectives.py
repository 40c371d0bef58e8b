"""Sanity properties of every registered objective and known values of each.

The generic tests are parametrised over `objective_names()`, so an objective added later is
held to the same properties without touching this file. Known values are computed with
plain-Python formulas, independent of the code under test. Models are tiny (width-0.25
CIFAR ResNets on 8×8 inputs) so the file runs in seconds on two CPU cores.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_space
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from searchkd.api import load_space
from searchkd.models import Features, TappedModel, build_model
from searchkd.objectives import Objective, ObjectiveContext, get_objective, objective_names
from searchkd.objectives.cktf import layer_pairs, teacher_stage_for
from searchkd.objectives.crd import ContrastMemory, LabelBook
from searchkd.objectives.lfcc import dct_lowpass, dct_matrix
from searchkd.objectives.stkd import mixup, similarity_transfer
from searchkd.spec import SpecError

NUM_CLASSES = 5
NUM_TRAIN = 32
BATCH = 8
SIZE = 8
CTX = ObjectiveContext(NUM_CLASSES, NUM_TRAIN)
# Cheaper than the defaults, applied wherever an objective has the key.
SMALL = {"dim": 16, "negatives": 8}
ALL = objective_names()


def has_own_term(name: str) -> bool:
    """Objectives with a term of their own (kd and ce have none)."""
    return bool(get_objective(name).own_term_weights())


def hp_for(name: str, **overrides: object) -> dict[str, object]:
    keys = get_objective(name).tunables
    hp = {k: v for k, v in SMALL.items() if k in keys}
    hp.update({k: v for k, v in overrides.items() if k in keys})
    return hp


def deterministic_negatives(self: LabelBook, index: Tensor, y: Tensor, k: int) -> Tensor:
    """A negative draw that depends only on the sample's index: order-free, seed-free."""
    return (index[:, None] + torch.arange(1, k + 1, device=index.device)) % self.labels.numel()


class Fixed(TappedModel):
    """A 'model' that returns given features, for hand-made inputs."""

    def __init__(self, features: Features) -> None:
        super().__init__()
        self.features = features

    def forward_features(self, x: Tensor) -> Features:
        return self.features


def token_model(arch: str) -> TappedModel:
    return build_model(arch, NUM_CLASSES, width=1 / 16, image_size=SIZE, depth=2, patch=2)


def cnn(arch: str = "resnet8", seed: int = 0) -> TappedModel:
    torch.manual_seed(seed)
    return build_model(arch, NUM_CLASSES, width=0.25, image_size=SIZE)


@pytest.fixture(scope="module")
def pair() -> tuple[TappedModel, TappedModel]:
    teacher = cnn("resnet14", seed=1).eval().requires_grad_(False)
    return teacher, cnn("resnet8", seed=2)


@pytest.fixture(scope="module")
def batch() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    y = torch.arange(BATCH) % NUM_CLASSES
    index = torch.randperm(NUM_TRAIN, generator=g)[:BATCH]
    return x, y, index


def features(model: TappedModel, x: Tensor) -> Features:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model.forward_features(x)
    model.train(was)
    return out


def build(
    name: str,
    teacher: TappedModel,
    student: TappedModel,
    x: Tensor,
    seed: int = 0,
    **overrides: object,
) -> Objective:
    torch.manual_seed(seed)
    return get_objective(name)(
        hp_for(name, **overrides), features(teacher, x), features(student, x), CTX
    )


def run(
    obj: Objective, student: TappedModel, teacher: TappedModel, batch, seed: int = 0
) -> dict[str, Tensor]:
    x, y, index = batch
    torch.manual_seed(seed)
    return obj(student, teacher, x, y, index)[1]


def permuted(f: Features, perm: Tensor) -> Features:
    return Features(
        stem=f.stem[perm],
        stages=[m[perm] for m in f.stages],
        pool=f.pool[perm],
        logits=f.logits[perm],
    )


def own_loss(obj: Objective, s: Features, t: Features, y: Tensor, index: Tensor | None) -> Tensor:
    """The objective's own terms, weighted and summed (L_obj as it enters the loss)."""
    return sum(obj.own_terms(s, t, y, index).values())


def tie_heads(obj: Objective) -> None:
    """Shared heads: the student side becomes a copy of the teacher side."""
    if hasattr(obj, "student_heads"):
        obj.student_heads.load_state_dict(obj.teacher_heads.state_dict())


# -- generic properties -----------------------------------------------------------------------


def test_registry_has_every_objective_of_the_spec() -> None:
    assert {"ce", "kd", "crd", "msd", "stkd", "lfcc", "cktf"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_finite_loss_and_gradients_reach_student_and_heads_not_teacher(name, batch) -> None:
    teacher = cnn("resnet14", seed=1).eval()  # requires_grad left on: nothing may reach it
    student = cnn("resnet8", seed=2)
    obj = build(name, teacher, student, batch[0])
    terms = run(obj, student, teacher, batch)
    loss = sum(terms.values())
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in terms.values())
    if has_own_term(name):
        # The objective's own terms alone must already train the student and every head.
        sum(terms[k] for k in get_objective(name).own_term_weights()).backward(retain_graph=True)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        for pname, p in obj.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        heads = {n.split(".")[0] + "." + n.split(".")[1] for n, _ in obj.named_parameters()}
        for head in heads:
            grads = [p.grad.abs().sum() for n, p in obj.named_parameters() if n.startswith(head)]
            assert sum(grads) > 0, head
    student.zero_grad()
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("name", ALL)
def test_resolve_rejects_unknown_key_naming_valid_ones(name) -> None:
    cls = get_objective(name)
    with pytest.raises(KeyError) as err:
        cls.resolve({"no_such_key": 1.0})
    message = str(err.value)
    assert "no_such_key" in message and name in message
    for key in cls.tunables:
        assert key in message


@pytest.mark.parametrize("name", ALL)
def test_defaults_pass_their_own_checks_and_search_ranges_are_declared(name) -> None:
    cls = get_objective(name)
    assert cls.resolve({}) == {k: t.default for k, t in cls.tunables.items()}
    for key, tunable in cls.tunables.items():
        assert tunable.search, f"{name}.{key} declares no search range"
        tunable.check(key, tunable.default)


@pytest.mark.parametrize("name", ALL)
def test_state_round_trips_through_a_weights_only_checkpoint(name, pair, batch) -> None:
    teacher, student = pair
    student.eval()
    first = build(name, teacher, student, batch[0], seed=0)
    run(first, student, teacher, batch, seed=5)  # fill banks, labels and Z
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    second = build(name, teacher, student, batch[0], seed=1)  # different heads and banks
    second.load_state_dict(state)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    a = run(first, student, teacher, batch, seed=6)
    b = run(second, student, teacher, batch, seed=6)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


@pytest.mark.parametrize("name", ALL)
def test_loss_is_invariant_to_batch_order(name, pair, batch, monkeypatch) -> None:
    monkeypatch.setattr(LabelBook, "sample_negatives", deterministic_negatives)
    teacher, student = pair
    student.eval()
    x, y, index = batch
    obj = build(name, teacher, student, x, mix_alpha=0.0)  # stkd: mixup off
    other = copy.deepcopy(obj)
    perm = torch.randperm(BATCH, generator=torch.Generator().manual_seed(7))
    a = run(obj, student, teacher, (x, y, index))
    b = run(other, student, teacher, (x[perm], y[perm], index[perm]))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    for key, value in obj.state_dict().items():  # banks updated the same way
        torch.testing.assert_close(value, other.state_dict()[key])


def aligned_and_shuffled(
    obj: Objective, t: Features, y: Tensor, index: Tensor, warmup: int = 8
) -> tuple[float, float]:
    """L_obj with student features equal to the teacher's vs the same features shuffled
    across the batch, heads shared; memory banks first filled with the aligned features."""
    tie_heads(obj)
    with torch.no_grad():
        obj.train()
        for _ in range(warmup):
            own_loss(obj, t, t, y, index)
        obj.eval()  # no bank updates while comparing
        torch.manual_seed(0)
        aligned = own_loss(obj, t, t, y, index).item()
        torch.manual_seed(0)
        shuffled = own_loss(
            obj, permuted(t, torch.roll(torch.arange(len(y)), 1)), t, y, index
        ).item()
    return aligned, shuffled


@pytest.mark.parametrize("name", [n for n in ALL if has_own_term(n)])
def test_aligned_features_score_lower_than_shuffled(name, pair, batch) -> None:
    teacher, _ = pair
    x, y, index = batch
    t = features(teacher, x)
    torch.manual_seed(0)
    obj = get_objective(name)(hp_for(name), t, t, CTX)
    aligned, shuffled = aligned_and_shuffled(obj, t, y, index)
    assert aligned < shuffled


@pytest.mark.parametrize("name", ALL)
def test_each_weight_scales_its_own_term(name, pair, batch) -> None:
    teacher, student = pair
    student.eval()
    cls = get_objective(name)
    term_of = {
        "ce_weight": "ce",
        "kd_weight": "kd",
        **{weight: term for term, weight in cls.own_term_weights().items()},
    }
    keys = [k for k in term_of if k in cls.tunables]
    ones = {k: 1.0 for k in keys}
    base = run(build(name, teacher, student, batch[0], **ones), student, teacher, batch)
    for key in keys:
        doubled = run(
            build(name, teacher, student, batch[0], **{**ones, key: 2.0}), student, teacher, batch
        )
        torch.testing.assert_close(doubled[term_of[key]], 2 * base[term_of[key]])
        for other in base.keys() - {term_of[key]}:
            torch.testing.assert_close(doubled[other], base[other])
        zero = run(
            build(name, teacher, student, batch[0], **{**ones, key: 0.0}), student, teacher, batch
        )
        dropped = zero[term_of[key]].item() if term_of[key] in zero else 0.0
        assert dropped == 0.0  # a zero weight zeroes (or drops) the term


@pytest.mark.parametrize("name", ALL)
def test_every_term_weight_at_zero_leaves_no_loss_and_is_refused_in_validation(
    name, pair, batch
) -> None:
    teacher, student = pair
    zeros = dict.fromkeys(get_objective(name).term_weights(), 0.0)
    terms = run(build(name, teacher, student, batch[0], **zeros), student, teacher, batch)
    assert all(v.item() == 0.0 for v in terms.values())  # the weights validation knows are all
    space = {**tiny_space(), "objective": name, "loss": zeros, "params": {}}
    with pytest.raises(SpecError, match=f"^<space>: loss: objective {name} can have every term"):
        load_space(space)


def random_features(like: Features, seed: int = 0) -> Features:
    """Zero-mean features of the same shapes: samples not alike, unlike a random ReLU net's
    (whose pooled vectors all point the same way, so every negative is a near-positive)."""
    g = torch.Generator().manual_seed(seed)

    def rand(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=g)

    return Features(
        stem=rand(like.stem),
        stages=[rand(m) for m in like.stages],
        pool=rand(like.pool),
        logits=rand(like.logits),
    )


def aligned_and_shuffled_at(
    name: str, t: Features, y: Tensor, index: Tensor, taus: tuple[float, ...], **hp: object
) -> list[tuple[float, float]]:
    out = []
    for tau in taus:
        torch.manual_seed(0)
        obj = get_objective(name)(hp_for(name, tau=tau, **hp), t, t, CTX)
        out.append(aligned_and_shuffled(obj, t, y, index))
    return out


@pytest.mark.parametrize("name", [n for n in ALL if "tau" in get_objective(n).tunables])
def test_sharper_temperature_penalises_misalignment_more(name, pair, batch) -> None:
    """τ scales every logit: the smaller it is, the wider the gap between the loss of
    shuffled and aligned features. (The aligned loss alone need not fall: with crd's NCE and
    its Z fixed from the first batch, a small τ also magnifies every negative's score.)"""
    teacher, _ = pair
    x, y, index = batch
    t = random_features(features(teacher, x))
    gaps = [s - a for a, s in aligned_and_shuffled_at(name, t, y, index, (0.05, 0.2, 1.0, 5.0))]
    assert all(g > 0 for g in gaps)
    assert gaps == sorted(gaps, reverse=True)


@pytest.mark.parametrize(("name", "hp"), [("msd", {}), ("lfcc", {}), ("cktf", {"memory": "batch"})])
def test_sharper_temperature_lowers_in_batch_info_nce_of_aligned_features(
    name, hp, pair, batch
) -> None:
    """In-batch InfoNCE with the positive the most similar key, log(1 + Σ exp((s_j − 1)/τ)),
    grows with τ."""
    teacher, _ = pair
    x, y, index = batch
    t = random_features(features(teacher, x))
    aligned = [a for a, _ in aligned_and_shuffled_at(name, t, y, index, (0.05, 0.5, 5.0), **hp)]
    assert aligned == sorted(aligned)


@pytest.mark.parametrize("name", [n for n in ALL if "kd_temperature" in get_objective(n).tunables])
def test_kd_temperature_changes_the_value(name, pair, batch) -> None:
    teacher, student = pair
    student.eval()
    a = run(
        build(name, teacher, student, batch[0], kd_weight=1.0, kd_temperature=1.0),
        student,
        teacher,
        batch,
    )
    b = run(
        build(name, teacher, student, batch[0], kd_weight=1.0, kd_temperature=8.0),
        student,
        teacher,
        batch,
    )
    assert not torch.isclose(a["kd"], b["kd"])


# -- known values ------------------------------------------------------------------------------


def normalize(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def dot(a: list[float], b: list[float]) -> float:
    return sum(p * q for p, q in zip(a, b, strict=True))


def ref_info_nce(q: list[list[float]], k: list[list[float]], tau: float) -> float:
    total = 0.0
    for i, qi in enumerate(q):
        logits = [dot(qi, kj) / tau for kj in k]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return total / len(q)


def ref_sym(q: list[list[float]], k: list[list[float]], tau: float) -> float:
    return 0.5 * (ref_info_nce(q, k, tau) + ref_info_nce(k, q, tau))


def identity_(layer: nn.Module) -> None:
    with torch.no_grad():
        w = layer.weight.view(layer.weight.shape[0], -1)
        w.zero_()
        w[:, : min(w.shape)].fill_diagonal_(1.0)
        if layer.bias is not None:
            layer.bias.zero_()


def fake(stem: Tensor, stages: list[Tensor], pool: Tensor, logits: Tensor) -> Features:
    return Features(stem=stem, stages=stages, pool=pool, logits=logits)


def test_ce_and_kd_known_values() -> None:
    zs = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    zt = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1])
    f_s = fake(zs, [zs], zs, zs)
    f_t = fake(zt, [zt], zt, zt)
    ce = get_objective("ce")({}, f_t, f_s, CTX)
    _, terms = ce(Fixed(f_s), None, zs, y, None)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert terms["ce"].item() == pytest.approx(expected, rel=1e-6)

    temp = 2.0
    kd = get_objective("kd")(
        {"kd_temperature": temp, "ce_weight": 0.0, "kd_weight": 1.0}, f_t, f_s, CTX
    )
    _, terms = kd(Fixed(f_s), Fixed(f_t), zs, y, None)

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for rs, rt in zip(zs.tolist(), zt.tolist(), strict=True):
        ps, pt = softmax(rs), softmax(rt)
        kl += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))
    assert set(terms) == {"kd"}
    assert terms["kd"].item() == pytest.approx(kl / 2 * temp**2, rel=1e-6)


def test_msd_known_value() -> None:
    g = torch.Generator().manual_seed(0)
    ms = torch.rand(3, 2, 2, 2, generator=g)
    mt = torch.rand(3, 2, 2, 2, generator=g)
    v = torch.zeros(3, 2)
    obj = get_objective("msd")(
        {"dim": 2, "scales": [1], "layers": 1}, fake(mt, [mt], v, v), fake(ms, [ms], v, v), CTX
    )
    for head in [*obj.student_heads.values(), *obj.teacher_heads.values()]:
        identity_(head)
    got = obj.distill(fake(ms, [ms], v, v), fake(mt, [mt], v, v), torch.zeros(3).long(), None)
    qs = [normalize([float(ms[b, c].mean()) for c in range(2)]) for b in range(3)]
    qt = [normalize([float(mt[b, c].mean()) for c in range(2)]) for b in range(3)]
    assert got.item() == pytest.approx(ref_sym(qs, qt, 0.1), rel=1e-5)


def window_means(m: Tensor, scale: int, pooling: str) -> list[list[list[float]]]:
    """Plain-Python decoupling of one B×C×H×W map into cells: per cell, per sample, the C
    channel means over the cell's window. grid: s×s equal blocks; sliding: windows of side
    ⌈H/s⌉ every ⌈H/(2s)⌉ pixels (overlapping)."""
    b, c, h, w = m.shape
    x = m.tolist()
    if pooling == "grid":
        k, stride = h // scale, h // scale
    else:
        k, stride = math.ceil(h / scale), math.ceil(h / (2 * scale))
    starts = list(range(0, h - k + 1, stride))
    cells_ = []
    for y0 in starts:
        for x0 in starts:
            cells_.append(
                [
                    [
                        sum(x[bi][ci][y0 + i][x0 + j] for i in range(k) for j in range(k)) / (k * k)
                        for ci in range(c)
                    ]
                    for bi in range(b)
                ]
            )
    return cells_  # R × B × C


def ref_info_nce_pos(
    q: list[list[float]], k: list[list[float]], tau: float, labels: list[int]
) -> float:
    """InfoNCE where every key of the anchor's label is a positive (mean −log p over them)."""
    total = 0.0
    for i, qi in enumerate(q):
        logits = [dot(qi, kj) / tau for kj in k]
        log_z = math.log(sum(math.exp(v) for v in logits))
        pos = [j for j in range(len(k)) if labels[j] == labels[i]]
        total += sum(log_z - logits[j] for j in pos) / len(pos)
    return total / len(q)


def ref_msd(
    ms: Tensor,
    mt: Tensor,
    scales: list[int],
    pooling: str,
    tau: float,
    feature_weight: float,
    labels: list[int] | None = None,
) -> float:
    """msd with identity heads on one tap of equal-size maps, from the definition."""

    def sym(a: list[list[float]], b: list[list[float]]) -> float:
        if labels is None:
            return ref_sym(a, b, tau)
        return 0.5 * (ref_info_nce_pos(a, b, tau, labels) + ref_info_nce_pos(b, a, tau, labels))

    sample_terms, feature_terms = [], []
    for scale in scales:
        cs = [[normalize(v) for v in cell] for cell in window_means(ms, scale, pooling)]
        ct = [[normalize(v) for v in cell] for cell in window_means(mt, scale, pooling)]
        # sample-wise: per cell, across the batch
        sample_terms.append(sum(sym(a, b) for a, b in zip(cs, ct, strict=True)) / len(cs))
        if len(cs) > 1:  # feature-wise: per sample, across its cells (instance positives only)
            per_sample = [
                ref_sym([cell[bi] for cell in cs], [cell[bi] for cell in ct], tau)
                for bi in range(ms.shape[0])
            ]
            feature_terms.append(sum(per_sample) / len(per_sample))
    loss = sum(sample_terms) / len(sample_terms)
    if feature_terms:
        loss += feature_weight * sum(feature_terms) / len(feature_terms)
    return loss


def msd_identity(ms: Tensor, mt: Tensor, **hp: object) -> tuple[Objective, Features, Features]:
    v = torch.zeros(ms.shape[0], 2)
    fs, ft = fake(ms, [ms], v, v), fake(mt, [mt], v, v)
    obj = get_objective("msd")({"dim": ms.shape[1], "layers": 1, **hp}, ft, fs, CTX)
    for head in [*obj.student_heads.values(), *obj.teacher_heads.values()]:
        identity_(head)
    return obj, fs, ft


@pytest.mark.parametrize("pooling", ["grid", "sliding"])
@pytest.mark.parametrize("feature_weight", [0.0, 0.5, 2.0])
def test_msd_known_value_with_several_cells(pooling: str, feature_weight: float) -> None:
    """Scales [1, 2] on 4×4 maps: the sample-wise term over 1 + 4 (grid) or 1 + 9 (sliding,
    2×2 windows every pixel) cells, and the feature-wise term within each sample at scale 2,
    weighted by feature_weight."""
    g = torch.Generator().manual_seed(0)
    ms = torch.randn(4, 3, 4, 4, generator=g)
    mt = torch.randn(4, 3, 4, 4, generator=g)
    obj, fs, ft = msd_identity(
        ms, mt, scales=[1, 2], pooling=pooling, tau=0.2, feature_weight=feature_weight
    )
    got = obj.distill(fs, ft, torch.arange(4), None)
    expected = ref_msd(ms, mt, [1, 2], pooling, 0.2, feature_weight)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert len(window_means(ms, 2, pooling)) == (4 if pooling == "grid" else 9)


def test_msd_sliding_windows_overlap_on_an_8x8_map() -> None:
    """8×8, s = 2: windows of 4 every 2 pixels, 3×3 of them; s = 4: windows of 2 every pixel,
    7×7 (each cell shares pixels with its neighbours, unlike the grid's 2×2 and 4×4)."""
    from searchkd.objectives.msd import decouple

    m = torch.randn(2, 3, 8, 8)
    for scale, side in ((2, 3), (4, 7)):
        got = decouple(m, scale, "sliding")
        assert got.shape[-2:] == (side, side)
        ref = window_means(m, scale, "sliding")
        torch.testing.assert_close(got.flatten(2).permute(2, 0, 1), torch.tensor(ref))


def test_msd_class_positives_known_value() -> None:
    """`positives: class`: in the sample-wise term every same-label sample is a positive (mean
    −log p over them); the feature-wise term keeps the same cell as its only positive."""
    g = torch.Generator().manual_seed(1)
    ms = torch.randn(5, 2, 4, 4, generator=g)
    mt = torch.randn(5, 2, 4, 4, generator=g)
    labels = [0, 1, 0, 2, 1]
    obj, fs, ft = msd_identity(ms, mt, scales=[1, 2], positives="class", tau=0.3)
    got = obj.distill(fs, ft, torch.tensor(labels), None)
    assert got.item() == pytest.approx(ref_msd(ms, mt, [1, 2], "grid", 0.3, 1.0, labels), rel=1e-5)
    instance, _, _ = msd_identity(ms, mt, scales=[1, 2], positives="instance", tau=0.3)
    assert instance.distill(fs, ft, torch.tensor(labels), None).item() == pytest.approx(
        ref_msd(ms, mt, [1, 2], "grid", 0.3, 1.0), rel=1e-5
    )
    assert got.item() != pytest.approx(instance.distill(fs, ft, torch.tensor(labels), None).item())


def test_stkd_similarity_transfer_known_value() -> None:
    zs = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 2.0, 1.0], [-1.0, 3.0, 0.0]]
    zt = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 3.0], [3.0, 0.0, 1.0]]
    temp, sigma = 1.0, 0.1

    def probs(row: list[float]) -> list[float]:
        e = [math.exp(v / temp) for v in row]
        return normalize([v / sum(e) for v in e])

    def row_dists(z: list[list[float]]) -> list[list[float]]:
        p = [probs(r) for r in z]
        out = []
        for i in range(len(z)):
            e = [math.exp(dot(p[i], p[j]) / sigma) for j in range(len(z)) if j != i]
            out.append([v / sum(e) for v in e])
        return out

    qs, qt = row_dists(zs), row_dists(zt)
    expected = sum(
        sum(b * math.log(b / a) for a, b in zip(rs, rt, strict=True))
        for rs, rt in zip(qs, qt, strict=True)
    ) / len(zs)
    got = similarity_transfer(torch.tensor(zs), torch.tensor(zt), temp, sigma)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_stkd_mixup_and_mixed_label_ce() -> None:
    x = torch.randn(6, 3, 2, 2)
    torch.manual_seed(11)
    mixed, perm, lam = mixup(x, 0.4)
    assert 0.0 <= lam <= 1.0 and sorted(perm.tolist()) == list(range(6))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    assert mixup(x, 0.0)[0] is x  # α = 0: mixup off

    logits = torch.randn(6, NUM_CLASSES)
    f = fake(logits, [logits], logits, logits)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    obj = get_objective("stkd")({"kd_weight": 0.0, "weight": 0.0}, f, f, CTX)
    torch.manual_seed(11)
    _, terms = obj(Fixed(f), Fixed(f), x, y, None)
    ce = [F.cross_entropy(logits, t).item() for t in (y, y[perm])]
    assert terms["ce"].item() == pytest.approx(lam * ce[0] + (1 - lam) * ce[1], rel=1e-5)


def test_stkd_temperatures_move_the_value_the_expected_way(pair, batch) -> None:
    teacher, student = pair
    s, t = features(student, batch[0]), features(teacher, batch[0])
    values = [
        similarity_transfer(s.logits, t.logits, 4.0, sigma).item()
        for sigma in (0.05, 0.5, 5.0, 50.0)
    ]
    assert values == sorted(values, reverse=True)  # softer rows, smaller divergence
    assert values[-1] < 1e-3
    # A hot softmax makes every P near-uniform, so the similarities and the loss vanish.
    assert similarity_transfer(s.logits, t.logits, 1e4, 0.1).item() < 1e-6


def test_stkd_similarity_softmax_temperature_is_its_own_knob() -> None:
    from searchkd.objectives.stkd import similarity_transfer

    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(6, NUM_CLASSES, generator=g), torch.randn(6, NUM_CLASSES, generator=g)
    f_s = Fixed(fake(zs, [zs], zs, zs))
    f_t = Fixed(fake(zt, [zt], zt, zt))
    y = torch.arange(6) % NUM_CLASSES

    def stkd_term(**hp: float) -> float:
        obj = get_objective("stkd")({"mix_alpha": 0.0, **hp}, f_t.features, f_s.features, CTX)
        return obj(f_s, f_t, zs, y, None)[1]["stkd"].item()

    assert get_objective("stkd").tunables["sim_softmax_temperature"].default == 4.0
    base = stkd_term(kd_temperature=4.0, sim_softmax_temperature=2.0, sim_temperature=0.2)
    assert base == pytest.approx(similarity_transfer(zs, zt, 2.0, 0.2).item(), rel=1e-6)
    # Moving the KD temperature leaves the similarity term alone; its own temperature moves it.
    assert stkd_term(kd_temperature=8.0, sim_softmax_temperature=2.0, sim_temperature=0.2) == base
    assert stkd_term(
        kd_temperature=4.0, sim_softmax_temperature=6.0, sim_temperature=0.2
    ) != pytest.approx(base)


def crd_setup(tau: float = 0.5, momentum: float = 0.5):
    """N = 4, dim 2, K = 2 negatives, identity heads, hand-set banks."""
    ctx = ObjectiveContext(num_classes=2, num_train=4)
    ps = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    pt = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    z = torch.zeros(2, 2)
    obj = get_objective("crd")(
        {"dim": 2, "negatives": 2, "tau": tau, "momentum": momentum},
        fake(z, [z], pt, z),
        fake(z, [z], ps, z),
        ctx,
    )
    identity_(obj.student_heads["pool"])
    identity_(obj.teacher_heads["pool"])
    s_bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    t_bank = F.normalize(torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [2.0, 1.0]]), dim=1)
    obj.memory.student_bank = s_bank.clone()
    obj.memory.teacher_bank = t_bank.clone()
    return obj, ps, pt, s_bank, t_bank


def ref_nce(
    anchors: list[list[float]],
    bank: list[list[float]],
    rows: list[list[int]],
    tau: float,
    z: float,
    n: int,
) -> float:
    k = len(rows[0]) - 1
    c = k / n
    total = 0.0
    for a, row in zip(anchors, rows, strict=True):
        p = [math.exp(dot(a, bank[j]) / tau) / z for j in row]
        total += math.log(p[0] / (p[0] + c + 1e-7))
        total += sum(math.log(c / (q + c + 1e-7)) for q in p[1:])
    return -total / len(anchors)


def test_crd_known_value_z_and_bank_update(monkeypatch) -> None:
    monkeypatch.setattr(LabelBook, "sample_negatives", deterministic_negatives)
    tau, n = 0.5, 4
    obj, ps, pt, s_bank, t_bank = crd_setup(tau)
    y, index = torch.tensor([0, 1]), torch.tensor([0, 2])
    rows = [[0, 1, 2], [2, 3, 0]]  # own index, then index+1, index+2 (mod N)
    z = fake(torch.zeros(2, 2), [torch.zeros(2, 2)], ps, ps)
    got = obj.distill(z, fake(z.stem, z.stages, pt, pt), y, index)

    def z_of(anchors: Tensor, bank: Tensor) -> float:
        e = [
            math.exp(dot(a, bank.tolist()[j]) / tau)
            for a, r in zip(anchors.tolist(), rows, strict=True)
            for j in r
        ]
        return sum(e) / len(e) * n

    zs, zt = z_of(ps, t_bank), z_of(pt, s_bank)
    expected = ref_nce(ps.tolist(), t_bank.tolist(), rows, tau, zs, n) + ref_nce(
        pt.tolist(), s_bank.tolist(), rows, tau, zt, n
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert obj.memory.log_z.tolist() == pytest.approx([math.log(zs), math.log(zt)], rel=1e-6)
    assert obj.book.labels.tolist() == [0, -1, 1, -1]
    # Momentum update m ← ½m + ½v, renormalised, only at the batch's indices.
    for i, j in enumerate(index.tolist()):
        torch.testing.assert_close(
            obj.memory.student_bank[j], F.normalize(s_bank[j] + ps[i], dim=0)
        )
        torch.testing.assert_close(
            obj.memory.teacher_bank[j], F.normalize(t_bank[j] + pt[i], dim=0)
        )
    torch.testing.assert_close(obj.memory.student_bank[[1, 3]], s_bank[[1, 3]])
    # Z stays fixed after the first batch.
    before = obj.memory.log_z.clone()
    obj.distill(z, fake(z.stem, z.stages, pt, pt), y, index)
    assert torch.equal(obj.memory.log_z, before)


def test_crd_clamps_negatives_and_keeps_state_in_state_dict(pair, batch) -> None:
    teacher, student = pair
    obj = build("crd", teacher, student, batch[0], negatives=16384)
    assert obj.negatives == NUM_TRAIN - 1
    keys = set(obj.state_dict())
    assert {"memory.student_bank", "memory.teacher_bank", "memory.log_z", "book.labels"} <= keys
    assert obj.memory.student_bank.shape == (NUM_TRAIN, 16)
    with pytest.raises(ValueError, match="indices"):
        obj(student, teacher, batch[0], batch[1], None)


def test_crd_scores_whole_bank_matmul_equals_gather() -> None:
    bank = F.normalize(torch.randn(10, 4), dim=1)
    v = F.normalize(torch.randn(3, 4), dim=1)
    small = torch.randint(0, 10, (3, 2))
    large = torch.randint(0, 10, (3, 5))
    for idx in (small, large):
        torch.testing.assert_close(
            ContrastMemory.scores(bank, v, idx), torch.einsum("bkd,bd->bk", bank[idx], v)
        )


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(-1, 3), min_size=2, max_size=12),
    data=st.data(),
)
def test_negatives_come_from_other_classes(labels: list[int], data) -> None:
    n = len(labels)
    book = LabelBook(n)
    book.labels.copy_(torch.tensor(labels))
    index = torch.tensor(
        data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    )
    y = torch.tensor(
        data.draw(st.lists(st.integers(0, 3), min_size=len(index), max_size=len(index)))
    )
    book.record(index, y)
    neg = book.sample_negatives(index, y, 20)
    stored = book.labels
    assert neg.shape == (len(index), 20)
    assert ((neg >= 0) & (neg < n)).all()
    for i in range(len(index)):
        others = (stored != y[i]).any()
        if others:  # every draw is of another (or a not yet seen) class
            assert (stored[neg[i]] != y[i]).all()
        else:  # nothing qualifies: uniform over everyone but the sample itself
            assert (neg[i] != index[i]).all()


def test_negative_draws_cover_every_eligible_index() -> None:
    book = LabelBook(6)
    book.labels.copy_(torch.tensor([0, 1, 0, -1, 2, 0]))
    torch.manual_seed(0)
    neg = book.sample_negatives(torch.tensor([0]), torch.tensor([0]), 3000)
    counts = torch.bincount(neg.flatten(), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    assert (counts[[1, 3, 4]] > 850).all()  # uniform: 1000 each


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=2, max_size=16), data=st.data())
def test_negatives_are_distinct_when_the_pool_holds_k(labels: list[int], data) -> None:
    """RepDistiller draws K negatives without replacement whenever the sample's pool of
    other-class indices holds K; a pool of exactly K is drawn whole."""
    n = len(labels)
    book = LabelBook(n)
    book.labels.copy_(torch.tensor(labels))
    index = torch.tensor(
        data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    )
    y = torch.tensor(labels)[index]
    pools = [[j for j in range(n) if labels[j] != int(c)] for c in y]
    k = data.draw(st.integers(0, min(len(p) for p in pools)))
    neg = book.sample_negatives(index, y, k)
    assert neg.shape == (len(index), k)
    for row, pool in zip(neg.tolist(), pools, strict=True):
        assert len(set(row)) == k and set(row) <= set(pool)
        if k == len(pool):
            assert sorted(row) == pool


def test_distinct_negatives_are_uniform_over_the_pool() -> None:
    book = LabelBook(7)
    book.labels.copy_(torch.tensor([0, 1, 0, 2, 3, 0, 1]))  # class 0's pool: 1, 3, 4, 6
    torch.manual_seed(0)
    rows = 4000
    neg = book.sample_negatives(
        torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long), 2
    )
    assert (neg[:, 0] != neg[:, 1]).all()
    counts = torch.bincount(neg.flatten(), minlength=7)
    assert counts[[0, 2, 5]].sum() == 0
    assert ((counts[[1, 3, 4, 6]] - 2000).abs() < 150).all()  # 4000·2/4 each; σ ≈ 27


def test_crd_knows_the_labels_before_its_first_batch(pair, batch) -> None:
    """The training labels come through the context, so epoch 1's very first draw already
    avoids the sample's own class (the labels used to be learnt batch by batch)."""
    teacher, student = pair
    x, y, index = batch
    labels = torch.arange(NUM_TRAIN) % NUM_CLASSES
    ctx = ObjectiveContext(NUM_CLASSES, NUM_TRAIN, labels)
    for name, hp in (("crd", {}), ("cktf", {"memory": "bank"})):
        obj = get_objective(name)(
            hp_for(name, negatives=NUM_TRAIN - NUM_TRAIN // NUM_CLASSES - 1, **hp),
            features(teacher, x),
            features(student, x),
            ctx,
        )
        assert torch.equal(obj.book.labels, labels)
        torch.manual_seed(0)
        neg = obj.book.sample_negatives(index, labels[index], obj.negatives)
        assert (labels[neg] != labels[index][:, None]).all(), name
        assert all(len(set(row)) == obj.negatives for row in neg.tolist()), name


def lfcc_obj(filter_: str, scales: list[int], fs: Features, ft: Features, dim: int = 2):
    """lfcc with identity 1×1 convs (dim = channels × cells keeps every number of the grid)."""
    obj = get_objective("lfcc")(
        {"dim": dim, "scales": scales, "layers": 1, "filter": filter_, "tau": 0.2}, ft, fs, CTX
    )
    for head in [*obj.student_heads.values(), *obj.teacher_heads.values()]:
        identity_(head[0])
    return obj


def ref_linear(flat: list[list[float]], linear: nn.Linear) -> list[list[float]]:
    w, b = linear.weight.tolist(), linear.bias.tolist()
    return [normalize([dot(row, f) + bias for row, bias in zip(w, b, strict=True)]) for f in flat]


def block_means(m: Tensor, c: int) -> list[list[float]]:
    """B×C×H×W → per sample the c×c block means of every channel, flattened (c, y, x)."""
    b, ch, h, w = m.shape
    x = m.tolist()
    kh, kw = h // c, w // c
    return [
        [
            sum(x[bi][ci][gy * kh + i][gx * kw + j] for i in range(kh) for j in range(kw))
            / (kh * kw)
            for ci in range(ch)
            for gy in range(c)
            for gx in range(c)
        ]
        for bi in range(b)
    ]


def ref_dct(m: Tensor, c: int) -> list[list[float]]:
    """The lowest c×c orthonormal DCT-II coefficients of every channel divided by √(HW), by the
    textbook double sum, flattened (c, u, v)."""
    b, ch, h, w = m.shape
    x = m.tolist()

    def alpha(k: int, n: int) -> float:
        return math.sqrt((1 if k == 0 else 2) / n)

    def coef(plane: list[list[float]], u: int, v: int) -> float:
        return (
            sum(
                plane[i][j]
                * math.cos(math.pi * (2 * i + 1) * u / (2 * h))
                * math.cos(math.pi * (2 * j + 1) * v / (2 * w))
                for i in range(h)
                for j in range(w)
            )
            * alpha(u, h)
            * alpha(v, w)
            / math.sqrt(h * w)
        )

    return [
        [coef(x[bi][ci], u, v) for ci in range(ch) for u in range(c) for v in range(c)]
        for bi in range(b)
    ]


@pytest.mark.parametrize(("filter_", "reference"), [("avgpool", block_means), ("dct", ref_dct)])
def test_lfcc_known_value_in_the_compact_space(filter_: str, reference) -> None:
    """`scales: [2]` keeps a 2×2 grid of each map whatever its size (student 8×8, teacher 4×4):
    block means for avgpool, the lowest 2×2 DCT coefficients for dct."""
    g = torch.Generator().manual_seed(0)
    ms = torch.rand(3, 2, 8, 8, generator=g)
    mt = torch.rand(3, 2, 4, 4, generator=g)
    v = torch.zeros(3, 2)
    fs, ft = fake(ms, [ms], v, v), fake(mt, [mt], v, v)
    obj = lfcc_obj(filter_, [2], fs, ft, dim=8)
    got = obj.distill(fs, ft, torch.zeros(3).long(), None)
    qs = ref_linear(reference(ms, 2), obj.student_heads["tap-1_c2"][2])
    qt = ref_linear(reference(mt, 2), obj.teacher_heads["tap-1_c2"][2])
    assert got.item() == pytest.approx(ref_sym(qs, qt, 0.2), rel=1e-5)


def test_lfcc_both_filters_read_scales_as_the_grid_kept() -> None:
    """One meaning of c for both filters: c×c numbers per channel; at c = 1 both keep the
    map's mean, so with the same heads they give the same loss."""
    from searchkd.objectives.lfcc import FILTERS

    g = torch.Generator().manual_seed(1)
    m = torch.rand(4, 2, 8, 8, generator=g)
    for c in (1, 2, 4):
        assert FILTERS["avgpool"](m, c).shape == FILTERS["dct"](m, c).shape == (4, 2, c, c)
    torch.testing.assert_close(FILTERS["dct"](m, 1), m.mean((2, 3), keepdim=True))
    mt = torch.rand(4, 2, 4, 4, generator=g)
    v = torch.zeros(4, 2)
    fs, ft = fake(m, [m], v, v), fake(mt, [mt], v, v)
    by_dct, by_pool = lfcc_obj("dct", [1], fs, ft), lfcc_obj("avgpool", [1], fs, ft)
    by_pool.load_state_dict(by_dct.state_dict())
    y = torch.zeros(4).long()
    torch.testing.assert_close(by_dct.distill(fs, ft, y, None), by_pool.distill(fs, ft, y, None))


def cifar_pair(teacher_arch: str, student_arch: str, width: float = 1.0):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    teacher = build_model(teacher_arch, 100).eval()
    student = build_model(student_arch, 100, width=width).eval()
    return teacher, student, features(teacher, x), features(student, x)


@pytest.mark.parametrize("student_arch", ["vit_tiny", "resnet8x4"])
@pytest.mark.parametrize("filter_", ["avgpool", "dct"])
def test_lfcc_default_scales_never_keep_a_whole_map(student_arch: str, filter_: str) -> None:
    """Every filter of the default bank is a low-pass one on the CIFAR-100 pairs: it keeps
    fewer cells than both maps have (the old kernel-1 average pool kept all of them)."""
    _, _, t, s = cifar_pair("resnet32x4", student_arch)
    obj = get_objective("lfcc")({"filter": filter_}, t, s, ObjectiveContext(100, 50000))
    kept = 0
    for tap in obj.taps:
        for c in obj.scales[tap]:
            for f in (s.stages[tap], t.stages[tap]):
                assert math.prod(obj.filter(f, c).shape[-2:]) < math.prod(f.shape[-2:])
                kept += 1
    assert kept == 2 * len(obj.taps) * 3  # all three default scales are used on these maps
    # On a 2×2 map, 2 and 4 would keep everything: only the global mean remains.
    small = torch.rand(4, 3, 2, 2)
    tiny = get_objective("lfcc")(
        {"layers": 1, "dim": 8},
        fake(small, [small], small[:, :, 0, 0], small),
        fake(small, [small], small[:, :, 0, 0], small),
        CTX,
    )
    assert tiny.scales[-1] == [1]


def test_lfcc_uses_the_listed_grid_sizes_below_each_taps_side_and_adds_none() -> None:
    """`scales: [2, 4]` on 16×16 and 8×8 taps uses 2 and 4 (1 is not added: [2, 4] and
    [1, 2, 4] are different filter banks); on a 4×4 tap 4 would keep the whole map and is
    dropped; on a 2×2 tap none is below the side and the global mean stands in alone."""
    from searchkd.objectives.lfcc import tap_scales

    def maps(side: int) -> Tensor:
        return torch.rand(4, 3, side, side)

    assert tap_scales([2, 4], maps(16), maps(8)) == [2, 4]
    assert tap_scales([4, 2], maps(4), maps(16)) == [2]
    assert tap_scales([2, 4], maps(2), maps(8)) == [1]
    assert tap_scales([1, 2, 4], maps(16), maps(16)) == [1, 2, 4]
    big, mid = maps(16), maps(8)
    v = torch.zeros(4, 3)
    obj = get_objective("lfcc")(
        {"layers": 2, "dim": 8, "scales": [2, 4]},
        fake(big, [big, mid], v, v),
        fake(big, [big, mid], v, v),
        CTX,
    )
    assert obj.scales == {-2: [2, 4], -1: [2, 4]}
    assert sorted(obj.student_heads) == ["tap-1_c2", "tap-1_c4", "tap-2_c2", "tap-2_c4"]


@pytest.mark.parametrize("student_arch", ["vit_tiny", "resnet8x4"])
def test_lfcc_heads_are_no_bigger_than_the_student(student_arch: str) -> None:
    """resnet32x4 → vit_tiny used to add 22.6M head parameters to a 2.7M student: the linear
    layer saw dim × (the whole map). Now it sees about dim numbers whatever the grid."""
    from searchkd.models import count_params

    _, student, t, s = cifar_pair("resnet32x4", student_arch)
    obj = get_objective("lfcc")({}, t, s, ObjectiveContext(100, 50000))
    heads = sum(p.numel() for p in obj.parameters() if p.requires_grad)
    assert heads <= count_params(student)
    if student_arch == "vit_tiny":
        assert heads < 1_100_000  # 1,048,896 at the defaults (2 taps × 3 scales × 2 sides)


def test_dct_known_coefficients() -> None:
    const = torch.full((1, 1, 3, 3), 2.0)
    coef = dct_lowpass(const, (2, 2))
    torch.testing.assert_close(coef[0, 0], torch.tensor([[6.0, 0.0], [0.0, 0.0]]))  # 9·2/√9


@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 7), w=st.integers(1, 7), kh=st.integers(1, 7), kw=st.integers(1, 7))
def test_dct_matches_the_textbook_sum_and_is_orthonormal(h: int, w: int, kh: int, kw: int) -> None:
    kh, kw = min(kh, h), min(kw, w)
    x = torch.randn(1, 1, h, w, dtype=torch.float64)
    got = dct_lowpass(x, (kh, kw))[0, 0]

    def alpha(k: int, n: int) -> float:
        return math.sqrt((1 if k == 0 else 2) / n)

    for u in range(kh):
        for v in range(kw):
            ref = (
                sum(
                    float(x[0, 0, i, j])
                    * math.cos(math.pi * (2 * i + 1) * u / (2 * h))
                    * math.cos(math.pi * (2 * j + 1) * v / (2 * w))
                    for i in range(h)
                    for j in range(w)
                )
                * alpha(u, h)
                * alpha(v, w)
            )
            assert float(got[u, v]) == pytest.approx(ref, abs=1e-9)
    d = dct_matrix(h, dtype=torch.float64)
    torch.testing.assert_close(d @ d.t(), torch.eye(h, dtype=torch.float64))


@pytest.mark.parametrize("filter_", ["avgpool", "dct"])
@pytest.mark.parametrize(
    ("teacher_arch", "student_arch"),
    [
        ("resnet14", "vit_tiny"),
        ("vit_tiny", "resnet8"),
        ("resnet14", "mixer_tiny"),
    ],
)
def test_lfcc_works_across_heterogeneous_pairs(teacher_arch, student_arch, filter_, batch) -> None:
    def make(arch: str, seed: int) -> TappedModel:
        torch.manual_seed(seed)
        return cnn(arch, seed) if arch.startswith("resnet") else token_model(arch)

    teacher = make(teacher_arch, 1).eval().requires_grad_(False)
    student = make(student_arch, 2)
    obj = build("lfcc", teacher, student, batch[0], filter=filter_)
    terms = run(obj, student, teacher, batch)
    assert torch.isfinite(terms["lfcc"])
    terms["lfcc"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None for p in obj.parameters())
    x, y, index = batch
    t = features(teacher, x)
    torch.manual_seed(0)
    same = get_objective("lfcc")(hp_for("lfcc", filter=filter_), t, t, CTX)
    aligned, shuffled = aligned_and_shuffled(same, t, y, index, warmup=0)
    assert aligned < shuffled


def ref_grid(m: Tensor, k: int, channels: int, batch_norm: bool) -> list[list[float]]:
    """Plain-Python cktf pair input: optionally divide each (c, y, x) entry by its L2 norm over
    the batch, zero-pad channels, average k×k blocks, flatten in (c, y, x) order."""
    b, c, h, w = m.shape
    x = m.tolist()
    if batch_norm:
        for ci in range(c):
            for yi in range(h):
                for xi in range(w):
                    n = math.sqrt(sum(x[bi][ci][yi][xi] ** 2 for bi in range(b)))
                    for bi in range(b):
                        x[bi][ci][yi][xi] /= n
    out = []
    for bi in range(b):
        row = []
        for ci in range(channels):
            for gy in range(h // k):
                for gx in range(w // k):
                    cell = [
                        x[bi][ci][gy * k + i][gx * k + j] if ci < c else 0.0
                        for i in range(k)
                        for j in range(k)
                    ]
                    row.append(sum(cell) / len(cell))
        out.append(row)
    return out


def test_cktf_known_value_batch_mode() -> None:
    """L = CE + weight · L_final + inter_weight · Σ_l L_l with independent weights (0.8 and 0.1,
    not 0.8 · 0.1), stage maps normalised over the batch, 2×2 grids, stem not normalised."""
    g = torch.Generator().manual_seed(0)
    b = 3
    s = fake(
        torch.rand(b, 1, 4, 4, generator=g),
        [torch.randn(b, 2, 4, 4, generator=g)],
        torch.rand(b, 2, generator=g),
        torch.zeros(b, 2),
    )
    t = fake(
        torch.rand(b, 2, 4, 4, generator=g),
        [torch.randn(b, 2, 4, 4, generator=g)],
        torch.rand(b, 2, generator=g),
        torch.zeros(b, 2),
    )
    obj = get_objective("cktf")(
        {"dim": 8, "memory": "batch", "tau": 0.3, "pool_kernel": 2}, t, s, CTX
    )
    assert not obj.uses_bank and len(obj.memories) == 0
    assert (obj.hp["weight"], obj.hp["inter_weight"]) == (0.8, 0.1)
    assert {n: h.in_features for n, h in obj.student_heads.items()} == {
        "stem": 8,
        "stage0": 8,
        "final": 2,
    }
    for head in [*obj.student_heads.values(), *obj.teacher_heads.values()]:
        identity_(head)

    def sym(a: list[list[float]], c: list[list[float]]) -> float:
        return ref_sym([normalize(r) for r in a], [normalize(r) for r in c], 0.3)

    stem = sym(ref_grid(s.stem, 2, 2, batch_norm=False), ref_grid(t.stem, 2, 2, batch_norm=False))
    stage = sym(
        ref_grid(s.stages[0], 2, 2, batch_norm=True), ref_grid(t.stages[0], 2, 2, batch_norm=True)
    )
    final = sym(s.pool.tolist(), t.pool.tolist())
    terms = obj.own_terms(s, t, torch.zeros(b).long(), None)  # batch mode: no index needed
    assert terms.keys() == {"cktf", "cktf_inter"}
    assert terms["cktf"].item() == pytest.approx(0.8 * final, rel=1e-5)
    assert terms["cktf_inter"].item() == pytest.approx(0.1 * (stem + stage), rel=1e-5)


def test_cktf_bank_mode_sums_crd_terms_per_layer(pair, batch, monkeypatch) -> None:
    monkeypatch.setattr(LabelBook, "sample_negatives", deterministic_negatives)
    teacher, student = pair
    x, y, index = batch
    obj = build("cktf", teacher, student, x, inter_weight=0.5, pool_kernel=2)
    assert obj.uses_bank and set(obj.memories) == {"stem", "stage0", "stage1", "stage2", "final"}
    s, t = features(student, x), features(teacher, x)
    reference = copy.deepcopy(obj)
    got = obj.own_terms(s, t, y, index)
    negatives = deterministic_negatives(reference.book, index, y, reference.negatives)

    def prepared(name: str, f: Tensor, c: int) -> Tensor:
        if f.dim() == 2:
            return f
        if name != "stem":
            f = f / f.norm(dim=0, keepdim=True).clamp(min=1e-12)  # an all-zero entry stays 0
        f = torch.cat([f, f.new_zeros(f.shape[0], c - f.shape[1], *f.shape[2:])], 1)
        k = min(2, f.shape[-1])
        return f.unflatten(2, (-1, k)).unflatten(4, (-1, k)).mean((3, 5)).flatten(1)

    per_layer = {}
    for name, fs, ft in layer_pairs(s, t):
        c = max(fs.shape[1], ft.shape[1])
        v_s = F.normalize(reference.student_heads[name](prepared(name, fs, c)), dim=1)
        v_t = F.normalize(reference.teacher_heads[name](prepared(name, ft, c)), dim=1)
        per_layer[name] = reference.memories[name](v_s, v_t, index, negatives)
    torch.testing.assert_close(got["cktf"], 0.8 * per_layer.pop("final"))
    torch.testing.assert_close(got["cktf_inter"], 0.5 * sum(per_layer.values()))
    with pytest.raises(ValueError, match="indices"):
        obj.own_terms(s, t, y, None)


def test_cktf_pools_cifar_maps_to_the_authors_grids() -> None:
    """resnet32x4 → resnet8x4 on 32×32: kernel 8 keeps the stem and first stage as 4×4 grids,
    the second as 2×2, the third as 1×1 (channels at width 1/4: 8, 16, 32, 64)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    teacher = build_model("resnet32x4", NUM_CLASSES, width=0.25).eval()
    student = build_model("resnet8x4", NUM_CLASSES, width=0.25).eval()
    obj = get_objective("cktf")(
        {"dim": 16, "negatives": 8}, features(teacher, x), features(student, x), CTX
    )
    widths = {
        n: (h.in_features, obj.teacher_heads[n].in_features) for n, h in obj.student_heads.items()
    }
    assert widths == {
        "stem": (8 * 16, 8 * 16),
        "stage0": (16 * 16, 16 * 16),
        "stage1": (32 * 4, 32 * 4),
        "stage2": (64, 64),
        "final": (64, 64),
    }
    glob = get_objective("cktf")(
        {"dim": 16, "negatives": 8, "pool_kernel": 0},
        features(teacher, x),
        features(student, x),
        CTX,
    )
    assert [h.in_features for h in glob.student_heads.values()] == [8, 16, 32, 64, 64]


def test_cktf_has_no_teacher_block_knob() -> None:
    """Choosing a teacher block inside a stage needs per-block taps the models do not expose;
    a stage-level knob gave identical pairs for every pair of the published table."""
    assert "teacher_block" not in get_objective("cktf").tunables


def test_cktf_pairs_stages_by_relative_depth() -> None:
    assert [teacher_stage_for(j, 3, 3) for j in range(3)] == [0, 1, 2]
    # A 4-stage teacher (VGG) for a 3-stage student: groups [0, 1], [2], [3], the last of each.
    assert [teacher_stage_for(j, 3, 4) for j in range(3)] == [1, 2, 3]
    # Six teacher stages, two student stages.
    assert [teacher_stage_for(j, 2, 6) for j in range(2)] == [2, 5]
    # A shallower teacher: shared stages at the same relative depth.
    assert [teacher_stage_for(j, 4, 2) for j in range(4)] == [0, 0, 1, 1]


def test_cktf_pairs_a_deeper_teacher_and_pads_the_narrower_side() -> None:
    b = 4
    t = fake(
        torch.rand(b, 6, 4, 4),
        [torch.rand(b, 6 + i, 4, 4) for i in range(4)],
        torch.rand(b, 9),
        torch.rand(b, 3),
    )
    s = fake(
        torch.rand(b, 2, 4, 4),
        [torch.rand(b, 3, 4, 4) for _ in range(3)],
        torch.rand(b, 12),
        torch.rand(b, 3),
    )
    obj = get_objective("cktf")({"dim": 4, "memory": "batch", "pool_kernel": 0}, t, s, CTX)
    assert [obj.student_heads[f"stage{j}"].in_features for j in range(3)] == [7, 8, 9]
    assert obj.student_heads["stem"].in_features == 6
    # The final vectors enter as they are, each side its own width.
    assert (obj.student_heads["final"].in_features, obj.teacher_heads["final"].in_features) == (
        12,
        9,
    )
    assert all(torch.isfinite(v) for v in obj.own_terms(s, t, torch.zeros(b).long(), None).values())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.floats(-5, 5), min_size=3, max_size=3), min_size=2, max_size=6))
def test_similarity_transfer_is_a_divergence(rows: list[list[float]]) -> None:
    z = torch.tensor(rows)
    assert similarity_transfer(z, z, 4.0, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.flip(z, dims=[1])
    assert similarity_transfer(other, z, 4.0, 0.1).item() >= -1e-6
