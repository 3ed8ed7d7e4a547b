"""What a run has to do: the shard list, what is already committed, what remains, and the output's
manifest (``_vqpipe/run.json``) that stops a run from mixing models or preprocessing."""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

import fsspec

from vqpipe import storage

from vqpipe.config import ConfigError, RunConfig
from vqpipe.sink import committed_stems
from vqpipe.urls import expand_urls, shard_stems

log = logging.getLogger(__name__)

MANIFEST = "_vqpipe/run.json"
FAILED_DIR = "_vqpipe/failed"
# Manifest entries that must match for two runs to write into one output folder.
COMPATIBILITY_KEYS = ("weights_sha256", "scaling_factor", "codes_shape", "latent_shape", "latent_dtype",
                      "resolution", "value_range", "image_keys", "min_size", "codes", "latents")


@dataclass
class Plan:
    urls: list[str]  # every shard of the run, in order
    stems: dict[str, str]  # url -> output stem
    committed: set[str]  # stems whose commit marker exists
    pending: list[str]  # urls still to process, in order

    @property
    def total(self) -> int:
        return len(self.urls)


def make_plan(config: RunConfig, limit_shards: int | None = None) -> Plan:
    try:
        urls = expand_urls(list(config.input.urls), config.input.storage_options)
    except ValueError as err:  # NoMatchError, unbalanced braces
        raise ConfigError(f"input.urls: {err}") from None
    if not urls:
        raise ConfigError(f"input.urls matched no shards: {list(config.input.urls)}")
    stems = shard_stems(urls)
    committed = committed_stems(config.output.path, config.output.storage_options) & set(stems.values())
    pending = [u for u in urls if stems[u] not in committed]
    if limit_shards is not None:
        pending = pending[:limit_shards]
    return Plan(urls, stems, committed, pending)


def fingerprint(metadata: dict, config: RunConfig) -> dict:
    """The settings that decide what the output's rows mean."""
    return {
        **{k: metadata[k] for k in ("weights_sha256", "scaling_factor", "codes_shape", "latent_shape",
                                    "latent_dtype", "resolution", "value_range", "image_keys")},
        "min_size": config.preprocess.min_size, "codes": config.output.codes, "latents": config.output.latents,
    }


def read_manifest(config: RunConfig) -> dict | None:
    fs, root = fsspec.core.url_to_fs(config.output.path, **config.output.storage_options)
    path = posixpath.join(root, MANIFEST)
    fs.invalidate_cache(posixpath.dirname(path))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.load(f)


def incompatibilities(previous: dict | None, current: dict) -> list[str]:
    """Human-readable differences between the output's recorded fingerprint and this run's."""
    if not previous or "fingerprint" not in previous:
        return []
    old = previous["fingerprint"]
    return [f"{k}: output has {old.get(k)!r}, this run {current.get(k)!r}" for k in COMPATIBILITY_KEYS
            if old.get(k) != current.get(k)]


def write_json(config: RunConfig, relative: str, data: dict) -> None:
    fs, root = fsspec.core.url_to_fs(config.output.path, **config.output.storage_options)
    path = posixpath.join(root, relative)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def sweep_leftovers(config: RunConfig) -> None:
    """Clean what killed workers of earlier runs left: S3 multipart uploads never completed and
    local temp files (both older than an hour, so live writers of this run are spared)."""
    fs, root = fsspec.core.url_to_fs(config.output.path, **config.output.storage_options)
    aborted = storage.sweep_incomplete_uploads(fs, root)
    removed = storage.sweep_stale_temp_files(fs, root)
    if aborted or removed:
        log.info("swept %d incomplete uploads and %d temp files under %s", aborted, removed, config.output.path)


def remove_json(config: RunConfig, relative: str) -> None:
    fs, root = fsspec.core.url_to_fs(config.output.path, **config.output.storage_options)
    path = posixpath.join(root, relative)
    fs.invalidate_cache(posixpath.dirname(path))
    if fs.exists(path):
        fs.rm(path)


def remove_output(config: RunConfig) -> None:
    """``--overwrite``: drop committed data, markers and failure records before starting again."""
    fs, root = fsspec.core.url_to_fs(config.output.path, **config.output.storage_options)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return
    for path in fs.glob(posixpath.join(root, "*.parquet")):
        fs.rm(path)
    for sub in ("_vqpipe/shards", FAILED_DIR):
        target = posixpath.join(root, sub)
        if fs.exists(target):
            fs.rm(target, recursive=True)
    fs.invalidate_cache(root)
