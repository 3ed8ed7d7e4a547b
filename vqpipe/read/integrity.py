"""Does an output folder hold what its commit markers say? Every mismatch, named by file.

From one listing of the data files (and one of the markers): a marker whose data file is missing,
not the recorded size, or not yet published; a marker that is not JSON; a data file whose Parquet
footer cannot be read, or whose row count differs from its marker's. With ``verify``, each file's
sha256 is checked against its marker's too (this reads every byte). Used by ``vqpipe inspect`` and
``vqpipe decode``, which exit 1 on any of these, naming each file, without a traceback.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field

import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from vqpipe.output.markers import Audit, audit

HASH_BLOCK = 8 << 20


@dataclass
class Integrity:
    audit: Audit
    footers: dict[str, pq.FileMetaData] = field(default_factory=dict)  # readable data file -> footer
    problems: list[str] = field(default_factory=list)  # one line each, naming the file

    @property
    def readable(self) -> list[str]:
        """Data files (paths within the filesystem) whose footer could be read, sorted."""
        return sorted(self.footers)


def check_output(fs: AbstractFileSystem, root: str, verify: bool = False) -> Integrity:
    result = Integrity(audit(fs, root))
    checked = result.audit
    result.problems += [f"{posixpath.join(root, s)}.parquet: {why}" for s, why in checked.problems.items()]
    result.problems += [f"{path}: commit marker unreadable, {why}" for path, why in checked.unreadable.items()]
    result.problems += [f"{posixpath.join(root, s)}.parquet: committed but not yet published (the next `vqpipe run` "
                        "publishes it)" for s in checked.to_publish]
    for name in sorted(checked.data):
        _check_file(fs, posixpath.join(root, name), checked.marker_of.get(name[: -len(".parquet")]), result, verify)
    return result


def _check_file(fs: AbstractFileSystem, path: str, marker: dict | None, result: Integrity, verify: bool) -> None:
    try:
        with fs.open(path, "rb") as handle:
            footer = pq.ParquetFile(handle).metadata
    except (OSError, ValueError) as err:  # ArrowInvalid (a cut or overwritten file) is a ValueError
        result.problems.append(f"{path}: unreadable Parquet ({type(err).__name__}: {_first_line(err)})")
        return
    result.footers[path] = footer
    if marker is None:
        return
    if isinstance(marker.get("rows"), int) and footer.num_rows != marker["rows"]:
        result.problems.append(f"{path}: {footer.num_rows} rows, its commit marker records {marker['rows']}")
    if verify and marker.get("sha256") and _sha256(fs, path) != marker["sha256"]:
        result.problems.append(f"{path}: sha256 differs from its commit marker's")


def _sha256(fs: AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else ""
