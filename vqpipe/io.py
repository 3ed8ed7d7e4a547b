"""Read a vqpipe output folder: Arrow tables, NumPy arrays, and the lineage metadata.

    table = read_tokens("out/demo", columns=["key", "codes"])
    codes = codes_array(table)        # (N, h, w) uint16, zero-copy
    latents = latents_array(table)    # (N, C, h, w) float16, zero-copy
"""

from __future__ import annotations

import json
import posixpath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vqpipe.arrays import fixed_list_to_numpy


def data_files(path: str, storage_options: dict | None = None) -> list[str]:
    """The committed-or-not Parquet files at the top of ``path`` (``_vqpipe/`` is never data)."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    fs.invalidate_cache(root)
    return sorted(p for p in fs.glob(posixpath.join(root, "*.parquet")) if not posixpath.basename(p).startswith("."))


def read_tokens(path: str, columns: list[str] | None = None, filters=None,
                storage_options: dict | None = None) -> pa.Table:
    """All rows of an output folder (or one file) as a ``pyarrow.Table``."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return pq.read_table(root, columns=columns, filters=filters, filesystem=fs)


def codes_array(table: pa.Table, column: str = "codes") -> np.ndarray:
    return fixed_list_to_numpy(table.column(column))


def latents_array(table: pa.Table, column: str = "latents") -> np.ndarray:
    return fixed_list_to_numpy(table.column(column))


def token_metadata(path: str, storage_options: dict | None = None) -> dict:
    """The ``vqpipe`` key-value metadata of the first data file: model, scaling, shapes, preprocessing."""
    files = data_files(path, storage_options)
    if not files:
        raise FileNotFoundError(f"{path}: no Parquet files")
    fs, _ = fsspec.core.url_to_fs(path, **(storage_options or {}))
    with fs.open(files[0], "rb") as f:
        schema = pq.read_schema(f)
    raw = (schema.metadata or {}).get(b"vqpipe")
    if raw is None:
        raise ValueError(f"{files[0]}: no vqpipe metadata: not written by vqpipe")
    return json.loads(raw)
