"""What a run achieved: committed shards with their results, failed shards with their errors."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field

from vqpipe.run.shard_job import ShardResult


def sum_reasons(counts: Iterable[dict[str, int]]) -> collections.Counter:
    """Failures by reason, added up over shards (markers, results): the one place they are summed."""
    total: collections.Counter = collections.Counter()
    for c in counts:
        total.update(c)
    return total


@dataclass
class Outcome:
    committed: dict[str, ShardResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # stem -> last error
    attempts: collections.Counter = field(default_factory=collections.Counter)
    aborted: str | None = None  # misconfiguration guard message
    fatal: str | None = None  # the run could not go on (workers cannot start, storage full)
    interrupted: int | None = None  # the signal that stopped the run

    @property
    def stopped(self) -> bool:
        """The run ended before its queue did."""
        return bool(self.aborted or self.fatal or self.interrupted)

    @property
    def status(self) -> str:
        """The manifest's ``status``."""
        if self.interrupted:
            return "interrupted"
        if self.aborted:
            return "aborted"
        return "failed" if self.fatal or self.failed else "complete"

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.committed.values())

    def failures_by_reason(self) -> collections.Counter:
        return sum_reasons(r.failures_by_reason for r in self.committed.values())
