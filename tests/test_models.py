"""The model zoo honours the tap contract, scales with `width`, and matches the KD field's sizes.

The parameter ratios are the ones the CRD tables quote; matching them (within 3%) is the cheap
evidence that the architectures are the community's and not look-alikes, which matters because
published teachers and results are only comparable on the same networks.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torchvision

from searchkd.models import (
    Features,
    TappedModel,
    build_model,
    count_macs,
    count_params,
    model_names,
)

# torchvision's ImageNet-layout networks: /32 overall, so they get a larger (but still small)
# input than the CIFAR models to keep every stage above 1×1.
IMAGENET = {"resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large"}
IMAGENET_SIZE = 64
CIFAR_SIZE = 32
NUM_CLASSES = 100  # CIFAR-100, the setting of the published parameter counts
EXPECTED = {  # every name the KD field's tables use, plus the ImageNet and token models
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "mobilenetv2",
    "ShuffleV1", "ShuffleV2", "vit_tiny", "mixer_tiny", *IMAGENET,
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These models are tiny: with 2 intra-op threads on a shared 2-core box, OpenMP barriers
    cost ~40 ms per BatchNorm call (seconds per forward); one thread runs them in milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _size(name: str) -> int:
    return IMAGENET_SIZE if name in IMAGENET else CIFAR_SIZE


def _check_features(model: TappedModel, feats: Features, batch: int, num_classes: int) -> None:
    assert isinstance(feats, Features)
    assert feats.stem.dim() == 4 and feats.stem.shape[0] == batch
    assert len(feats.stages) >= 1
    assert len(model.stage_channels) == len(feats.stages)
    for stage, channels in zip(feats.stages, model.stage_channels, strict=True):
        assert stage.dim() == 4 and stage.shape[0] == batch
        assert stage.shape[1] == channels
        assert stage.shape[2] >= 1 and stage.shape[3] >= 1
    assert feats.pool.shape == (batch, model.feature_dim)
    assert feats.logits.shape == (batch, num_classes)
    for t in (feats.stem, *feats.stages, feats.pool, feats.logits):
        assert torch.isfinite(t).all()


def test_every_expected_name_is_registered() -> None:
    assert set(model_names()) >= EXPECTED


@pytest.mark.parametrize("name", model_names())
def test_builds_runs_and_exposes_taps(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES)
    assert isinstance(model, TappedModel)
    assert isinstance(model.stage_channels, list) and isinstance(model.feature_dim, int)
    model.eval()
    size = _size(name)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    _check_features(model, feats, 2, NUM_CLASSES)
    torch.testing.assert_close(logits, feats.logits)
    assert count_macs(model, x) > 0


@pytest.mark.parametrize("name", model_names())
def test_digits_sized_grayscale_input_trains(name: str) -> None:
    """1×8×8 digits: every model must build for one channel and backpropagate on tiny maps."""
    torch.manual_seed(0)
    model = build_model(name, 10, width=0.25, in_channels=1, image_size=8)
    model.train()
    feats = model.forward_features(torch.randn(3, 1, 8, 8))
    _check_features(model, feats, 3, 10)
    loss = feats.logits.logsumexp(1).mean() + sum(s.mean() for s in feats.stages)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", model_names())
def test_width_grows_parameter_count(name: str) -> None:
    counts = [count_params(build_model(name, NUM_CLASSES, width=w)) for w in (0.25, 0.5, 1.0)]
    assert counts[0] < counts[1] < counts[2]


@pytest.mark.parametrize(
    ("teacher", "student", "ratio"),
    [
        ("resnet32x4", "resnet8x4", 6.03),
        ("wrn_40_2", "wrn_16_2", 3.21),
        ("resnet56", "resnet20", 3.1),
        ("vgg13", "vgg8", 2.39),
    ],
)
def test_published_parameter_ratios(teacher: str, student: str, ratio: float) -> None:
    measured = count_params(build_model(teacher, NUM_CLASSES)) / count_params(
        build_model(student, NUM_CLASSES)
    )
    assert measured == pytest.approx(ratio, rel=0.03)


@pytest.mark.parametrize(
    ("name", "millions"),
    [
        ("resnet8x4", 1.23), ("resnet32x4", 7.43), ("wrn_40_2", 2.26), ("wrn_16_2", 0.70),
        ("resnet20", 0.28), ("resnet56", 0.86), ("vgg13", 9.46), ("vgg8", 3.96),
        ("MobileNetV2", 0.81), ("ShuffleV1", 0.95), ("ShuffleV2", 1.36),
    ],
)  # fmt: skip
def test_published_parameter_counts(name: str, millions: float) -> None:
    assert count_params(build_model(name, NUM_CLASSES)) / 1e6 == pytest.approx(millions, rel=0.03)


def test_repdistiller_parameter_names() -> None:
    """Published CIFAR teachers are RepDistiller state dicts: these keys must exist to load them."""
    keys = {
        "wrn_40_2": ["conv1.weight", "block1.layer.0.convShortcut.weight", "bn1.weight",
                     "fc.weight"],
        "vgg13": ["block0.0.weight", "block0.1.running_mean", "block4.4.weight",
                  "classifier.weight"],
        "MobileNetV2": ["conv1.0.weight", "blocks.6.0.conv.7.weight", "conv2.0.weight",
                        "classifier.0.weight"],
        "ShuffleV1": ["conv1.weight", "layer1.0.conv1.weight", "layer3.3.bn3.weight",
                      "linear.weight"],
        "ShuffleV2": ["layer1.0.conv5.weight", "layer3.3.conv3.weight", "conv2.weight",
                      "linear.weight"],
    }  # fmt: skip
    for name, expected in keys.items():
        state = build_model(name, NUM_CLASSES).state_dict()
        missing = [k for k in expected if k not in state]
        assert not missing, f"{name}: {missing}"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_state_dicts_load(name: str) -> None:
    """At width 1 and 3 channels the ImageNet models are torchvision's, parameter for parameter."""
    reference = getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)
    build_model(name, NUM_CLASSES).load_state_dict(reference.state_dict(), strict=True)


def test_token_models_tap_maps_without_class_token() -> None:
    vit = build_model("vit_tiny", NUM_CLASSES).eval()
    mixer = build_model("mixer_tiny", NUM_CLASSES).eval()
    with torch.no_grad():
        for model in (vit, mixer):
            feats = model.forward_features(torch.randn(2, 3, CIFAR_SIZE, CIFAR_SIZE))
            grid = CIFAR_SIZE // 4  # patch 4
            assert feats.stem.shape[-2:] == (grid, grid)
            assert all(s.shape[-2:] == (grid, grid) for s in feats.stages)
            assert len(feats.stages) == 3  # evenly spaced blocks of 6
        # Position embeddings are resized for other input sizes; the mixer cannot be.
        assert vit(torch.randn(2, 3, 16, 16)).shape == (2, NUM_CLASSES)
        with pytest.raises(ValueError, match="image_size"):
            mixer(torch.randn(2, 3, 16, 16))


def test_vit_macs_include_attention() -> None:
    """count_macs must see attention, not just the linears, or ViT students look too cheap."""
    tokens, dim, depth, patch, classes = 1 + (CIFAR_SIZE // 4) ** 2, 192, 6, 4, NUM_CLASSES
    linears = depth * 12 * tokens * dim * dim  # qkv 3d², proj d², MLP 2·4d² per token
    attention = depth * 2 * tokens * tokens * dim  # QKᵀ and AV
    embed = (CIFAR_SIZE // patch) ** 2 * 3 * patch * patch * dim
    expected = linears + attention + embed + dim * classes
    model = build_model("vit_tiny", classes)
    macs = count_macs(model, torch.randn(1, 3, CIFAR_SIZE, CIFAR_SIZE))
    assert macs == pytest.approx(expected, rel=0.01)


def test_depth_keyword() -> None:
    assert count_params(build_model("wrn_16_2", 10, depth=22)) > count_params(
        build_model("wrn_16_2", 10)
    )
    assert len(build_model("vit_tiny", 10, depth=2).blocks) == 2
    assert count_params(build_model("vgg8", 10, depth=11)) == count_params(build_model("vgg11", 10))
    assert count_params(build_model("resnet18", 10, depth=34)) == count_params(
        build_model("resnet34", 10)
    )
    with pytest.raises(ValueError):
        build_model("wrn_16_2", 10, depth=17)
