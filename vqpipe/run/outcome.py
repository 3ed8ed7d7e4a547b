"""What a run achieved: committed shards with their results, failed shards with their errors."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from vqpipe.records import sum_reasons
from vqpipe.run.shard_job import ShardResult


@dataclass
class Outcome:
    committed: dict[str, ShardResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # stem -> last error
    attempts: collections.Counter = field(default_factory=collections.Counter)
    aborted: str | None = None  # misconfiguration guard message

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.committed.values())

    def failures_by_reason(self) -> dict[str, int]:
        return sum_reasons(r.failures_by_reason for r in self.committed.values())
