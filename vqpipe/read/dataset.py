"""A PyTorch ``IterableDataset`` over a vqpipe output folder, for training on the tokens.

    dataset = TokenDataset("s3://bucket/tokens", shuffle_buffer=10_000, seed=0)
    loader = DataLoader(dataset, batch_size=256, num_workers=8)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for batch in loader: ...   # batch["codes"]: (B, h, w) int64, batch["latents"]: (B, C, h, w) float32

Splitting: the consumers are ``world_size`` ranks x DataLoader workers per rank. With at least as
many data files as consumers, consumer ``i`` reads files ``i, i + n, i + 2n ...`` of the (shuffled)
file list, and only it opens them. With fewer files than consumers, the row groups of all files
are dealt out the same way instead, so no consumer sits idle. Either way every row goes to
exactly one consumer per epoch. Consumers may get different row counts (files differ in size):
under DDP, end the epoch on a fixed step count rather than on the loader running out.

Streaming: one row group (1024 rows) is read at a time; a file is never loaded whole. The file
list is taken once, in the constructing process; workers read only their own files' footers.

Views (an output of ``preprocess.views`` with V > 1 views): ``view=None`` yields every column as
stored (codes ``(V, h, w)``); ``view="all"`` always gives the view axis (``(1, h, w)`` for a
single-view output); ``view=i`` one view (codes ``(h, w)``); ``view="random"`` one view per sample
per epoch, drawn from ``seed``, the epoch and the sample's key -- so every rank and worker agrees, and
the conditioning columns (``crop_box``, ``mirrored``, ``resized_size``) follow the same view.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Union

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vqpipe.output.arrays import fixed_list_to_numpy
from vqpipe.read.tokens import NotTokenOutput, data_files, vqpipe_metadata

DEFAULT_COLUMNS = ("key", "codes", "latents", "caption")
# Columns that lead with the view axis in a multi-view output.
VIEW_COLUMNS = ("codes", "latents", "crop_box", "mirrored", "resized_size")
View = Union[int, Literal["random", "all"], None]
Unit = tuple[str, "int | None"]  # (data file, row group); None = every row group of the file


class TokenDataset(IterableDataset):
    """Rows of the output at ``path`` as dicts: ``key`` str, ``codes`` LongTensor (h, w), ``latents``
    FloatTensor (C, h, w) (stored float16, converted), ``caption`` str ("" where the sample had
    none, so the default collate works); with views, ``crop_box`` float64 (V, 4), ``mirrored`` bool
    (V,) and ``resized_size`` int64 (V, 2) tensors; any other column requested comes as its Python value.

    ``columns``: the columns to yield (default: those of ``DEFAULT_COLUMNS`` the output has).
    ``shuffle_buffer``: 0 reads in file order; N > 0 shuffles the file (or row-group) order and
    then the rows through an N-row buffer, from a generator seeded by ``seed``, the epoch
    (``set_epoch``) and the consumer. ``rank`` / ``world_size`` default to torch.distributed's when
    it is initialised, else 0 / 1. ``view``: which of a multi-view output's views (module docstring).
    """

    def __init__(self, path: str, columns: Sequence[str] | None = None, storage_options: dict | None = None,
                 shuffle_buffer: int = 0, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, view: View = None) -> None:
        super().__init__()
        self.path, self.storage_options = path, dict(storage_options or {})
        self.rank, self.world_size = _distributed(rank, world_size)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0
        self.files = data_files(path, self.storage_options)
        if not self.files:
            raise FileNotFoundError(f"{path}: no Parquet files")
        self.columns = self._choose_columns(columns)
        self.views = self._view_names()
        self.view = _check_view(view, len(self.views))

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``; call before iterating (workers get a copy at iterator start)."""
        self.epoch = epoch

    def _schema(self) -> pa.Schema:
        fs, _ = self._fs()
        with fs.open(self.files[0], "rb") as handle:
            return pq.read_schema(handle)

    def _view_names(self) -> list[str]:
        """The views in the first file's metadata; an output from before views has one."""
        try:
            return list(vqpipe_metadata(self._schema(), self.files[0]).get("views", ["center"]))
        except NotTokenOutput:
            return ["center"]

    def _choose_columns(self, columns: Sequence[str] | None) -> list[str]:
        names = self._schema().names
        if columns is None:
            return [c for c in DEFAULT_COLUMNS if c in names]
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{self.path} has no column {missing[0]!r}; it has {names}")
        return list(columns)

    def _fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.core.url_to_fs(self.path, **self.storage_options)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers = self._consumer()
        rows = self._rows(self.units(consumer, consumers))
        if self.shuffle_buffer:
            rows = shuffled(rows, self.shuffle_buffer, self._rng(consumer))
        return rows

    def _consumer(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def _rng(self, consumer: int | None = None) -> np.random.Generator:
        # Without a consumer: the epoch's order, identical in every consumer (that is what keeps
        # the split exact); with one: that consumer's own buffer draws.
        entropy = [self.seed, self.epoch] + ([] if consumer is None else [consumer])
        return np.random.default_rng(entropy)

    def units(self, consumer: int, consumers: int) -> list[Unit]:
        """The (file, row group) units consumer ``consumer`` of ``consumers`` reads this epoch."""
        if len(self.files) >= consumers:
            units: list[Unit] = [(f, None) for f in self.files]
        else:
            fs, _ = self._fs()
            units = [(f, g) for f in self.files for g in range(_row_groups(fs, f))]
        if self.shuffle_buffer:
            self._rng().shuffle(units)
        return units[consumer::consumers]

    def _rows(self, units: list[Unit]) -> Iterator[dict[str, Any]]:
        fs, _ = self._fs()
        for path, group in units:
            with fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                for g in range(parquet.num_row_groups) if group is None else [group]:
                    yield from self._samples(parquet.read_row_group(g, columns=self._read_columns()))

    def _read_columns(self) -> list[str]:
        # "random" draws from the key, so the key is read even when it is not yielded.
        extra = ["key"] if self.view == "random" and "key" not in self.columns else []
        return self.columns + extra

    def _samples(self, table: pa.Table) -> Iterator[dict[str, Any]]:
        rows = _to_samples(table)
        if self.view is None:
            yield from rows
            return
        multi = len(self.views) > 1
        for row in rows:
            index = self._view_index(row) if self.view != "all" else None
            yield {name: _select(value, index, multi) if name in VIEW_COLUMNS else value
                   for name, value in row.items() if name in self.columns}

    def _view_index(self, row: dict[str, Any]) -> int:
        if self.view != "random":
            return int(self.view)
        digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{row['key']}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % len(self.views)

    def __repr__(self) -> str:
        return (f"TokenDataset({self.path!r}, files={len(self.files)}, columns={self.columns}, "
                f"rank={self.rank}/{self.world_size}, shuffle_buffer={self.shuffle_buffer}, view={self.view!r})")


def _check_view(view: View, views: int) -> View:
    if view in (None, "all", "random"):
        return view
    if isinstance(view, bool) or not isinstance(view, int) or not 0 <= view < views:
        raise ValueError(f"view must be an index in [0, {views}), 'random', 'all' or None; got {view!r}")
    return view


def _select(value: Any, index: int | None, multi: bool) -> Any:
    """One view (``index``) of a view-axis value, or all of them with the axis (``None``)."""
    if not multi:
        return value if index is not None else _with_axis(value)
    return value[index] if index is not None else value


def _with_axis(value: Any) -> Any:
    return value.unsqueeze(0) if isinstance(value, torch.Tensor) else [value]


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _row_groups(fs: fsspec.AbstractFileSystem, path: str) -> int:
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).num_row_groups


def _to_samples(table: pa.Table) -> Iterator[dict[str, Any]]:
    """One row group -> one dict per row. Each row's tensors are its own copies, so a row held in a
    shuffle buffer does not keep its whole row group alive."""
    columns = {name: _column(table.column(name), name) for name in table.column_names}
    for i in range(table.num_rows):
        yield {name: get(i) for name, get in columns.items()}


def _column(column: pa.ChunkedArray, name: str):
    if name == "codes":
        codes = fixed_list_to_numpy(column)
        return lambda i: torch.from_numpy(codes[i].astype(np.int64))
    if name == "latents":
        latents = fixed_list_to_numpy(column)
        return lambda i: torch.from_numpy(latents[i].astype(np.float32))
    if name in ("crop_box", "resized_size"):  # (V, 4) float64 / (V, 2) int32 -> float64 / int64 tensors
        values = fixed_list_to_numpy(column)
        wide = np.float64 if name == "crop_box" else np.int64
        return lambda i: torch.from_numpy(values[i].astype(wide))
    if name == "mirrored":  # Arrow packs booleans into bits: no zero-copy view
        flags = np.array(column.to_pylist(), dtype=bool)
        return lambda i: torch.from_numpy(flags[i].copy())
    values = column.to_pylist()
    if name == "caption":
        return lambda i: values[i] if values[i] is not None else ""
    return values.__getitem__


def shuffled(items: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Items in a random order drawn through a ``buffer_size`` buffer (as webdataset's shuffle)."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer
