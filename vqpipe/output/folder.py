"""Output-folder housekeeping: JSON records under ``_vqpipe/``, ``--overwrite``, leftovers of
killed writers. Every call retries transient errors and never reads a failed listing as empty."""

from __future__ import annotations

import json
import logging
import posixpath
import uuid

from vqpipe.config import ConfigError, RunConfig
from vqpipe.output import retry, storage
from vqpipe.output.layout import ATTEMPT_DIR, FAILED_DIR, INTERNAL_DIR, MARKER_DIR
from vqpipe.output.markers import Audit, audit, listed_stems
from vqpipe.output.ownership import owned_data_files
from vqpipe.output.promote import promote, stale_attempts

log = logging.getLogger(__name__)


def write_json(config: RunConfig, relative: str, data: dict, atomic: bool = True) -> None:
    """Write a record whole (through a temp file locally), or with ``atomic=False`` in place: a
    full disk may have room for the new version of a file but not for a second copy of it."""
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    path = posixpath.join(root, relative)
    body = (json.dumps(data, indent=2, default=str) + "\n").encode()
    retry.call(lambda: fs.makedirs(posixpath.dirname(path), exist_ok=True), f"mkdir for {path}")
    write = storage.write_atomic if atomic else _overwrite
    retry.call(lambda: write(fs, path, body), f"write {path}")


def _overwrite(fs, path: str, body: bytes) -> None:
    """In place, into the file's own blocks: truncating first would free them for another writer
    on a full disk and leave half a record. A body that outgrows the file is written compact."""
    if not storage.is_local(fs):
        fs.pipe_file(path, body)
        return
    with open(path, "r+b" if fs.exists(path) else "wb") as handle:
        size = handle.seek(0, 2)
        if len(body) > size:
            body = json.dumps(json.loads(body), separators=(",", ":"), default=str).encode()
        handle.seek(0)
        handle.write(body)
        handle.truncate()


def sweep_leftovers(config: RunConfig) -> None:
    """Clean what killed workers of earlier runs left: S3 multipart uploads never completed and
    local temp files (both older than an hour, so live writers of this run are spared)."""
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    try:
        aborted = storage.sweep_incomplete_uploads(fs, root)
        removed = storage.sweep_stale_temp_files(fs, root, subfolders=(INTERNAL_DIR, MARKER_DIR, FAILED_DIR))
    except OSError as err:  # housekeeping: the next run sweeps again
        log.warning("could not sweep leftovers under %s: %s: %s", config.output.path, type(err).__name__, err)
        return
    if aborted or removed:
        log.info("swept %d incomplete uploads and %d temp files under %s", aborted, removed, config.output.path)


def failure_stems(config: RunConfig) -> set[str]:
    """Stems with a failure record, from one listing: the driver removes only these when their
    shards commit, instead of one storage call per committed shard."""
    return listed_stems(config.output.path, config.output.storage_options, FAILED_DIR)


def remove_json(config: RunConfig, relative: str) -> None:
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    path = posixpath.join(root, relative)
    fs.invalidate_cache(posixpath.dirname(path))
    _remove(fs, path)


def remove_output(config: RunConfig) -> None:
    """``--overwrite``: drop what vqpipe's own records name -- commit markers, failure records,
    attempts, and the data files a marker names or whose metadata is vqpipe's -- and nothing else."""
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    fs.invalidate_cache(root)
    checked = audit(fs, root)
    # File by file from listings that fail loudly (a recursive rm lists through fsspec's walk, which
    # skips folders it failed to list). Markers go first: an overwrite cut short then leaves data
    # without markers, which the next run redoes, never a marker whose data is gone.
    for pattern in (f"{MARKER_DIR}/*.json", f"{FAILED_DIR}/*.json", f"{ATTEMPT_DIR}/*"):
        for path in storage.glob(fs, posixpath.join(root, pattern)):
            _remove(fs, path)
    for name in owned_data_files(config.output.path, config.output.storage_options, checked):
        _remove(fs, posixpath.join(root, name))
    fs.invalidate_cache(root)


def repair(config: RunConfig, checked: Audit, stems: set[str]) -> None:
    """Before a run: finish publishes a killed run left (every marker's), and clear what stands in
    the way of redoing the shards ``stems`` whose marker does not hold (data missing or altered,
    marker corrupt); attempts no marker names, left by killed workers, are swept."""
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    for stem, attempt in checked.to_publish.items():
        log.info("finishing the publish of %s, which an earlier run committed", stem)
        promote(fs, attempt, posixpath.join(root, f"{stem}.parquet"))
    for stem in set(checked.problems) & stems:
        _remove(fs, posixpath.join(root, MARKER_DIR, f"{stem}.json"))  # the marker first, as in --overwrite
        _remove(fs, posixpath.join(root, f"{stem}.parquet"))
    for path in checked.unreadable:
        if posixpath.basename(path)[: -len(".json")] in stems:
            _remove(fs, path)
    named = {posixpath.join(root, m["attempt_file"]): s for s, m in checked.marker_of.items() if m.get("attempt_file")}
    published = [p for p, stem in named.items() if stem in checked.good and p in checked.attempts]
    for path in published + stale_attempts(checked.attempts, set(named)):
        _remove(fs, path)  # published already (a run killed before deleting it), or no marker names it


def ensure_writable(config: RunConfig) -> None:
    """Raise ConfigError, in one line, when the output folder cannot be created or written (a path
    under ``/proc``, under a regular file, without permission): found before any model or Ray starts."""
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    probe = posixpath.join(root, INTERNAL_DIR, f".write-probe-{uuid.uuid4().hex}")
    try:
        retry.call(lambda: fs.makedirs(posixpath.dirname(probe), exist_ok=True), f"mkdir for {probe}")
        retry.call(lambda: fs.pipe_file(probe, b""), f"write {probe}")
        _remove(fs, probe)
    except OSError as err:
        raise ConfigError(f"output.path {config.output.path} cannot be written: {type(err).__name__}: "
                          f"{err.strerror or err}") from None


def _remove(fs, path: str) -> None:
    try:
        retry.call(lambda: fs.rm_file(path), f"remove {path}")
    except FileNotFoundError:
        pass  # never there, or removed by an attempt whose answer was lost
