"""Commit markers read back, and checked against the files they commit.

:func:`read_records` reads every ``{stem}.json`` of a ``_vqpipe/`` folder from one listing, in
batches (concurrent requests on object stores); a record that is not a JSON object is named in
``unreadable`` and otherwise treated as absent. :func:`audit` holds every marker against one
listing of the data files and one of the attempts: a data file missing or not the recorded size
is a problem named by file, unless the marker's attempt file is still there to publish.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from fsspec import AbstractFileSystem

from vqpipe.output import retry, storage
from vqpipe.output.layout import ATTEMPT_DIR, DATA_SUFFIX, MARKER_DIR

JSON_BATCH = 256  # records fetched per request batch


@dataclass
class Records:
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # stem -> record, stem order
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> why it could not be used


def listed_stems(output_url: str, storage_options: dict[str, Any], folder: str) -> set[str]:
    """Stems of the ``{stem}.json`` records in ``folder`` (relative to the output), from one fresh
    listing (caches dropped first); a listing that fails for good raises, never reads as empty."""
    fs, root = storage.filesystem(output_url, storage_options)
    path = posixpath.join(root, folder)
    storage.invalidate(fs, path)
    try:
        names = retry.call(lambda: fs.ls(path, detail=False), f"list {path}")
    except (FileNotFoundError, NotADirectoryError):
        return set()
    base = (posixpath.basename(n) for n in names)
    return {b[: -len(".json")] for b in base if b.endswith(".json") and not b.startswith(".")}


def read_records(fs: AbstractFileSystem, folder: str) -> Records:
    """Every ``{stem}.json`` in ``folder``. Transient errors are retried, and one that outlasts the
    retries is raised: a dropped listing must not read as "no records"."""
    out = Records()
    fs.invalidate_cache(folder)
    try:
        listing = retry.call(lambda: fs.ls(folder, detail=False), f"list {folder}")
    except (FileNotFoundError, NotADirectoryError):
        return out
    names = sorted(p for p in listing if p.endswith(".json") and not posixpath.basename(p).startswith("."))
    for start in range(0, len(names), JSON_BATCH):
        batch = names[start:start + JSON_BATCH]
        bodies = _cat_each(fs, batch)
        for name in (n for n in batch if n in bodies):
            _parse(out, name, bodies[name])
    return out


def _parse(out: Records, name: str, body: bytes) -> None:
    try:
        record = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        out.unreadable[name] = f"not JSON ({err})"
        return
    if not isinstance(record, dict):
        out.unreadable[name] = f"not a JSON object ({type(record).__name__})"
        return
    out.records[posixpath.basename(name)[: -len(".json")]] = record


def _cat_each(fs: AbstractFileSystem, names: list[str]) -> dict[str, bytes]:
    """The bodies of ``names``; each retry asks again only for the files that failed, and a file
    removed since the listing (a concurrent run retried that shard) is left out."""
    bodies: dict[str, bytes] = {}
    gone: set[str] = set()

    def fetch_missing() -> None:
        errors = []
        for name, body in fs.cat([n for n in names if n not in bodies and n not in gone], on_error="return").items():
            if isinstance(body, FileNotFoundError):
                gone.add(name)
            elif isinstance(body, BaseException):
                errors.append(body)
            else:
                bodies[name] = body
        if errors:
            raise errors[0]

    retry.call(fetch_missing, f"read {len(names)} records in {posixpath.dirname(names[0])}")
    return bodies


def data_listing(fs: AbstractFileSystem, root: str) -> dict[str, int]:
    """``{file name: size}`` of the data files at the top of ``root``, from one listing."""
    fs.invalidate_cache(root)
    found = storage.glob(fs, posixpath.join(root, f"*{DATA_SUFFIX}"))
    return {posixpath.basename(p): int(info["size"]) for p, info in found.items()
            if not posixpath.basename(p).startswith(".")}


def attempt_listing(fs: AbstractFileSystem, root: str) -> dict[str, dict]:
    """``{path: info}`` of every attempt file under ``_vqpipe/attempts/``."""
    folder = posixpath.join(root, ATTEMPT_DIR)
    fs.invalidate_cache(folder)
    try:
        found = retry.call(lambda: fs.ls(folder, detail=True), f"list {folder}")
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {i["name"]: i for i in found if i.get("type") == "file"}


@dataclass
class Audit:
    """Every marker of an output folder, checked against its files."""

    marker_of: dict[str, dict] = field(default_factory=dict)  # every readable marker, by stem
    good: dict[str, dict] = field(default_factory=dict)  # stem -> marker whose data file is as recorded
    to_publish: dict[str, str] = field(default_factory=dict)  # stem -> attempt file a marker names, unpublished
    problems: dict[str, str] = field(default_factory=dict)  # stem -> what is wrong (file named)
    unreadable: dict[str, str] = field(default_factory=dict)  # marker path -> why
    data: dict[str, int] = field(default_factory=dict)  # the data listing
    attempts: dict[str, dict] = field(default_factory=dict)  # the attempt listing

    @property
    def committed(self) -> set[str]:
        """Stems whose marker stands: the data file is as recorded, or about to be published."""
        return set(self.good) | set(self.to_publish)

    @property
    def named(self) -> set[str]:
        """Stems some marker names, a corrupt one included: their data files are vqpipe's."""
        return set(self.marker_of) | {posixpath.basename(p)[: -len(".json")] for p in self.unreadable}


def audit(fs: AbstractFileSystem, root: str) -> Audit:
    """Read every marker and check it against one listing of the attempts, then one of the data
    files (in that order: a publish finishing between them is then seen as done, never lost)."""
    records = read_records(fs, posixpath.join(root, MARKER_DIR))
    result = Audit(unreadable=records.unreadable, marker_of=records.records)
    result.attempts = attempt_listing(fs, root)
    result.data = data_listing(fs, root)
    for stem, marker in records.records.items():
        _check(result, root, stem, marker)
    return result


def _check(result: Audit, root: str, stem: str, marker: dict) -> None:
    name = f"{stem}{DATA_SUFFIX}"
    size, recorded = result.data.get(name), marker.get("bytes")
    if size is not None and (recorded is None or size == recorded):
        result.good[stem] = marker
        return
    named = marker.get("attempt_file")
    attempt = posixpath.join(root, named) if isinstance(named, str) and named else None
    if attempt in result.attempts and (recorded is None or int(result.attempts[attempt]["size"]) == recorded):
        result.to_publish[stem] = attempt
    elif size is None:
        result.problems[stem] = f"{name} is missing (its commit marker is there)"
    else:
        result.problems[stem] = f"{name} is {size} bytes, its commit marker records {recorded}"
