"""What a run achieved: committed shards with their results, failed shards with their errors."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field

from vqpipe.encode.fidelity import summarize
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

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.committed.values())

    def failures_by_reason(self) -> collections.Counter:
        return sum_reasons(r.failures_by_reason for r in self.committed.values())

    def fidelity(self, min_code_agreement: float) -> dict:
        """The committed shards' fidelity audits: min and median across shards, and the shards
        under the floor (:func:`vqpipe.encode.fidelity.summarize`)."""
        return summarize(((stem, r.audit) for stem, r in sorted(self.committed.items())), min_code_agreement)

    def precision_switches(self) -> dict[str, list[dict]]:
        """Shards during which a worker fell back to a safer precision, with the switches."""
        return {stem: r.precision_switches for stem, r in sorted(self.committed.items()) if r.precision_switches}
