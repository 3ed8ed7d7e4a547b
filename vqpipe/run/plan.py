"""What a run has to do: the shard list, what is already committed, what remains, and what in the
output folder is wrong (markers whose data is missing or altered, files vqpipe did not write).

A committed shard is recognised by the source URL its marker records, whatever else the list
holds: a marker's stem is kept for its source (outputs written under older stem names included),
and a shard without a marker gets :func:`~vqpipe.input.urls.shard_stem` of its URL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vqpipe.config import ConfigError, RunConfig
from vqpipe.input.presence import missing_inputs
from vqpipe.input.urls import Expanded, expand, glob_reaches, normalise_url, shard_stem
from vqpipe.output import storage
from vqpipe.output.folder import failure_stems
from vqpipe.output.markers import Audit, audit
from vqpipe.output.ownership import foreign_files

log = logging.getLogger(__name__)


@dataclass
class Plan:
    urls: list[str]  # every shard of the run, in order
    stems: dict[str, str]  # url -> output stem
    committed: set[str]  # stems whose commit marker stands (data as recorded, or about to be published)
    pending: list[str]  # urls still to process, in order
    missing: list[str] = field(default_factory=list)  # pending urls whose input file does not exist
    passed_over: int = 0  # non-tar files the input globs matched
    audit: Audit = field(default_factory=Audit)  # the output's markers against its files
    failed_before: set[str] = field(default_factory=set)  # stems with a failure record of an earlier run

    @property
    def total(self) -> int:
        return len(self.urls)

    @property
    def redo(self) -> dict[str, str]:
        """Stems of this plan whose marker does not hold (data file missing or altered) -> why."""
        mine = set(self.stems.values())
        return {s: why for s, why in self.audit.problems.items() if s in mine}


def make_plan(config: RunConfig, limit_shards: int | None = None) -> Plan:
    """The plan; raises ConfigError for an input that names nothing (or nothing that exists), an
    output inside an input glob's reach, and an output folder holding Parquet files vqpipe did not
    write (named)."""
    expanded = _expand(config)
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    checked = audit(fs, root)
    _refuse_foreign(config, checked)
    stems = _stems(expanded.urls, checked)
    standing = checked.committed
    committed = {stems[u] for u in expanded.urls if stems[u] in standing}
    pending = [u for u in expanded.urls if stems[u] not in committed]
    missing = missing_inputs(pending, config.input.storage_options)
    if missing and len(missing) == len(pending) and not committed:
        raise ConfigError(f"input.urls: none of the {len(missing)} input shards exists "
                          f"(first: {', '.join(missing[:3])})")
    absent = set(missing)
    pending = [u for u in pending if u not in absent]
    if limit_shards is not None:
        pending = pending[:limit_shards]
    return Plan(expanded.urls, stems, committed, pending, missing, expanded.passed_over, checked,
                failure_stems(config) & set(stems.values()))


def _expand(config: RunConfig) -> Expanded:
    try:
        expanded = expand(list(config.input.urls), config.input.storage_options)
    except ValueError as err:  # NoMatchError, unbalanced braces
        raise ConfigError(f"input.urls: {err}") from None
    if not expanded.urls:
        raise ConfigError(f"input.urls matched no shards: {list(config.input.urls)}")
    reached = [g for g in expanded.globs if glob_reaches(g, config.output.path)]
    if reached:
        raise ConfigError(f"output.path {config.output.path} is inside the reach of the input glob "
                          f"{reached[0]}: write the output elsewhere")
    return expanded


def _refuse_foreign(config: RunConfig, checked: Audit) -> None:
    foreign = foreign_files(config.output.path, config.output.storage_options, checked)
    if foreign:
        raise ConfigError(f"output.path {config.output.path} holds Parquet files vqpipe did not write: "
                          f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''} ({len(foreign)} in all); "
                          "vqpipe would replace or mix with them: use an empty or vqpipe-only folder")


def _stems(urls: list[str], checked: Audit) -> dict[str, str]:
    """A marker's stem for the shard whose source it records; ``shard_stem`` for the rest."""
    by_source = {normalise_url(m["source"]): s for s, m in checked.marker_of.items()
                 if isinstance(m.get("source"), str)}
    stems = {u: by_source.get(u) or shard_stem(u) for u in urls}
    owner: dict[str, str] = {}
    for url, stem in stems.items():
        recorded = checked.marker_of.get(stem, {}).get("source")
        if stem in owner or (isinstance(recorded, str) and normalise_url(recorded) != url):
            raise ConfigError(f"{url} gets the output stem {stem}, already used by "
                              f"{owner.get(stem) or recorded}: rename one")
        owner[stem] = url
    return stems
