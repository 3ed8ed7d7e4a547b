"""Which input shards exist, asked with one listing per folder or prefix, not one request per URL.

A brace range with a typo names hundreds of shards that do not exist; finding that out shard by
shard, on the workers, costs a failed attempt each and a record per retry. Listing each parent
once at planning costs a request per folder.
"""

from __future__ import annotations

import logging
import posixpath
from collections import defaultdict
from typing import Any

import fsspec

from vqpipe.output import retry

log = logging.getLogger(__name__)

# Schemes with no listing: their shards are found out (or not) when read.
_UNLISTABLE = ("http://", "https://", "pipe:")


def missing_inputs(urls: list[str], storage_options: dict[str, Any]) -> list[str]:
    """The URLs of ``urls`` whose file is not in its parent's listing, in the order given. A folder
    that cannot be listed (no permission to list, an unlistable scheme) is not checked."""
    groups: dict[str, list[str]] = defaultdict(list)  # parent URL -> its file names
    for url in urls:
        if not url.startswith(_UNLISTABLE):
            parent, _, name = url.rpartition("/")
            groups[parent].append(name)
    absent: set[str] = set()
    for parent, names in groups.items():
        fs, path = fsspec.core.url_to_fs(f"{parent}/{names[0]}", **storage_options)
        present = _listing(fs, posixpath.dirname(path))
        if present is not None:
            absent.update(f"{parent}/{n}" for n in names if n not in present)
    return [u for u in urls if u in absent]


def _listing(fs, parent: str) -> set[str] | None:
    fs.invalidate_cache(parent)
    try:
        # Names only: a detailed local listing stats every file, and a folder is no shard anyway.
        found = retry.call(lambda: fs.ls(parent, detail=False), f"list {parent}")
    except (FileNotFoundError, NotADirectoryError):
        return set()
    except OSError as err:  # e.g. list permission denied while reads are allowed: let the workers find out
        log.info("cannot list %s to check the input shards there (%s): not checked", parent, err)
        return None
    return {posixpath.basename(name.rstrip("/")) for name in found}
