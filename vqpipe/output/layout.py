"""Every name vqpipe writes in an output folder, in one place.

    {stem}.parquet                 the shard's tokens (what readers read)
    _vqpipe/shards/{stem}.json     its commit marker: readers and resumes trust only these
    _vqpipe/failed/{stem}.json     why a shard could not be written (retries exhausted)
    _vqpipe/run.json               the run manifest: fingerprint, status, totals
    _vqpipe/lease.json             held by the live run (heartbeat): one run at a time per folder
    _vqpipe/decode/                the ``vqpipe decode`` report

Readers skip ``_vqpipe/`` and dot-prefixed temp files, so a folder is always readable as data.
"""

from __future__ import annotations

import posixpath

INTERNAL_DIR = "_vqpipe"
MARKER_DIR = f"{INTERNAL_DIR}/shards"
FAILED_DIR = f"{INTERNAL_DIR}/failed"
MANIFEST = f"{INTERNAL_DIR}/run.json"
LEASE = f"{INTERNAL_DIR}/lease.json"
DECODE_DIR = f"{INTERNAL_DIR}/decode"
DATA_SUFFIX = ".parquet"


def data_path(output_url: str, stem: str) -> str:
    return posixpath.join(output_url.rstrip("/"), f"{stem}{DATA_SUFFIX}")


def marker_path(output_url: str, stem: str) -> str:
    return posixpath.join(output_url.rstrip("/"), MARKER_DIR, f"{stem}.json")


def failure_record(stem: str) -> str:
    """Relative to the output folder."""
    return f"{FAILED_DIR}/{stem}.json"


def decode_dir(output_url: str) -> str:
    return posixpath.join(output_url.rstrip("/"), DECODE_DIR)
