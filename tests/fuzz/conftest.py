"""Fuzz tests: the model generator (strategies.py) importable by the tests beside it, and the
fixed-seed hypothesis profile CI runs (derandomized, modest example counts, no deadline: each
compile has its own timeout instead).

benchmarks/fuzz_long.py runs the same tests longer: Q4C_FUZZ_SCALE multiplies every example
and case count, Q4C_FUZZ_SEED (with pytest's --hypothesis-seed) draws new examples."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

settings.register_profile(
    "q4c-fuzz-ci", derandomize="Q4C_FUZZ_SEED" not in os.environ, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.load_profile("q4c-fuzz-ci")
