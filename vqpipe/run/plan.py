"""What a run has to do: the shard list, what is already committed, what remains."""

from __future__ import annotations

from dataclasses import dataclass, field

from vqpipe.config import ConfigError, RunConfig
from vqpipe.output.folder import failure_stems
from vqpipe.output.sink import committed_stems
from vqpipe.input.urls import expand_urls, shard_stems


@dataclass
class Plan:
    urls: list[str]  # every shard of the run, in order
    stems: dict[str, str]  # url -> output stem
    committed: set[str]  # stems whose commit marker exists
    pending: list[str]  # urls still to process, in order
    failed_before: set[str] = field(default_factory=set)  # stems with a failure record of an earlier run

    @property
    def total(self) -> int:
        return len(self.urls)


def make_plan(config: RunConfig, limit_shards: int | None = None) -> Plan:
    try:
        urls = expand_urls(list(config.input.urls), config.input.storage_options)
    except ValueError as err:  # NoMatchError, unbalanced braces
        raise ConfigError(f"input.urls: {err}") from None
    if not urls:
        raise ConfigError(f"input.urls matched no shards: {list(config.input.urls)}")
    stems = shard_stems(urls)
    committed = committed_stems(config.output.path, config.output.storage_options) & set(stems.values())
    pending = [u for u in urls if stems[u] not in committed]
    if limit_shards is not None:
        pending = pending[:limit_shards]
    return Plan(urls, stems, committed, pending, failure_stems(config) & set(stems.values()))
