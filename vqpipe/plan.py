"""What a run has to do: the shard list, what is already committed, what remains, and the output's
manifest (``_vqpipe/run.json``) that stops a run from mixing models or preprocessing."""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

import fsspec

from vqpipe import retry, storage
from vqpipe.config import ConfigError, RunConfig
from vqpipe.sink import MARKER_DIR, committed_stems
from vqpipe.urls import expand_urls, shard_stems

log = logging.getLogger(__name__)

MANIFEST = "_vqpipe/run.json"
FAILED_DIR = "_vqpipe/failed"
# Manifest entries that must match for two runs to write into one output folder.
COMPATIBILITY_KEYS = ("weights_sha256", "scaling_factor", "codes_shape", "latent_shape", "latent_dtype",
                      "resolution", "value_range", "image_keys", "min_size", "max_pixels", "codes", "latents")


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
        "min_size": config.preprocess.min_size, "max_pixels": config.preprocess.max_pixels,
        "codes": config.output.codes, "latents": config.output.latents,
    }


def read_manifest(config: RunConfig) -> dict | None:
    fs, root = fsspec.core.url_to_fs(config.output.path, **config.output.storage_options)
    path = posixpath.join(root, MANIFEST)
    fs.invalidate_cache(posixpath.dirname(path))
    return storage.read_json(fs, path)


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
    body = (json.dumps(data, indent=2, default=str) + "\n").encode()
    retry.call(lambda: fs.makedirs(posixpath.dirname(path), exist_ok=True), f"mkdir for {path}")
    retry.call(lambda: fs.pipe_file(path, body), f"write {path}")


def sweep_leftovers(config: RunConfig) -> None:
    """Clean what killed workers of earlier runs left: S3 multipart uploads never completed and
    local temp files (both older than an hour, so live writers of this run are spared)."""
    fs, root = fsspec.core.url_to_fs(config.output.path, **config.output.storage_options)
    try:
        aborted = storage.sweep_incomplete_uploads(fs, root)
        removed = storage.sweep_stale_temp_files(fs, root)
    except OSError as err:  # housekeeping: the next run sweeps again
        log.warning("could not sweep leftovers under %s: %s: %s", config.output.path, type(err).__name__, err)
        return
    if aborted or removed:
        log.info("swept %d incomplete uploads and %d temp files under %s", aborted, removed, config.output.path)


def remove_json(config: RunConfig, relative: str) -> None:
    fs, root = fsspec.core.url_to_fs(config.output.path, **config.output.storage_options)
    path = posixpath.join(root, relative)
    fs.invalidate_cache(posixpath.dirname(path))
    _remove(fs, path)


def remove_output(config: RunConfig) -> None:
    """``--overwrite``: drop committed data, markers and failure records before starting again."""
    fs, root = fsspec.core.url_to_fs(config.output.path, **config.output.storage_options)
    fs.invalidate_cache(root)
    # File by file from listings that fail loudly (a recursive rm lists through fsspec's walk, which
    # skips folders it failed to list). Markers go first: an overwrite cut short then leaves data
    # without markers, which the next run redoes, never a marker whose data is gone.
    for pattern in (f"{MARKER_DIR}/*.json", f"{FAILED_DIR}/*.json", "*.parquet"):
        for path in storage.glob(fs, posixpath.join(root, pattern)):
            _remove(fs, path)
    fs.invalidate_cache(root)


def _remove(fs, path: str) -> None:
    try:
        retry.call(lambda: fs.rm_file(path), f"remove {path}")
    except FileNotFoundError:
        pass  # never there, or removed by an attempt whose answer was lost
