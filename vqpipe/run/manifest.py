"""The run manifest (``_vqpipe/run.json``): the fingerprint that stops a run from mixing models or
preprocessing in one output folder, and the run's status and totals.

Without a readable manifest (deleted, corrupt) the fingerprint is taken from a committed data
file's own ``vqpipe`` Parquet metadata, which holds the model's weights hash and config too."""

from __future__ import annotations

import json
import logging
import posixpath

import pyarrow.parquet as pq

from vqpipe.config import RunConfig
from vqpipe.output import storage
from vqpipe.output.layout import MANIFEST
from vqpipe.output.markers import Audit

log = logging.getLogger(__name__)

# Entries of the model's metadata (the Parquet ``vqpipe`` key) that decide what a row means.
METADATA_KEYS = ("weights_sha256", "model_config", "scaling_factor", "codes_shape", "latent_shape", "latent_dtype",
                 "resolution", "value_range", "image_keys")
# Manifest entries that must match for two runs to write into one output folder.
COMPATIBILITY_KEYS = METADATA_KEYS + ("min_size", "max_pixels", "codes", "latents", "filters", "filter_missing",
                                      "max_aspect_ratio", "views", "crop_range")

# What an output written before a key joined the fingerprint was made with: such a folder still resumes.
_BEFORE = {"filters": {}, "filter_missing": "keep", "max_aspect_ratio": None, "views": ["center"], "crop_range": 1.1}


def fingerprint(metadata: dict, config: RunConfig) -> dict:
    """The settings that decide what the output's rows mean, as JSON reads them back (lists, not
    tuples), so a fingerprint compares equal to the one it was written as."""
    return json.loads(json.dumps({
        **{k: metadata[k] for k in METADATA_KEYS},
        "min_size": config.preprocess.min_size, "max_pixels": config.preprocess.max_pixels,
        "codes": config.output.codes, "latents": config.output.latents,
        "filters": {name: rule.to_dict() for name, rule in sorted(config.input.filters.items())},
        "filter_missing": config.input.filter_missing, "max_aspect_ratio": config.preprocess.max_aspect_ratio,
        "views": list(config.preprocess.views), "crop_range": config.preprocess.crop_range,
    }))


def read_manifest(config: RunConfig) -> dict | None:
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    path = posixpath.join(root, MANIFEST)
    storage.invalidate(fs, posixpath.dirname(path))
    try:
        manifest = storage.read_json(fs, path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        log.warning("%s is corrupt (%s): ignored, and rewritten by this run", path, err)
        return None
    if manifest is not None and not isinstance(manifest, dict):
        log.warning("%s is not a JSON object: ignored, and rewritten by this run", path)
        return None
    return manifest


def recorded(config: RunConfig, checked: Audit) -> dict | None:
    """The output's manifest; without one, a manifest holding the fingerprint of a committed data
    file's own metadata (None when the output has no committed file either)."""
    manifest = read_manifest(config)
    if manifest and "fingerprint" in manifest:
        return manifest
    for stem in sorted(checked.good):
        meta = _file_metadata(config, f"{stem}.parquet")
        if meta is not None:
            return {"fingerprint": {k: meta[k] for k in METADATA_KEYS if k in meta}}
    return manifest


def _file_metadata(config: RunConfig, name: str) -> dict | None:
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    try:
        with fs.open(posixpath.join(root, name), "rb") as handle:
            raw = (pq.read_schema(handle).metadata or {}).get(b"vqpipe")
        return json.loads(raw) if raw else None
    except (OSError, ValueError) as err:  # unreadable: the next file may do
        log.warning("cannot read the vqpipe metadata of %s: %s", name, err)
        return None


def incompatibilities(previous: dict | None, current: dict) -> list[str]:
    """Human-readable differences between the output's recorded fingerprint and this run's, one per
    differing entry (``model_config.norm_num_groups: output has 8, this run 4``). A key the recorded
    fingerprint lacks (written by an older vqpipe, or read from a file's metadata) is not compared."""
    if not previous or "fingerprint" not in previous:
        return []
    old = previous["fingerprint"]
    if "status" in previous:  # a manifest an older vqpipe wrote: what it lacks had its defaults then
        old = {**_BEFORE, **old}
    return [line for k in COMPATIBILITY_KEYS if k in old for line in _differences(k, old[k], current.get(k))]


def _differences(key: str, old, new) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in dict.fromkeys([*old, *new])
                for line in _differences(f"{key}.{k}", old.get(k), new.get(k))]
    return [] if old == new else [f"{key}: output has {old!r}, this run {new!r}"]
