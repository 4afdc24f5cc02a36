"""Shared fixtures: a seeded rng and the paths of the committed bundled models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def bundled():
    """Path of a committed bundled model by name."""

    def path(name: str) -> Path:
        p = MODELS / f"{name}.onnx"
        assert p.exists(), f"bundled model {p} missing; rebuild with python models/make_models.py"
        return p

    return path
