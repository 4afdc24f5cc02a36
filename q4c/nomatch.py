"""Why a matcher declined a candidate: the one return type of every graph matcher in q4c.

Matchers return their match, `None` (not a candidate at all, nothing to report) or a `NoMatch`.
`code` is the stats key the pass counts (`skipped_<reason>`, STYLE.md §4); `detail` is logged.
"""

from __future__ import annotations

from dataclasses import dataclass

STATS_PREFIX = "skipped_"


@dataclass(frozen=True)
class NoMatch:
    code: str  # a stats key, e.g. "skipped_peephole"
    detail: str = ""

    def __post_init__(self) -> None:
        if not self.code.startswith(STATS_PREFIX):
            raise ValueError(f"NoMatch code {self.code!r} must start with {STATS_PREFIX!r} (it is a stats key)")
