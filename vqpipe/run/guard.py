"""The misconfiguration guard: when most samples of the first shards fail for one reason, the
config, not the corpus, is likely wrong, and the run stops early with a hint."""

from __future__ import annotations

from collections.abc import Sequence

from vqpipe.config import RunConfig
from vqpipe.records import sum_reasons
from vqpipe.run.shard_job import ShardResult


def failure_verdict(results: Sequence[ShardResult], fail_fraction: float, config: RunConfig) -> str | None:
    """The stop message when one failure reason holds ``fail_fraction`` of the samples (0 = never),
    else None. (The audits' own verdict is :func:`vqpipe.encode.fidelity.guard_verdict`.)"""
    reasons = sum_reasons(r.failures_by_reason for r in results)
    total = sum(r.rows for r in results) + sum(reasons.values())
    if fail_fraction <= 0 or not reasons or not total:
        return None
    reason, count = next(iter(reasons.items()))  # most frequent first
    if count / total < fail_fraction:
        return None
    return guard_message(reason, count, total, len(results), config)


def guard_message(reason: str, count: int, total: int, shards: int, config: RunConfig) -> str:
    hints = {
        "no_image": f"input.image_keys is {list(config.input.image_keys)}: check the member extensions in "
                    "your shards (e.g. `tar tf shard.tar | head`)",
        "too_small": f"preprocess.min_size={config.preprocess.min_size} may be too high for this corpus",
        "decode_error": "the image members may not be images, or the shards may be damaged",
        "non_finite": "the model produces NaN/Inf on these inputs: check preprocess.value_range and precision",
        "latent_overflow": "the latents exceed float16's range: set output.latent_dtype: float32",
    }
    return (f"stopping early: {count} of {total} samples in the first {shards} shards failed with "
            f"'{reason}'. Likely fix: {hints.get(reason, 'check the config against the corpus')}. "
            f"Raise ray.guard_fail_fraction or set it to 0 to run anyway.")
