"""Parquet output for one shard, and the commit protocol that makes it visible.

Layout under the output URL (every name in :mod:`vqpipe.output.layout`)::

    {stem}.parquet                          one file per shard, flat: the marker winner's
    _vqpipe/attempts/{stem}.{id}.attempt    an attempt's file, before it is published
    _vqpipe/shards/{stem}.json              the commit marker; readers and resumes trust only these

Commit order: finish the attempt's Parquet file under ``_vqpipe/attempts/`` -> create the marker
(create-only), naming the attempt with its rows, bytes and sha256 (and ETag on S3) -> publish the
attempt as ``{stem}.parquet`` (:mod:`vqpipe.output.promote`). An attempt that loses the marker
race deletes its file: duplicates of a shard (speculative, straggler) need not encode bit for bit
alike, and the committed file is the winner's whatever the losers wrote. Readers see only files
under final names, which only ever hold a marker's winner.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vqpipe.output import storage
from vqpipe.output.arrays import to_fixed_list_array
from vqpipe.output.conditioning import conditioning_fields
from vqpipe.output.layout import MARKER_DIR, attempt_file, data_path, marker_path
from vqpipe.output.markers import listed_stems
from vqpipe.output.promote import promote, remove_quietly

ROW_GROUP_ROWS = 1024


@dataclass(frozen=True)
class TokenLayout:
    """What the Parquet file holds per sample, and how it is compressed."""

    codes_shape: tuple[int, ...]  # (h, w) code grid; (V, h, w) with V > 1 views
    latent_shape: tuple[int, ...]  # (C, h, w) continuous latents; (V, C, h, w) with views
    codebook_size: int
    write_codes: bool = True
    write_latents: bool = False
    latent_dtype: Literal["float16", "float32"] = "float16"
    compression: str = "zstd"
    views: int = 1  # > 1: codes and latents carry a view axis, plus the conditioning columns

    @property
    def code_type(self) -> pa.DataType:
        return pa.uint16() if self.codebook_size <= 2**16 else pa.int32()

    @property
    def latent_type(self) -> pa.DataType:
        return pa.float16() if self.latent_dtype == "float16" else pa.float32()


def arrow_schema(layout: TokenLayout, metadata: dict[str, Any]) -> pa.Schema:
    """Columns: key, source, [codes], [latents], caption, metadata, width, height;
    ``metadata`` is stored as JSON under the schema key ``vqpipe``."""
    fields = [pa.field("key", pa.string(), nullable=False), pa.field("source", pa.string(), nullable=False)]
    if layout.write_codes:
        fields.append(pa.field("codes", _nested(layout.code_type, layout.codes_shape), nullable=False))
    if layout.write_latents:
        fields.append(pa.field("latents", _nested(layout.latent_type, layout.latent_shape), nullable=False))
    fields += [
        pa.field("caption", pa.string()),
        pa.field("metadata", pa.string()),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
    fields += conditioning_fields(layout.views) if layout.views > 1 else []
    return pa.schema(fields, metadata={"vqpipe": json.dumps(metadata, sort_keys=True)})


def _nested(value_type: pa.DataType, shape: Sequence[int]) -> pa.DataType:
    for size in reversed(shape):
        value_type = pa.list_(value_type, size)
    return value_type


def codes_to_arrow(codes: np.ndarray, layout: TokenLayout) -> pa.Array:
    """(N, h, w) integer codes -> Arrow, rejecting codes outside ``[0, codebook_size)``
    (a uint16 cast would silently turn 65536 into 0)."""
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    bad = codes[(codes < 0) | (codes >= layout.codebook_size)]
    if bad.size:
        raise ValueError(f"code {bad[0]} outside [0, {layout.codebook_size})")
    return to_fixed_list_array(_expect_shape(codes, layout.codes_shape, "codes"), layout.code_type)


def _expect_shape(values: np.ndarray, shape: Sequence[int], name: str) -> np.ndarray:
    if values.shape[1:] != tuple(shape):
        raise ValueError(f"{name} shape {values.shape[1:]} != layout {tuple(shape)}")
    return values


@dataclass(frozen=True)
class CommitResult:
    """``committed`` is False when another attempt's marker was there first."""

    committed: bool
    stem: str
    rows: int
    parquet: str
    marker: dict[str, Any]


class _Sink:
    """The file object handed to ParquetWriter; it hashes what it passes on, so the marker can
    record the file's sha256 without reading it back. ``drop()`` turns later writes into no-ops
    so an aborted writer can be closed (which always writes a footer) harmlessly."""

    def __init__(self, target: storage.AtomicFile) -> None:
        self.target: storage.AtomicFile | None = target
        self.position = 0
        self.sha256 = hashlib.sha256()
        self.closed = False

    def write(self, data: bytes) -> int:
        if self.target is not None:
            self.target.file.write(data)
            self.sha256.update(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass  # the atomic file flushes on commit

    def close(self) -> None:
        self.closed = True  # the atomic file is committed or discarded separately

    def drop(self) -> storage.AtomicFile | None:
        target, self.target = self.target, None
        return target


class ShardWriter:
    """Writes one shard's rows as one attempt, then commits it as ``{output_url}/{stem}.parquet``.

    Call ``write`` any number of times, then exactly one of ``commit`` or ``abort``. As a
    context manager it aborts unless committed. Nothing appears under the final name
    before ``commit`` wins; rows are buffered into row groups of ``ROW_GROUP_ROWS``.
    """

    def __init__(
        self,
        output_url: str,
        stem: str,
        layout: TokenLayout,
        metadata: dict[str, Any],
        storage_options: dict[str, Any],
    ) -> None:
        if not stem or "/" in stem or stem[0] in "._":
            raise ValueError(f"stem {stem!r} must be a plain file name not starting with . or _")
        self.layout, self.stem, self.output_url = layout, stem, output_url
        self.fs, root = storage.filesystem(output_url, storage_options)
        self.attempt = uuid.uuid4().hex[:16]
        self._attempt_file = attempt_file(stem, self.attempt)
        self._attempt = posixpath.join(root, self._attempt_file)
        self._data = posixpath.join(root, f"{stem}.parquet")
        self._marker = posixpath.join(root, MARKER_DIR, f"{stem}.json")
        self.schema = arrow_schema(layout, metadata)
        target = storage.open_atomic(self.fs, self._attempt)
        self._sink = _Sink(target)
        try:
            self._writer = pq.ParquetWriter(self._sink, self.schema, **_writer_options(layout, self.schema))
        except BaseException:  # e.g. an unknown compression codec: drop the temp file
            target.discard()
            raise
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.rows = 0
        self._done = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()

    def write(
        self,
        keys: Sequence[str],
        sources: Sequence[str],
        codes: np.ndarray | None,
        latents: np.ndarray | None,
        captions: Sequence[str | None],
        metadatas: Sequence[str | None],
        widths: Sequence[int] | np.ndarray,
        heights: Sequence[int] | np.ndarray,
        conditioning: dict[str, pa.Array] | None = None,
    ) -> None:
        """Append N rows. ``codes`` (N, h, w) ints and ``latents`` (N, C, h, w) floats are
        required when the layout writes them (and ignored otherwise); with views, (N, V, ...) and
        the ``conditioning`` columns (:mod:`vqpipe.output.conditioning`)."""
        columns = {"key": pa.array(keys, pa.string()), "source": pa.array(sources, pa.string())}
        if self.layout.write_codes:
            columns["codes"] = codes_to_arrow(_required(codes, "codes"), self.layout)
        if self.layout.write_latents:
            latents = _expect_shape(_required(latents, "latents"), self.layout.latent_shape, "latents")
            columns["latents"] = to_fixed_list_array(latents, self.layout.latent_type)
        columns |= {
            "caption": pa.array(captions, pa.string()),
            "metadata": pa.array(metadatas, pa.string()),
            "width": pa.array(np.asarray(widths, dtype=np.int32)),
            "height": pa.array(np.asarray(heights, dtype=np.int32)),
        }
        if self.layout.views > 1:
            if conditioning is None:
                raise ValueError("the layout has several views but no conditioning columns were given")
            columns |= conditioning
        lengths = {name: len(col) for name, col in columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"columns differ in length: {lengths}")
        self._pending.append(pa.RecordBatch.from_pydict(columns, schema=self.schema))
        self._pending_rows += len(keys)
        self.rows += len(keys)
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS * (self._pending_rows // ROW_GROUP_ROWS))

    def _flush(self, n: int) -> None:
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        self._writer.write_table(table.slice(0, n), row_group_size=ROW_GROUP_ROWS)
        self._pending = table.slice(n).to_batches()
        self._pending_rows -= n

    def commit(self, marker: dict[str, Any]) -> CommitResult:
        """Finish the attempt's file, create the marker naming it, then publish it -- in that order.

        The marker dict is the caller's; ``parquet``, ``rows``, ``attempt``, ``attempt_file``,
        ``bytes``, ``sha256``, ``etag`` (object stores) and ``committed_at`` are added. If a marker
        for this stem already exists, or another attempt creates it first, this attempt's file is
        deleted and ``committed`` is False: the committed file stays the winner's.
        """
        if self._done:
            raise RuntimeError(f"shard {self.stem} was already committed or aborted")
        record = {**marker, "parquet": data_path(self.output_url, self.stem), "rows": self.rows}
        try:
            if self._pending_rows or self.rows == 0:
                self._flush(self._pending_rows)  # an empty shard still gets a row-less file
            self._writer.close()
            storage.invalidate(self.fs, self._marker)
            if storage.exists(self.fs, self._marker):
                self.abort()
                return CommitResult(False, self.stem, self.rows, record["parquet"], record)
            _target(self._sink).commit()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self._create_marker_and_publish(record)

    def _create_marker_and_publish(self, record: dict[str, Any]) -> CommitResult:
        try:
            record.update(self._file_record())
            body = json.dumps(record, sort_keys=True, indent=1).encode()
            won = storage.write_create_only(self.fs, self._marker, body)
        except BaseException:
            remove_quietly(self.fs, self._attempt)  # no marker names it (or one that planning redoes)
            raise
        if not won:
            remove_quietly(self.fs, self._attempt)
            return CommitResult(False, self.stem, self.rows, record["parquet"], record)
        promote(self.fs, self._attempt, self._data)
        return CommitResult(True, self.stem, self.rows, record["parquet"], record)

    def _file_record(self) -> dict[str, Any]:
        """What the marker records about the attempt's file, for planning and ``inspect --verify``."""
        record = {"attempt": self.attempt, "attempt_file": self._attempt_file, "bytes": self._sink.position,
                  "sha256": self._sink.sha256.hexdigest(), "committed_at": datetime.now(timezone.utc).isoformat()}
        tag = storage.etag(self.fs, self._attempt)
        return record | ({"etag": tag} if tag else {})

    def abort(self) -> None:
        """Discard everything written; nothing appears under the final name. Idempotent."""
        if self._done:
            return
        self._done = True
        target = self._sink.drop()
        if self._writer.is_open:
            self._writer.close()  # writes its footer into the dropped sink
        if target is not None:
            target.discard()


def _writer_options(layout: TokenLayout, schema: pa.Schema) -> dict[str, Any]:
    # Dictionary pages pay off for codes (a few thousand distinct values per row group)
    # and the constant source; on float16 latents they made writes 2-3x and reads 3-5x
    # slower. BYTE_STREAM_SPLIT stays off: duckdb cannot read it on float16.
    dictionary = ["source"] + ([_leaf_path("codes", schema.field("codes").type)] if layout.write_codes else [])
    # Min/max of every latent value per page is 12-26% of their encoding time (0.36-0.31 vs
    # 0.41-0.42 ms per 16 384-value row: tests/benchmarks/bench_pipeline_parts.py) that no reader
    # uses; the codes' statistics stay: the decode job clears row groups with them.
    statistics = [_leaf_path(f.name, f.type) for f in schema if f.name != "latents"]
    return {"compression": layout.compression, "use_dictionary": dictionary, "write_statistics": statistics}


def _leaf_path(path: str, kind: pa.DataType) -> str:
    """The Parquet column path of a (nested) list field's values, e.g. ``codes.list.element.list.element``
    (one more level with views)."""
    while pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
        path, kind = path + ".list.element", kind.value_type
    return path


def _target(sink: _Sink) -> storage.AtomicFile:
    if sink.target is None:
        raise RuntimeError("the output file was already discarded")
    return sink.target


def _required(values: np.ndarray | None, name: str) -> np.ndarray:
    if values is None:
        raise ValueError(f"the layout writes {name} but none were given")
    return values


def committed_stems(output_url: str, storage_options: dict[str, Any]) -> set[str]:
    """Stems with a commit marker, listed fresh."""
    return listed_stems(output_url, storage_options, MARKER_DIR)


def read_marker(output_url: str, stem: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """The commit marker of ``stem``, or None if the shard is not committed."""
    fs, path = storage.filesystem(marker_path(output_url, stem), storage_options)
    storage.invalidate(fs, path)
    return storage.read_json(fs, path)
