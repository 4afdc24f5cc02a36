"""--latency-budget's text is parsed by a leaf module (q4c.latency.budget), so checking the option
in q4c.config does not import the planner (which imports q4c.quant and q4c.recurrent_lowering,
which import q4c.config: the cycle that kept them out of the layers contract)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from q4c.config import CompileOptions
from q4c.errors import ConfigError
from q4c.latency.budget import latency_budget_seconds

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("text", "fp32_s", "seconds"), [("0.6", 2.0, 1.2), ("0.5x", 0.01, 0.005), ("12ms", 5.0, 0.012),
                                                         (" 1.5MS ", 1.0, 0.0015)])
def test_ratios_and_milliseconds(text, fp32_s, seconds):
    assert latency_budget_seconds(text, fp32_s) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["0", "-0.5", "-5ms", "0ms", "nan", "infms", "fast"])
def test_anything_but_a_positive_number_is_refused(text):
    with pytest.raises(ValueError):
        latency_budget_seconds(text, 1.0)
    with pytest.raises(ConfigError, match="--latency-budget must be a positive ratio"):
        CompileOptions(latency_budget=text)


def test_checking_the_option_does_not_import_the_planner():
    code = ("import sys; from q4c.config import CompileOptions; CompileOptions(latency_budget='12ms'); "
            "print(sorted(m for m in sys.modules if m.startswith('q4c.latency.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['q4c.latency.budget']"
