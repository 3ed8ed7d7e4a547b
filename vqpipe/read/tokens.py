"""Read a vqpipe output folder: Arrow tables, NumPy arrays, and the lineage metadata.

    table = read_tokens("out/demo", columns=["key", "codes"])
    codes = codes_array(table)        # (N, h, w) uint16; (N, V, h, w) with V > 1 preprocess.views
    latents = latents_array(table)    # (N, C, h, w) float16; (N, V, C, h, w) with views

The arrays share Arrow's buffers when the column is one chunk (one file read with one row group,
or a table ``combine_chunks()``-ed once); a column of several chunks is copied once into one
array. For training, :class:`vqpipe.read.dataset.TokenDataset` streams row groups instead.
``sample_rows`` draws a seeded sample across the files, keeping which file each row came from.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vqpipe.output import storage
from vqpipe.output.arrays import fixed_list_to_numpy


def data_files(path: str, storage_options: dict | None = None) -> list[str]:
    """The Parquet files at the top of ``path``, sorted, as paths within its filesystem.

    Every ``{stem}.parquet`` under its final name is complete and its commit marker's winner (the
    sink publishes only after the marker, atomically); attempts live under ``_vqpipe/`` with another
    suffix, and dot-prefixed temp files are never data. Whether each file still matches its marker
    (not deleted, cut or replaced since) is :func:`vqpipe.read.integrity.check_output`'s question.
    """
    return sorted(data_file_sizes(path, storage_options))


def data_file_sizes(path: str, storage_options: dict | None = None) -> dict[str, int]:
    """``data_files`` with their sizes in bytes, from one listing."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    fs.invalidate_cache(root)
    found = storage.glob(fs, posixpath.join(root, "*.parquet"))
    return {p: int(info["size"]) for p, info in found.items() if not posixpath.basename(p).startswith(".")}


def footer(fs: fsspec.AbstractFileSystem, path: str) -> pq.FileMetaData:
    """The Parquet footer of one file: row counts, row groups, statistics, schema (no data read)."""
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata


class NotTokenOutput(ValueError):
    """A Parquet file without the ``vqpipe`` metadata: not written by vqpipe."""


def vqpipe_metadata(schema: pa.Schema, where: str) -> dict[str, Any]:
    """The ``vqpipe`` key-value metadata of a file's schema; ``where`` names the file in errors."""
    raw = (schema.metadata or {}).get(b"vqpipe")
    if raw is None:
        raise NotTokenOutput(f"{where}: no vqpipe metadata: not written by vqpipe")
    return json.loads(raw)


def read_tokens(path: str, columns: list[str] | None = None, filters=None,
                storage_options: dict | None = None) -> pa.Table:
    """All rows of an output folder (or one file) as a ``pyarrow.Table``, one chunk per row group.

    ``filters`` is pyarrow's (``[("key", "in", keys)]``). This loads the selection whole: pass
    ``columns`` to leave out what you do not need.
    """
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    # The data files, not the folder: pyarrow would try a published dataset card (README.md) as Parquet.
    files = (data_files(path, storage_options) or root) if fs.isdir(root) else root
    return pq.read_table(files, columns=columns, filters=filters, filesystem=fs)


def codes_array(table: pa.Table, column: str = "codes") -> np.ndarray:
    """(N, h, w) codes in their stored integer type (uint16 for codebooks up to 65536); (N, V, h, w)
    for an output of V > 1 views (named in ``token_metadata(path)["views"]``).
    Zero-copy for a one-chunk column, else copied once."""
    return fixed_list_to_numpy(table.column(column))


def latents_array(table: pa.Table, column: str = "latents") -> np.ndarray:
    """(N, C, h, w) scaled latents in their stored float type (float16 by default); (N, V, C, h, w)
    with V > 1 views. Zero-copy for a one-chunk column, else copied once."""
    return fixed_list_to_numpy(table.column(column))


def token_metadata(path: str, storage_options: dict | None = None) -> dict:
    """The ``vqpipe`` key-value metadata of the first data file: model, scaling, shapes, preprocessing."""
    files = data_files(path, storage_options)
    if not files:
        raise FileNotFoundError(f"{path}: no Parquet files")
    fs, _ = fsspec.core.url_to_fs(path, **(storage_options or {}))
    with fs.open(files[0], "rb") as f:
        schema = pq.read_schema(f)
    return vqpipe_metadata(schema, files[0])


@dataclass
class Sampled:
    """Rows drawn from an output (``sample_rows``), and what a check needs to know about every file."""

    fs: fsspec.AbstractFileSystem  # the output's
    table: pa.Table  # the drawn rows plus a ``file`` column: the data file each row came from
    footers: dict[str, pq.FileMetaData]  # every data file
    metadata: dict[str, dict | None]  # every data file -> its vqpipe metadata (None: has none)
    skipped: dict[str, str]  # data file -> why its rows were left out (columns differ from the first's)

    def reference_metadata(self) -> dict:
        """The first data file's vqpipe metadata: what the other files are held to."""
        first = next(iter(self.metadata))
        if self.metadata[first] is None:
            raise NotTokenOutput(f"{first}: no vqpipe metadata: not written by vqpipe")
        return self.metadata[first]


def sample_rows(path: str, storage_options: dict, n: int, seed: int, files: list[str] | None = None) -> Sampled:
    """``n`` rows drawn uniformly without replacement across all data files (or ``files``, paths
    within the filesystem: e.g. only those whose footer can be read), seeded; only the row groups
    holding a drawn row are read. Rows of a file whose columns differ from the first file's are left
    out, and the file is listed in ``skipped``."""
    fs, _ = fsspec.core.url_to_fs(path, **storage_options)
    files = data_files(path, storage_options) if files is None else sorted(files)
    if not files:
        raise FileNotFoundError(f"{path}: no Parquet files")
    footers = {f: footer(fs, f) for f in files}
    reference = _columns_schema(footers[files[0]])
    skipped = {f: f"columns differ from {files[0]}'s ({_difference(_columns_schema(footers[f]), reference)})"
               for f in files if not _columns_schema(footers[f]).equals(reference)}
    drawn = _draw([footers[f].num_rows for f in files], n, seed)
    tables = [_read_rows(fs, f, footers[f], rows).append_column("file", pa.array([f] * len(rows)))
              for f, rows in zip(files, drawn) if len(rows) and f not in skipped]
    empty = reference.empty_table().append_column("file", pa.array([], pa.string()))
    metadata = {f: _file_metadata(f, md) for f, md in footers.items()}
    return Sampled(fs, pa.concat_tables([empty, *tables]), footers, metadata, skipped)


def _draw(counts: list[int], n: int, seed: int) -> list[np.ndarray]:
    """``n`` of ``sum(counts)`` rows without replacement, as sorted file-relative rows per file."""
    total = sum(counts)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    offsets = np.cumsum([0] + counts)
    return [picks[(picks >= lo) & (picks < hi)] - lo for lo, hi in zip(offsets[:-1], offsets[1:])]


def _columns_schema(md: pq.FileMetaData) -> pa.Schema:
    return md.schema.to_arrow_schema().remove_metadata()


def _difference(schema: pa.Schema, reference: pa.Schema) -> str:
    def describe(s: pa.Schema, name: str) -> str:
        return str(s.field(name)) if name in s.names else "absent"

    names = dict.fromkeys(reference.names + schema.names)
    return "; ".join(f"{describe(schema, n)} vs {describe(reference, n)}" for n in names
                     if describe(schema, n) != describe(reference, n))


def _read_rows(fs, path: str, md: pq.FileMetaData, rows: np.ndarray) -> pa.Table:
    """Rows ``rows`` (sorted, file-relative) of one file, reading only their row groups."""
    sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
    starts = np.cumsum([0] + sizes)
    owner = np.searchsorted(starts, rows, side="right") - 1  # the row group of each row
    groups = np.unique(owner).tolist()
    with fs.open(path, "rb") as handle:
        table = pq.ParquetFile(handle).read_row_groups(groups)
    read_start = dict(zip(groups, np.cumsum([0] + [sizes[g] for g in groups])))  # in ``table``
    local = [read_start[g] + r - starts[g] for r, g in zip(rows, owner)]
    return table.take(pa.array(local, pa.int64())).replace_schema_metadata(None)


def _file_metadata(path: str, md: pq.FileMetaData) -> dict | None:
    try:
        return vqpipe_metadata(md.schema.to_arrow_schema(), path)
    except NotTokenOutput:
        return None
