"""Benchmark images: the input's first photos, optionally re-encoded as JPEGs of a given size."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image

from vqpipe.config import ConfigError, RunConfig
from vqpipe.input.images import preprocess
from vqpipe.input.shards import iter_samples
from vqpipe.input.urls import expand_urls
from vqpipe.records import Failure, Sample, ShardError

# --- benchmark images -------------------------------------------------------------------------

def bench_samples(config: RunConfig, n: int, jpeg_size: tuple[int, int] | None,
                  jpeg_quality: int = 90) -> tuple[list[Sample], str]:
    """``n`` samples cycling over the decodable images of the input's first shard(s), read until
    ``n`` are found; re-encoded as ``jpeg_size`` JPEGs when asked. Returns them and a description."""
    found: list[Sample] = []
    skipped: list[Failure] = []
    shards = 0
    for url in expand_urls(list(config.input.urls), config.input.storage_options):
        shards += 1
        try:
            for sample in iter_samples(url, config.input.storage_options, on_failure=skipped.append):
                result = _preprocess(sample, config)
                if isinstance(result, Failure):
                    skipped.append(result)
                else:
                    found.append(sample)
                if len(found) >= n:
                    break
        except ShardError as err:
            raise ConfigError(f"input.urls: {err}") from None
        if len(found) >= n:
            break
    if not found:
        raise ConfigError(f"input.urls: no decodable image in {shards} shard(s) of {list(config.input.urls)}")
    if jpeg_size:
        found = [s for s in (_as_jpeg(s, config, jpeg_size, jpeg_quality) for s in found)
                 if not isinstance(_preprocess(s, config), Failure)]
        if not found:
            raise ConfigError(f"--jpeg-size {jpeg_size[0]}x{jpeg_size[1]}: every image fails preprocessing "
                              f"(preprocess.min_size={config.preprocess.min_size})")
    samples = [Sample(f"{i:08d}", found[i % len(found)].fields, "bench") for i in range(n)]
    size = f", re-encoded as {jpeg_size[0]}x{jpeg_size[1]} JPEG q{jpeg_quality}" if jpeg_size else ""
    return samples, f"{len(found)} distinct images from {shards} input shard(s){size} ({len(skipped)} unusable skipped)"


def _preprocess(sample: Sample, config: RunConfig, fast: bool | None = None):
    """As a worker preprocesses (``fast`` None: the config's ``preprocess.fast_jpeg``)."""
    cfg = config.preprocess
    return preprocess(sample, config.input.image_keys, cfg.resolution, cfg.min_size, max_pixels=cfg.max_pixels,
                      fast=cfg.fast_jpeg if fast is None else fast)


def _as_jpeg(sample: Sample, config: RunConfig, size: tuple[int, int], quality: int = 90) -> Sample:
    key = next(k for k in config.input.image_keys if k in sample.fields)
    with Image.open(io.BytesIO(sample.fields[key])) as img:
        buf = io.BytesIO()
        img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=quality)
    fields = {k: v for k, v in sample.fields.items() if k not in config.input.image_keys}
    return Sample(sample.key, {**fields, key: buf.getvalue()}, sample.source)


def write_shard(path: Path, samples: list[Sample]) -> str:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample.fields.items():
                info = tarfile.TarInfo(f"{sample.key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)
