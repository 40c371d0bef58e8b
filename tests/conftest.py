"""Shared fixtures: tiny spaces on digits, and one Ray per test session for integration tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

# Ray 2.60 turns on token authentication; tests run a private local cluster without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def tiny_space(name: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """A digits search small enough to run in seconds: 2 trials × 2 epochs of a 1/4-width resnet8."""
    space: dict[str, Any] = {
        "name": name,
        "objective": "msd",
        "data": {"dataset": "digits", "val_fraction": 0.15},
        "teacher": {"arch": "resnet8", "width": 0.5,
                    "train": {"epochs": 3, "batch_size": 64, "lr": 0.1, "lr_schedule": "cosine"}},
        "student": {"arch": "resnet8", "width": 0.25},
        "train": {"epochs": 2, "batch_size": 128, "lr": 0.1, "lr_schedule": "cosine"},
        "loss": {"layers": 1, "scales": [1, 2], "dim": 16},
        "search": {"num_samples": 2, "scheduler": "none", "max_concurrent": 2, "seed": 0,
                   "resources": {"cpu": 1, "gpu": 0}},
        "params": {"student.width": {"choice": [0.25, 0.5]},
                   "loss.tau": {"float": [0.05, 0.5], "log": True},
                   "loss.scales": {"choice": [[1], [1, 2]]}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(space.get(key), dict):
            space[key] = {**space[key], **value}
        else:
            space[key] = value
    return space


def write_space(path: Path, space: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.fixture
def space_file(tmp_path: Path):
    def make(name: str = "tiny", **overrides: Any) -> Path:
        return write_space(tmp_path / f"{name}.yaml", tiny_space(name, **overrides))

    return make


@pytest.fixture(scope="session")
def ray_session():
    """Ray once per session: 2 CPUs, no dashboard (about 6 s here)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
