"""What a run achieved: committed shards with their results, failed shards with their errors."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from vqpipe.encode.fidelity import summarize
from vqpipe.records import sum_reasons
from vqpipe.run.shard_job import ShardResult


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

    def failures_by_reason(self) -> dict[str, int]:
        return sum_reasons(r.failures_by_reason for r in self.committed.values())

    def steady_rate(self) -> float | None:
        """Images per second of worker time: what one worker does once started, whatever the
        start-up cost and however many workers ran."""
        busy = sum(r.times.total_s for r in self.committed.values())
        return self.rows / busy if busy > 0 else None

    def rates_by_worker(self) -> dict[str, float]:
        """Steady images/s of each worker process, in the order they first committed a shard."""
        rows: dict[str, int] = collections.defaultdict(int)
        busy: dict[str, float] = collections.defaultdict(float)
        for r in self.committed.values():
            rows[r.worker] += r.rows
            busy[r.worker] += r.times.total_s
        return {w: rows[w] / busy[w] for w in rows if busy[w] > 0}

    def startup_s(self, run_started: float) -> float | None:
        """From the run's start to the first shard a worker began: Ray's start, the actors' start and
        their model loads."""
        starts = [r.started_at for r in self.committed.values() if r.started_at]
        return max(0.0, min(starts) - run_started) if starts else None

    def fidelity(self, min_code_agreement: float) -> dict:
        """The committed shards' fidelity audits: min and median across shards, and the shards
        under the floor (:func:`vqpipe.encode.fidelity.summarize`)."""
        return summarize(((stem, r.audit) for stem, r in sorted(self.committed.items())), min_code_agreement)

    def precision_switches(self) -> dict[str, list[dict]]:
        """Shards during which a worker fell back to a safer precision, with the switches."""
        return {stem: r.precision_switches for stem, r in sorted(self.committed.items()) if r.precision_switches}

    def filtered_by_rule(self) -> dict[str, int]:
        """Samples left out by input.filters / max_aspect_ratio: not failures, never seen by the guard."""
        return sum_reasons(r.filtered_by_rule for r in self.committed.values())
