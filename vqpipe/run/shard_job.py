"""One input shard -> one committed Parquet file: the unit of work, naming, commit and retry.

``process_shard`` chains the stages (``read -> preprocess -> batch -> encode -> write``) for one
shard URL with no Ray in it, so it can be tested and profiled alone; the driver only decides
which worker calls it for which shard.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import resource
import socket
import sys
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from vqpipe import __version__, faults
from vqpipe.config import InputConfig, OutputConfig, PreprocessConfig
from vqpipe.encode import audit as fidelity_audit
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.encode.views import encode_views
from vqpipe.input import device_decode
from vqpipe.input.device_decode import DeviceDecoder, ModelInput
from vqpipe.input.filters import SampleFilter
from vqpipe.input.images import preprocess
from vqpipe.input.prefetch import PrefetchStats, ordered_parallel_map
from vqpipe.input.views import ViewRenderer, view_names
from vqpipe.output.conditioning import conditioning_columns
from vqpipe.records import Deferred, Failure, Filtered, Preprocessed, Sample
from vqpipe.input.shards import iter_samples
from vqpipe.output.arrays import narrow_rows
from vqpipe.output.sink import ShardWriter, TokenLayout
from vqpipe.output.write_behind import WriteBehind

FORMAT_VERSION = 1
FILTERED_EXAMPLES = 5  # filtered samples named per rule in a shard's marker (all are counted)
LATENTS_HOLD = ("pre-quantization h = quant_conv(encoder(x)), multiplied by scaling_factor; "
                "quantize.codes(latents / scaling_factor) gives the codes")


@dataclass(frozen=True)
class ShardSettings:
    """What every shard of a run shares: the stages' configs and the output's layout."""

    input: InputConfig
    preprocess: PreprocessConfig
    output: OutputConfig
    layout: TokenLayout
    metadata: dict  # written as the Parquet key-value metadata `vqpipe`
    audit_samples: int = 0  # images per shard re-encoded in fp32 by the fidelity audit
    screen: SampleFilter = field(default_factory=SampleFilter)  # input.filters, max_aspect_ratio
    render: ViewRenderer | None = None  # preprocess.views other than the plain [center]
    decoder: DeviceDecoder | None = None  # preprocess.decoder: gpu (None: cpu)


@dataclass
class StageTimes:
    read_s: float = 0.0
    decode_s: float = 0.0  # wall time, summed over the decode threads
    encode_s: float = 0.0
    audit_s: float = 0.0  # the fidelity audit: fp32 re-encode and decode of a few images
    write_s: float = 0.0
    wait_s: float = 0.0  # time the model sat waiting for a preprocessed batch
    device_decode_s: float = 0.0  # preprocess.decoder: gpu, main thread (CUDA: launching; the rest shows in encode_s)
    total_s: float = 0.0
    # CPU time per stage, as the null-model bench reports it: which thread caps a worker process
    read_cpu_s: float = 0.0  # the shard-reading thread (tar parsing)
    decode_cpu_s: float = 0.0  # summed over the decode threads
    write_cpu_s: float = 0.0  # the Parquet writing thread


@dataclass
class ShardResult:
    url: str
    stem: str
    committed: bool  # False: another attempt committed this shard first (its output stands)
    rows: int
    failures: list[dict]
    times: StageTimes
    amp_fallback_batches: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    worker: str = ""  # host:pid of the process that ran it: per-worker rates in the progress line
    started_at: float = 0.0  # wall-clock time the shard began: the run's start-up ends at the first one
    audit: dict | None = None  # the marker's fidelity audit
    precision: str = "fp32"  # the encoder's precision when the shard ended
    precision_switches: list[dict] = field(default_factory=list)  # fallbacks made during this shard
    filtered_by_rule: dict[str, int] = field(default_factory=dict)  # left out on purpose, not failures


def make_settings(input: InputConfig, preprocess_cfg: PreprocessConfig, output: OutputConfig, model, precision: str,
                  audit_samples: int = 0, device: torch.device | None = None) -> ShardSettings:
    """Derive the output layout and lineage metadata from the loaded model. ``device``: where the
    worker's batches go (default: the model's), for ``preprocess.decoder: gpu``."""
    cfg = model.config
    r = preprocess_cfg.resolution
    h = w = r // cfg.downsample_factor
    views = view_names(preprocess_cfg.views)
    axis = (len(views),) if len(views) > 1 else ()  # one view: exactly the single-view layout
    layout = TokenLayout(
        codes_shape=(*axis, h, w), latent_shape=(*axis, cfg.embed_dim, h, w), codebook_size=cfg.num_vq_embeddings,
        write_codes=output.codes, write_latents=output.latents, latent_dtype=output.latent_dtype,
        compression=output.compression, views=len(views),
    )
    metadata = {
        "format_version": FORMAT_VERSION, "vqpipe_version": __version__,
        "model_config": cfg.to_dict(), "weights_sha256": model.weights_sha256,
        "scaling_factor": cfg.scaling_factor, "num_vq_embeddings": cfg.num_vq_embeddings,
        "codes_shape": [h, w], "latent_shape": [cfg.embed_dim, h, w], "latent_dtype": output.latent_dtype,
        "resolution": r, "value_range": list(preprocess_cfg.value_range), "precision": precision,
        "image_keys": list(input.image_keys), "latents": LATENTS_HOLD,
        # codes_shape / latent_shape are per view; with V > 1 views the columns lead with a V axis
        "views": views, "view_kinds": list(preprocess_cfg.views), "crop_range": preprocess_cfg.crop_range,
        "decoder": preprocess_cfg.decoder,
    }
    decoder = None
    if preprocess_cfg.decoder == "gpu":
        decoder = DeviceDecoder(preprocess_cfg, input.image_keys, device or next(model.parameters()).device)
    return ShardSettings(input, preprocess_cfg, output, layout, metadata, audit_samples,
                         SampleFilter.from_config(input, preprocess_cfg), ViewRenderer.for_config(preprocess_cfg),
                         decoder)


def process_shard(url: str, stem: str, job: ShardSettings, encoder: TokenEncoder, pool: Executor,
                  on_progress: Callable[[int], None] = lambda rows: None) -> ShardResult:
    """Encode every good sample of ``url`` into ``{output}/{stem}.parquet`` and commit it.

    Bad samples become failure records with reasons; a shard-level problem (missing or truncated
    tar, storage error) raises after the partial output has been discarded, never published.
    """
    started, started_at = time.perf_counter(), time.time()
    failures: list[Failure] = []
    filtered: list[Filtered] = []
    times, stats = StageTimes(), PrefetchStats()
    switches_before = len(encoder.switches)
    # The file records the precision its batches ran in: a worker that fell back says so from then on.
    metadata = {**job.metadata, "precision": encoder.precision}
    writer = WriteBehind(ShardWriter(job.output.path, stem, job.layout, metadata, job.output.storage_options))
    sampler = fidelity_audit.AuditSampler(job.audit_samples if encoder.precision != "fp32" else 0, stem)
    rows = amp_fallbacks = 0
    decoded_before = job.decoder.counts if job.decoder else None
    try:
        samples = iter_samples(url, job.input.storage_options, on_failure=failures.append)
        work = functools.partial(_timed_preprocess, job)
        results = ordered_parallel_map(work, samples, pool, max_pending=2 * encoder.batch_size + 8, stats=stats)
        for n, batch in enumerate(_batches(_keep_good(results, failures, filtered, times), encoder.batch_size)):
            inputs = _model_input(job, batch, encoder, failures, times)
            written, amp_fallback = _encode_and_write(inputs, url, encoder, writer, failures, times, sampler)
            rows, amp_fallbacks = rows + written, amp_fallbacks + amp_fallback
            on_progress(rows)
            faults.after_batch(stem, n + 1)
        writer.drain()  # its failure aborts here, and the writing time is known for the marker
        times.read_s, times.wait_s, times.write_s = stats.source_s, stats.wait_s, writer.busy_s
        times.read_cpu_s, times.write_cpu_s = stats.source_cpu_s, writer.cpu_s
        audit = _audit(job, encoder, sampler, times)
        switches = encoder.switches[switches_before:]
        marker = {**_marker(url, stem, rows, failures, filtered, times, amp_fallbacks, str(encoder.device), started),
                  "precision": encoder.precision, "precision_switches": switches, "audit": audit,
                  "decoder": device_decode.shard_record(job.decoder, decoded_before)}
        write_started = time.perf_counter()
        committed = writer.commit(marker).committed
        times.write_s += time.perf_counter() - write_started
    except BaseException:
        writer.abort()
        raise
    return ShardResult(url, stem, committed, rows, [f.to_dict() for f in failures], times, amp_fallbacks,
                       failures_by_reason=_count_reasons(failures), audit=audit, precision=encoder.precision,
                       precision_switches=switches, worker=f"{socket.gethostname()}:{os.getpid()}",
                       started_at=started_at, filtered_by_rule=_count_rules(filtered))


def _audit(job: ShardSettings, encoder: TokenEncoder, sampler: fidelity_audit.AuditSampler,
           times: StageTimes) -> dict:
    """The shard's fidelity audit record (timed into ``times.audit_s``), or why there is none."""
    if not job.audit_samples:
        return fidelity_audit.skipped("model.audit_samples is 0", encoder.precision)
    picked = sampler.samples()
    if sampler.size == 0 or (picked and all(s.precision == "fp32" for s in picked)):
        return fidelity_audit.skipped("precision is fp32: the codes are the model's own", "fp32")
    started = time.perf_counter()
    store_float16 = job.layout.write_latents and job.layout.latent_dtype == "float16"
    record = fidelity_audit.run_audit(encoder, picked, store_float16)
    times.audit_s = time.perf_counter() - started
    return record


def _timed_preprocess(job: ShardSettings, sample: Sample) -> tuple[Preprocessed | Deferred | Failure | Filtered, float,
                                                                     float]:
    started, cpu = time.perf_counter(), time.thread_time()
    cfg = job.preprocess
    # Filters first: a filtered sample costs a JSON parse and at most an image header, no decode.
    # With preprocess.decoder: gpu, a JPEG the device takes is only deferred here: its header was read.
    result = job.screen(sample) or (job.decoder and job.decoder.defer(sample)) or \
        preprocess(sample, job.input.image_keys, cfg.resolution, cfg.min_size, max_pixels=cfg.max_pixels,
                   fast=cfg.fast_jpeg, render=job.render)
    return result, time.perf_counter() - started, time.thread_time() - cpu


def _keep_good(results: Iterable[tuple[Preprocessed | Deferred | Failure | Filtered, float, float]],
               failures: list[Failure], filtered: list[Filtered], times: StageTimes) -> Iterator[Preprocessed | Deferred]:
    for result, seconds, cpu in results:
        times.decode_s += seconds
        times.decode_cpu_s += cpu
        if isinstance(result, Failure):
            failures.append(result)
        elif isinstance(result, Filtered):
            filtered.append(result)
        else:
            yield result


def _batches(items: Iterable[Preprocessed | Deferred], size: int) -> Iterator[list[Preprocessed | Deferred]]:
    batch: list[Preprocessed | Deferred] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _model_input(job: ShardSettings, batch: list[Preprocessed | Deferred], encoder: TokenEncoder,
                 failures: list[Failure], times: StageTimes) -> ModelInput:
    """The batch's pixels stacked: on the host (in the encoder's staging buffer), or on the device
    for ``preprocess.decoder: gpu`` (whose deferred JPEGs are decoded here; those that fail join
    ``failures``)."""
    if job.decoder is None:
        return device_decode.host_input(batch, encoder.stage)
    started = time.perf_counter()
    inputs, failed = job.decoder.model_input(batch)
    failures.extend(failed)
    times.device_decode_s += time.perf_counter() - started
    return inputs


def _encode_and_write(inputs: ModelInput, url: str, encoder: TokenEncoder, writer: WriteBehind,
                      failures: list[Failure], times: StageTimes,
                      sampler: fidelity_audit.AuditSampler) -> tuple[int, bool]:
    if not inputs.samples:
        return 0, False  # every deferred JPEG of the batch failed on the CPU path too
    started = time.perf_counter()
    batch, pixels = inputs.samples, inputs.pixels  # (B, R, R, 3), or (B, V, R, R, 3) with views
    encoded = encode_views(encoder, pixels if writer.layout.views > 1 or pixels.ndim == 4 else pixels[:, 0])
    times.encode_s += time.perf_counter() - started
    latents, overflowing = _stored_latents(encoded.latents, writer.layout)
    good = encoded.finite & ~overflowing
    keep = np.flatnonzero(good)
    for i in np.flatnonzero(~good):
        failures.append(_bad_latents(batch[i].key, encoded.latents[i], bool(encoded.finite[i]), writer.layout))
    kept = [batch[i] for i in keep]
    writer.write(
        keys=[p.key for p in kept], sources=[url] * len(kept),
        codes=encoded.codes[keep] if writer.layout.write_codes else None,
        latents=latents[keep] if writer.layout.write_latents else None,
        captions=[p.caption for p in kept], metadatas=[p.metadata for p in kept],
        widths=[p.width for p in kept], heights=[p.height for p in kept],
        conditioning=conditioning_columns([p.views for p in kept]) if writer.layout.views > 1 else None,
    )
    sampler.offer([p.key for p in kept], inputs.host_pixels(keep), encoded.codes[keep], encoded.latents[keep],
                  encoded.precision)
    return len(kept), encoded.amp_fallback


def _stored_latents(latents: np.ndarray, layout: TokenLayout) -> tuple[np.ndarray, np.ndarray]:
    """The latents in their storage dtype, and the rows that overflow it."""
    if not layout.write_latents:
        return latents, np.zeros(len(latents), dtype=bool)
    return narrow_rows(latents, layout.latent_type)


def _bad_latents(key: str, latents: np.ndarray, finite: bool, layout: TokenLayout) -> Failure:
    if not finite:
        return Failure(key, "non_finite", "latents are NaN/Inf even in fp32")
    peak = float(np.abs(latents).max())
    return Failure(key, "latent_overflow", f"latent value {peak:.6g} exceeds {layout.latent_dtype}'s range: "
                                           f"set output.latent_dtype: float32")


def _marker(url: str, stem: str, rows: int, failures: list[Failure], filtered: list[Filtered], times: StageTimes,
            amp_fallbacks: int, device: str, started: float) -> dict:
    times.total_s = time.perf_counter() - started
    return {
        "source": url, "stem": stem, "rows": rows, "failed": len(failures),
        "failures": [f.to_dict() for f in failures], "failures_by_reason": _count_reasons(failures),
        "filtered": len(filtered), "filtered_by_rule": _count_rules(filtered),
        "filtered_examples": _examples(filtered),
        "times": dataclasses.asdict(times), "amp_fallback_batches": amp_fallbacks,
        "host": socket.gethostname(), "device": device,
        # The worker process's peak so far, flat across shards when memory is (KiB on Linux, bytes on macOS).
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                             / (2**20 if sys.platform == "darwin" else 2**10), 1),
    }


def _count_reasons(failures: list[Failure]) -> dict[str, int]:
    return dict(collections.Counter(f.reason for f in failures))


def _count_rules(filtered: list[Filtered]) -> dict[str, int]:
    return dict(collections.Counter(f.rule for f in filtered))


def _examples(filtered: list[Filtered]) -> list[dict]:
    """The first few filtered samples of each rule. Not all: a filter may drop most of a LAION shard,
    and `vqpipe inspect` reads every marker."""
    seen: collections.Counter = collections.Counter()
    kept = []
    for f in filtered:
        seen[f.rule] += 1
        if seen[f.rule] <= FILTERED_EXAMPLES:
            kept.append(f.to_dict())
    return kept
