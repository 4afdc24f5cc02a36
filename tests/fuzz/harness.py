"""Running the CLI on fuzz inputs and judging the outcome: the contract every entry point keeps.

Exit 0 (or 3 for `diff` over tolerance), or exit 1/2 with exactly one `Error:` line and no
traceback; an "internal error" line is a q4c bug even though it is one line; no output file and
no temporary file left beside it on failure; the input files unchanged; never a hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from q4c.cli import main

#: benchmarks/fuzz_long.py raises these; CI runs scale 1 with the fixed seed 0
SCALE = int(os.environ.get("Q4C_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("Q4C_FUZZ_SEED", "0"))


def scaled(n: int) -> int:
    return n * SCALE


class Hang(BaseException):
    """Raised by the per-call alarm; a BaseException so that no `except Exception` in q4c eats it."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread after `seconds` (SIGALRM; fuzz tests run single-threaded)."""

    def fire(signum, frame):
        raise Hang(f"no result after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str
    error: str | None  # the one `Error:` line when exit != 0


def invoke(args: Sequence[str], timeout: float = 60.0) -> Outcome:
    """Run `q4c ARGS` in-process; fail (AssertionError) on a traceback or a hang."""
    runner = CliRunner()
    with deadline(timeout):
        result = runner.invoke(main, list(args), catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        raise AssertionError(f"q4c {' '.join(args)}: uncaught exception (a traceback for the user):\n{tb}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "Traceback" not in result.stderr, f"q4c {' '.join(args)}: traceback on stderr:\n{result.stderr}"
    if result.exit_code in (1, 2):
        assert len(errors) == 1, f"q4c {' '.join(args)}: exit {result.exit_code} with {len(errors)} error lines:\n{result.stderr}"
        assert result.stderr.rstrip().splitlines()[-1] == errors[0].rstrip(), f"error line is not the last line:\n{result.stderr}"
        assert "internal error" not in errors[0], f"q4c {' '.join(args)}: a q4c bug: {errors[0]}"
    return Outcome(result.exit_code, result.stdout, result.stderr, errors[0] if errors else None)


def leftovers(directory: Path, keep: Sequence[Path]) -> list[str]:
    """Files in `directory` other than `keep`: partial outputs, temporary files."""
    kept = {p.name for p in keep}
    return sorted(p.name for p in directory.iterdir() if p.name not in kept)
