"""Every name vqpipe writes in an output folder, in one place.

    {stem}.parquet                 the shard's tokens (what readers read): the marker winner's file
    _vqpipe/shards/{stem}.json     its commit marker: names the winning attempt, its rows, bytes, sha256
    _vqpipe/attempts/{stem}.{id}.attempt   one attempt's Parquet file before it is published
    _vqpipe/failed/{stem}.json     why a shard could not be written (retries exhausted)
    _vqpipe/run.json               the run manifest: fingerprint, status, totals
    _vqpipe/lease.json             held by the live run (heartbeat): one run at a time per folder
    _vqpipe/decode/                the ``vqpipe decode`` report
    _vqpipe/publish/               what ``vqpipe publish`` uploads besides the card and data

Readers skip ``_vqpipe/`` and dot-prefixed temp files, so a folder is always readable as data; an
attempt's file does not end in ``.parquet`` either, so even a recursive ``**/*.parquet`` glob
(HF datasets does not skip ``_``-folders) never sees an uncommitted or losing file.
"""

from __future__ import annotations

import posixpath

INTERNAL_DIR = "_vqpipe"
MARKER_DIR = f"{INTERNAL_DIR}/shards"
FAILED_DIR = f"{INTERNAL_DIR}/failed"
ATTEMPT_DIR = f"{INTERNAL_DIR}/attempts"
ATTEMPT_SUFFIX = ".attempt"
MANIFEST = f"{INTERNAL_DIR}/run.json"
LEASE = f"{INTERNAL_DIR}/lease.json"
DECODE_DIR = f"{INTERNAL_DIR}/decode"
PUBLISH_DIR = f"{INTERNAL_DIR}/publish"  # the one part of _vqpipe/ that `vqpipe publish` uploads
DATA_SUFFIX = ".parquet"


def data_path(output_url: str, stem: str) -> str:
    return posixpath.join(output_url.rstrip("/"), f"{stem}{DATA_SUFFIX}")


def marker_path(output_url: str, stem: str) -> str:
    return posixpath.join(output_url.rstrip("/"), MARKER_DIR, f"{stem}.json")


def attempt_file(stem: str, attempt: str) -> str:
    """Relative to the output folder."""
    return f"{ATTEMPT_DIR}/{stem}.{attempt}{ATTEMPT_SUFFIX}"


def failure_record(stem: str) -> str:
    """Relative to the output folder."""
    return f"{FAILED_DIR}/{stem}.json"


def decode_dir(output_url: str) -> str:
    return posixpath.join(output_url.rstrip("/"), DECODE_DIR)
