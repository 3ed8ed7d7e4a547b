"""Which files of an output folder vqpipe wrote, so nothing else there is replaced or deleted.

A data file is vqpipe's when a commit marker names it, or, for one without a marker (a marker
lost or corrupt, an output of vqpipe 0.1 killed between publish and marker), when its own Parquet
metadata carries the ``vqpipe`` key. Anything else is the user's: img2dataset, for one, writes its
per-shard metadata as ``{shard}.parquet``, the very name vqpipe would write.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import pyarrow.parquet as pq

from vqpipe.output import storage
from vqpipe.output.layout import DATA_SUFFIX
from vqpipe.output.markers import Audit

log = logging.getLogger(__name__)


def foreign_files(output_url: str, storage_options: dict[str, Any], checked: Audit) -> list[str]:
    """Data files (names, sorted) that no marker names and whose metadata is not vqpipe's."""
    return sorted(n for n in _unnamed(checked) if not _has_vqpipe_metadata(output_url, storage_options, n))


def owned_data_files(output_url: str, storage_options: dict[str, Any], checked: Audit) -> list[str]:
    """Data files (names, sorted) that vqpipe wrote: named by a marker, or carrying its metadata."""
    named = {f"{stem}{DATA_SUFFIX}" for stem in checked.named} & set(checked.data)
    return sorted(named | {n for n in _unnamed(checked) if _has_vqpipe_metadata(output_url, storage_options, n)})


def _unnamed(checked: Audit) -> list[str]:
    named = {f"{stem}{DATA_SUFFIX}" for stem in checked.named}
    return [n for n in checked.data if n not in named]


def _has_vqpipe_metadata(output_url: str, storage_options: dict[str, Any], name: str) -> bool:
    fs, root = storage.filesystem(output_url, storage_options)
    path = posixpath.join(root, name)
    try:
        with fs.open(path, "rb") as handle:
            return b"vqpipe" in (pq.read_schema(handle).metadata or {})
    except FileNotFoundError:
        return True  # gone since the listing: nothing of the user's to protect
    except (OSError, ValueError) as err:  # not Parquet at all (ArrowInvalid is a ValueError)
        log.warning("%s is not a readable Parquet file (%s)", path, err)
        return False
