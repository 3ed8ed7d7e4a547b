"""Promoting a committed attempt to the shard's final name, and clearing attempts that lost.

An attempt writes its Parquet file under ``_vqpipe/attempts/`` (``layout.attempt_file``), where no
reader looks; the create-only commit marker names the winning attempt; only then is the winner's
file promoted to ``{stem}.parquet``. So the file under the final name is the marker winner's,
byte for byte, whatever a losing duplicate wrote. Publishing is a rename locally (atomic: the
attempt file becomes the data file) and a server-side copy on object stores (a copy is atomic too:
readers see the old object or the new one, whole), then the attempt is deleted. A run killed
between marker and publish leaves both files, and the next run's planning finishes the publish.
"""

from __future__ import annotations

import logging
import os
import posixpath
from datetime import datetime, timedelta, timezone

from fsspec import AbstractFileSystem

from vqpipe.output import retry, storage

log = logging.getLogger(__name__)


def promote(fs: AbstractFileSystem, attempt: str, final: str) -> None:
    """Make ``attempt`` the file at ``final``. Idempotent: when another process (a resuming run)
    published it first, the attempt is gone and ``final`` is there, which is success."""
    try:
        if storage.is_local(fs):
            os.replace(attempt, final)
            storage.fsync_dir(os.path.dirname(final))
            return
        _copy(fs, attempt, final)
    except FileNotFoundError:
        fs.invalidate_cache(posixpath.dirname(final))
        if not storage.exists(fs, final):
            raise
    remove_quietly(fs, attempt)


def _copy(fs: AbstractFileSystem, source: str, target: str) -> None:
    if storage.is_object_store(fs):
        retry.call(lambda: fs.copy(source, target), f"copy {source} to {target}")
        return
    # memory:// and other buffered stores: one whole-object write, like the attempt itself.
    data = retry.call(lambda: fs.cat_file(source), f"read {source}")
    retry.call(lambda: fs.pipe_file(target, data), f"write {target}")


def remove_quietly(fs: AbstractFileSystem, path: str) -> None:
    """Delete ``path``; absent already is fine (removed by an attempt whose answer was lost)."""
    try:
        retry.call(lambda: fs.rm_file(path), f"remove {path}")
    except FileNotFoundError:
        pass


def stale_attempts(listing: dict[str, dict], named: set[str], older_than: timedelta = timedelta(hours=1)
                   ) -> list[str]:
    """Attempt files (from one listing of ``_vqpipe/attempts/``) that no marker names and that are
    older than ``older_than``: left by workers killed before their marker was written. The age
    guard spares live writers of this or a concurrent run."""
    cutoff = datetime.now(timezone.utc) - older_than
    return [p for p, info in listing.items() if p not in named and _modified(info) <= cutoff]


def _modified(info: dict) -> datetime:
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc)
    return datetime.now(timezone.utc)  # unknown age: assume live, keep it
