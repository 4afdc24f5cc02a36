"""Shared fixtures: a seeded rng and the paths of the committed bundled models."""

from __future__ import annotations

import logging
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


#: the 'q4c' logger as the test session found it (before any test ran the CLI)
_LOG = logging.getLogger("q4c")
_PRISTINE = (_LOG.level, _LOG.propagate, list(_LOG.handlers))


@pytest.fixture(autouse=True)
def _q4c_logger_restored():
    """The CLI's main() configures the 'q4c' logger for the whole process (its own handler, no
    propagation to the root): a test, or a module fixture, that runs the CLI in-process must not
    hide later tests' warnings from caplog. Restored to the session's first state, not to the
    state at this test's start, which a wider-scoped fixture may already have changed."""
    yield
    _LOG.setLevel(_PRISTINE[0])
    _LOG.propagate = _PRISTINE[1]
    _LOG.handlers[:] = _PRISTINE[2]
