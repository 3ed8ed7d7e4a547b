"""What a run could not encode, for the decode report: the failed samples by reason with a few keys
each (from the commit markers) and the failed shards (from the failure records)."""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass, field

import fsspec

from vqpipe.output.layout import FAILED_DIR, MARKER_DIR
from vqpipe.output.markers import read_records
from vqpipe.read.inspect import FailedShard, failed_shard

EXAMPLES = 3  # keys shown per reason


@dataclass
class ReasonCount:
    reason: str
    count: int
    examples: list[dict] = field(default_factory=list)  # {stem, key, message}, the first shards' first


@dataclass
class RunFailures:
    samples: list[ReasonCount]  # most common reason first
    shards: list[FailedShard]

    @property
    def failed_samples(self) -> int:
        return sum(r.count for r in self.samples)

    def to_dict(self) -> dict:
        return {"samples": [asdict(r) for r in self.samples], "shards": [asdict(s) for s in self.shards]}

    def summary(self) -> str:
        """One line: ``8 samples (decode_error 4, no_image 4), 0 shards``."""
        reasons = ", ".join(f"{r.reason} {r.count}" for r in self.samples)
        return f"{self.failed_samples} samples{f' ({reasons})' if reasons else ''}, {len(self.shards)} shards"


def run_failures(output_url: str, storage_options: dict | None = None, examples: int = EXAMPLES) -> RunFailures:
    fs, root = fsspec.core.url_to_fs(output_url, **(storage_options or {}))
    by_reason: dict[str, ReasonCount] = {}
    for stem, marker in read_records(fs, posixpath.join(root, MARKER_DIR)).records.items():
        for reason, count in marker.get("failures_by_reason", {}).items():
            by_reason.setdefault(reason, ReasonCount(reason, 0)).count += count
        for failure in marker.get("failures", []):
            entry = by_reason.setdefault(failure["reason"], ReasonCount(failure["reason"], 0))
            if len(entry.examples) < examples:
                entry.examples.append({"stem": stem, "key": failure.get("key"), "message": failure.get("message")})
    shards = [failed_shard(stem, record) for stem, record in read_records(fs, posixpath.join(root, FAILED_DIR)).records.items()]
    return RunFailures(sorted(by_reason.values(), key=lambda r: (-r.count, r.reason)), shards)
