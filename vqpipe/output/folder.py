"""Output-folder housekeeping: JSON records under ``_vqpipe/``, ``--overwrite``, leftovers of
killed writers. Every call retries transient errors and never reads a failed listing as empty."""

from __future__ import annotations

import json
import logging
import posixpath

from vqpipe.config import RunConfig
from vqpipe.output import retry, storage
from vqpipe.output.layout import FAILED_DIR, INTERNAL_DIR, MARKER_DIR

log = logging.getLogger(__name__)


def write_json(config: RunConfig, relative: str, data: dict, atomic: bool = True) -> None:
    """Write a record whole (through a temp file locally), or with ``atomic=False`` in place: a
    full disk may have room for the new version of a file but not for a second copy of it."""
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    path = posixpath.join(root, relative)
    body = (json.dumps(data, indent=2, default=str) + "\n").encode()
    retry.call(lambda: fs.makedirs(posixpath.dirname(path), exist_ok=True), f"mkdir for {path}")
    write = storage.write_atomic if atomic else (lambda fs, path, body: fs.pipe_file(path, body))
    retry.call(lambda: write(fs, path, body), f"write {path}")


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
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    folder = posixpath.join(root, FAILED_DIR)
    storage.invalidate(fs, folder)
    try:
        names = retry.call(lambda: fs.ls(folder, detail=False), f"list {folder}")
    except FileNotFoundError:
        return set()
    base = (posixpath.basename(n) for n in names)
    return {b[: -len(".json")] for b in base if b.endswith(".json") and not b.startswith(".")}


def remove_json(config: RunConfig, relative: str) -> None:
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    path = posixpath.join(root, relative)
    fs.invalidate_cache(posixpath.dirname(path))
    _remove(fs, path)


def remove_output(config: RunConfig) -> None:
    """``--overwrite``: drop committed data, markers and failure records before starting again."""
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    fs.invalidate_cache(root)
    # File by file from listings that fail loudly (a recursive rm lists through fsspec's walk, which
    # skips folders it failed to list). Markers go first: an overwrite cut short then leaves data
    # without markers, which the next run redoes, never a marker whose data is gone.
    for pattern in (f"{MARKER_DIR}/*.json", f"{FAILED_DIR}/*.json", "*.parquet"):
        for path in storage.glob(fs, posixpath.join(root, pattern)):
            _remove(fs, path)
    fs.invalidate_cache(root)


def _remove(fs, path: str) -> None:
    try:
        retry.call(lambda: fs.rm_file(path), f"remove {path}")
    except FileNotFoundError:
        pass  # never there, or removed by an attempt whose answer was lost
