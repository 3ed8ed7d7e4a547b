"""vqpipe's tokenizer inside a Ray Data pipeline, and vqpipe outputs back as Ray Data tensors.

    ds = ray.data.read_webdataset(urls, decoder=None)          # raw bytes: vqpipe decodes them itself
    tokens = ds.map_batches(Tokenize, fn_constructor_kwargs={"model": "demo", "resolution": 128},
                            compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_size=64).materialize()
    tokens.map_batches(drop_failures, batch_format="pyarrow").write_parquet("out/tokens")
    tokens.map_batches(only_failures, batch_format="pyarrow").write_parquet("out/failures")

``Tokenize`` runs the same preprocessing (:func:`vqpipe.images.preprocess`) and the same
:class:`vqpipe.encode.TokenEncoder` as ``vqpipe run``, and returns rows in vqpipe's output layout
(``key``, ``source``, ``codes``, ``latents``, ``caption``, ``metadata``, ``width``, ``height``,
the ``vqpipe`` schema metadata) plus ``reason`` / ``message``: a sample that cannot be tokenized is
a row with a reason and null tokens, never an exception. :func:`read_tokens` reads an output (of
``vqpipe run`` or of the pipeline above) as a Dataset whose batches carry ``(N, h, w)`` codes and
``(N, C, h, w)`` latents.

This module imports Ray: it is the documented exception to "Ray lives in the driver only", being a
Ray Data integration by definition. Nothing else in the package imports it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
import torch
from PIL import Image

from vqpipe.read import tokens as token_io
from vqpipe.output import storage
from vqpipe.output.arrays import fixed_list_to_numpy, to_fixed_list_array
from vqpipe.config import IMAGE_KEYS, PreprocessConfig, RunConfig, build, semantic_checks
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.model.loading import load_model, pick_device
from vqpipe.input.images import Rejected, preprocess, resize_center_crop, to_rgb
from vqpipe.records import Failure, Preprocessed, Sample
from vqpipe.run.shard_job import ShardSettings, make_settings
from vqpipe.output.sink import arrow_schema
from vqpipe.torch_threads import single_threaded_pool

KEY_COLUMNS = ("__key__", "key", "path")  # read_webdataset, a table of your own, read_images(include_paths=True)
FAILURE_COLUMNS = ("reason", "message")


class Tokenize:
    """A callable class for ``Dataset.map_batches``: a batch of samples in, token rows out.

    Constructor arguments are ``vqpipe run``'s config fields of the same names (``model.path``,
    ``preprocess.resolution``, ``model.precision`` ...), validated the same way. A batch is what
    ``read_webdataset(decoder=None)`` yields (``__key__`` plus one bytes column per member
    extension, decoded here exactly as ``vqpipe run`` decodes them), or images already decoded
    (``read_images``' ``image`` column, or Ray's default webdataset decoder: arrays, resized and
    cropped like ``vqpipe run`` but without its JPEG draft mode and EXIF orientation).
    """

    def __init__(self, model: str = "demo", resolution: int = 256, precision: str = "auto", *,
                 batch_size: int = 64, compile: bool | str = "auto", subfolder: str | None = None,
                 scaling_factor: float | None = None, value_range: Sequence[float] = (-1.0, 1.0),
                 min_size: int = 0, max_pixels: int | None = None, image_keys: Sequence[str] = IMAGE_KEYS,
                 codes: bool = True, latents: bool = True, latent_dtype: str = "float16",
                 decode_threads: int | None = None) -> None:
        config = _config(model=dict(path=model, subfolder=subfolder, scaling_factor=scaling_factor,
                                    precision=precision, compile=compile, batch_size=batch_size),
                         preprocess=dict(resolution=resolution, value_range=list(value_range), min_size=min_size,
                                         max_pixels=max_pixels),
                         input=dict(image_keys=list(image_keys)),
                         output=dict(codes=codes, latents=latents, latent_dtype=latent_dtype))
        loaded = load_model(config.model)
        device = pick_device()
        self.encoder = TokenEncoder(loaded, device, config.model.precision, config.model.compile,
                                    config.model.batch_size, config.preprocess.value_range, config.model.micro_batch)
        precision_name = str(loaded.autocast_dtype(config.model.precision, device) or "fp32").replace("torch.", "")
        self.job: ShardSettings = make_settings(config.input, config.preprocess, config.output, loaded, precision_name)
        self.schema = output_schema(self.job)
        # Ray sets an actor's torch threads to its num_cpus (OMP_NUM_THREADS): decode on as many.
        self.pool = single_threaded_pool(decode_threads or torch.get_num_threads(), "vqpipe-decode")

    def __call__(self, batch: dict[str, np.ndarray] | pa.Table) -> pa.Table:
        rows = _rows(batch)
        results = list(self.pool.map(self._preprocess, rows))
        good = [r for r in results if isinstance(r, Preprocessed)]
        failures = [r for r in results if isinstance(r, Failure)]
        sources = {_key(row): _source(row) for row in rows}
        tables = [self._encode(good[i:i + self.encoder.batch_size], sources, failures)
                  for i in range(0, len(good), self.encoder.batch_size)]
        return pa.concat_tables([*tables, self._failure_rows(failures, sources)])

    def _preprocess(self, row: dict[str, Any]) -> Preprocessed | Failure:
        key, cfg = _key(row), self.job.preprocess
        image = row.get("image")
        fields = _fields(row)
        arrays = [k for k in self.job.input.image_keys if isinstance(fields.get(k), np.ndarray)]
        if isinstance(image, np.ndarray) or arrays:
            return _from_array(key, image if isinstance(image, np.ndarray) else fields[arrays[0]], cfg, fields)
        sample = Sample(key, {k: v for k, v in fields.items() if isinstance(v, bytes)}, _source(row))
        return preprocess(sample, self.job.input.image_keys, cfg.resolution, cfg.min_size, max_pixels=cfg.max_pixels)

    def _encode(self, batch: list[Preprocessed], sources: dict[str, str], failures: list[Failure]) -> pa.Table:
        encoded = self.encoder(np.stack([p.pixels for p in batch]))
        failures += [Failure(batch[i].key, "non_finite", "latents are NaN/Inf even in fp32")
                     for i in np.flatnonzero(~encoded.finite)]
        keep = np.flatnonzero(encoded.finite)
        kept = [batch[i] for i in keep]
        layout = self.job.layout
        columns = {"key": [p.key for p in kept], "source": [sources[p.key] for p in kept]}
        if layout.write_codes:
            columns["codes"] = to_fixed_list_array(encoded.codes[keep], layout.code_type)
        if layout.write_latents:
            columns["latents"] = to_fixed_list_array(encoded.latents[keep], layout.latent_type)
        columns |= {"caption": [p.caption for p in kept], "metadata": [p.metadata for p in kept],
                    "width": [p.width for p in kept], "height": [p.height for p in kept],
                    "reason": [None] * len(kept), "message": [None] * len(kept)}
        return pa.table(columns, schema=self.schema)

    def _failure_rows(self, failures: list[Failure], sources: dict[str, str]) -> pa.Table:
        n = len(failures)
        columns = {name: pa.nulls(n, self.schema.field(name).type) for name in self.schema.names}
        columns |= {"key": pa.array([f.key for f in failures], pa.string()),
                    "source": pa.array([sources.get(f.key, "") for f in failures], pa.string()),
                    "reason": pa.array([f.reason for f in failures], pa.string()),
                    "message": pa.array([f.message for f in failures], pa.string())}
        return pa.table(columns, schema=self.schema)


def _config(**sections: dict) -> RunConfig:
    """The constructor's settings as a validated RunConfig (the same checks as ``vqpipe run``)."""
    raw = {"input": {"urls": ["ray-data"], **sections["input"]}, "model": sections["model"],
           "preprocess": sections["preprocess"], "output": {"path": "ray-data", **sections["output"]}}
    config = build(RunConfig, raw, "")
    semantic_checks(config)
    return config


def output_schema(job: ShardSettings) -> pa.Schema:
    """vqpipe's output schema (and its ``vqpipe`` metadata) with the failure columns; every column
    but ``key`` nullable, since a failure row has no tokens."""
    base = arrow_schema(job.layout, job.metadata)
    fields = [f if f.name == "key" else f.with_nullable(True) for f in base]
    fields += [pa.field(name, pa.string()) for name in FAILURE_COLUMNS]
    return pa.schema(fields, metadata=base.metadata)


def _rows(batch: dict[str, np.ndarray] | pa.Table) -> list[dict[str, Any]]:
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if hasattr(batch, "to_dict") and not isinstance(batch, dict):  # a pandas batch
        return batch.to_dict("records")
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]


def _key(row: dict[str, Any]) -> str:
    for name in KEY_COLUMNS:
        if row.get(name) is not None:
            value = str(row[name])
            return os.path.splitext(os.path.basename(value))[0] if name == "path" else value
    raise ValueError(f"a batch needs one of the columns {list(KEY_COLUMNS)}; it has {sorted(row)}")


def _source(row: dict[str, Any]) -> str:
    return str(row.get("__url__") or row.get("path") or "")


def _fields(row: dict[str, Any]) -> dict[str, Any]:
    """The sample's members by extension, as vqpipe's preprocessing takes them: bytes (text and JSON
    a decoder already turned into str / dict are encoded back), or decoded image arrays."""
    fields = {}
    for name, value in row.items():
        if name.startswith("__") or name in KEY_COLUMNS or value is None:
            continue
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif isinstance(value, (dict, list)):
            value = json.dumps(value).encode("utf-8")
        elif isinstance(value, float) and np.isnan(value):  # a member this sample lacks, as pandas fills it
            continue
        fields[name] = value
    return fields


def _from_array(key: str, pixels: np.ndarray, cfg: PreprocessConfig, fields: dict[str, Any]
                ) -> Preprocessed | Failure:
    """An image a reader already decoded -> the model's input, resized and cropped as vqpipe does."""
    try:
        img = to_rgb(Image.fromarray(np.asarray(pixels)))
    except (TypeError, ValueError) as err:  # Pillow's answer to an array shape or dtype it has no mode for
        return Failure(key, "unsupported_mode", f"{pixels.dtype} {pixels.shape}: {err}")
    except Rejected as err:
        return Failure(key, err.reason, str(err))
    if min(img.size) < cfg.min_size:
        return Failure(key, "too_small", f"{img.width}x{img.height} is below min_size {cfg.min_size}")
    caption = fields["txt"].decode("utf-8", errors="replace") if isinstance(fields.get("txt"), bytes) else None
    metadata = fields["json"].decode("utf-8", errors="replace") if isinstance(fields.get("json"), bytes) else None
    return Preprocessed(key, resize_center_crop(img, cfg.resolution), img.width, img.height, caption, metadata)


def drop_failures(batch: pa.Table) -> pa.Table:
    """The token rows of a ``Tokenize`` batch, in vqpipe's output layout (``batch_format="pyarrow"``)."""
    tokens = batch.filter(pc.is_null(batch.column("reason")))
    return tokens.drop_columns([c for c in FAILURE_COLUMNS if c in tokens.column_names])


def only_failures(batch: pa.Table) -> pa.Table:
    """The failure rows of a ``Tokenize`` batch: ``key``, ``source``, ``reason``, ``message``."""
    failed = batch.filter(pc.is_valid(batch.column("reason")))
    return failed.select(["key", "source", *FAILURE_COLUMNS])


def read_tokens(path: str, columns: Sequence[str] | None = None, storage_options: dict | None = None,
                **read_parquet_args) -> ray.data.Dataset:
    """A vqpipe output as a Dataset whose batches carry tensors: ``codes`` ``(N, h, w)``, ``latents``
    ``(N, C, h, w)`` (one more axis for views), in their stored dtypes; other columns as they are.

    ``ray.data.read_parquet`` alone gives those columns as object arrays of nested lists. Rows with a
    failure ``reason`` (a ``Tokenize`` output written whole) are left out.
    """
    files = token_io.data_files(path, storage_options)
    if not files:
        raise FileNotFoundError(f"{path}: no Parquet files")
    fs, _ = fsspec.core.url_to_fs(path, **(storage_options or {}))
    filesystem = None if storage.is_local(fs) else _arrow_fs(fs)
    ds = ray.data.read_parquet(files, filesystem=filesystem, **read_parquet_args)
    if columns:
        names = ds.schema().names
        ds = ds.select_columns([c for c in columns] + (["reason"] if "reason" in names and "reason" not in columns else []))
    return ds.map_batches(_as_tensors, batch_format="pyarrow")


def _arrow_fs(fs):
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _as_tensors(batch: pa.Table) -> dict[str, np.ndarray]:
    if "reason" in batch.column_names:
        batch = drop_failures(batch)
    return {name: _column(batch.column(name)) for name in batch.column_names}


def _column(column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_fixed_size_list(column.type):
        return fixed_list_to_numpy(column)  # Ray stores an (N, ...) ndarray as a tensor column
    return column.to_numpy(zero_copy_only=False)
