"""The run manifest (``_vqpipe/run.json``): the fingerprint that stops a run from mixing models or
preprocessing in one output folder, and the run's status and totals."""

from __future__ import annotations

import posixpath

from vqpipe.config import RunConfig
from vqpipe.output import storage
from vqpipe.output.layout import MANIFEST

# Manifest entries that must match for two runs to write into one output folder.
COMPATIBILITY_KEYS = ("weights_sha256", "scaling_factor", "codes_shape", "latent_shape", "latent_dtype",
                      "resolution", "value_range", "image_keys", "min_size", "max_pixels", "codes", "latents",
                      "filters", "filter_missing", "max_aspect_ratio", "views", "crop_range")

# What an output written before a key joined the fingerprint was made with: such a folder still resumes.
_BEFORE = {"filters": {}, "filter_missing": "keep", "max_aspect_ratio": None, "views": ["center"], "crop_range": 1.1}


def fingerprint(metadata: dict, config: RunConfig) -> dict:
    """The settings that decide what the output's rows mean."""
    return {
        **{k: metadata[k] for k in ("weights_sha256", "scaling_factor", "codes_shape", "latent_shape",
                                    "latent_dtype", "resolution", "value_range", "image_keys")},
        "min_size": config.preprocess.min_size, "max_pixels": config.preprocess.max_pixels,
        "codes": config.output.codes, "latents": config.output.latents,
        "filters": {name: rule.to_dict() for name, rule in sorted(config.input.filters.items())},
        "filter_missing": config.input.filter_missing, "max_aspect_ratio": config.preprocess.max_aspect_ratio,
        "views": list(config.preprocess.views), "crop_range": config.preprocess.crop_range,
    }


def read_manifest(config: RunConfig) -> dict | None:
    fs, root = storage.filesystem(config.output.path, config.output.storage_options)
    path = posixpath.join(root, MANIFEST)
    storage.invalidate(fs, posixpath.dirname(path))
    return storage.read_json(fs, path)


def incompatibilities(previous: dict | None, current: dict) -> list[str]:
    """Human-readable differences between the output's recorded fingerprint and this run's."""
    if not previous or "fingerprint" not in previous:
        return []
    old = previous["fingerprint"]
    return [f"{k}: output has {old.get(k, _BEFORE.get(k))!r}, this run {current.get(k)!r}"
            for k in COMPATIBILITY_KEYS if old.get(k, _BEFORE.get(k)) != current.get(k)]
