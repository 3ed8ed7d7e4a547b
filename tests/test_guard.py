"""The misconfiguration guard's verdict and its hints, without Ray."""

from __future__ import annotations

from vqpipe.config import InputConfig, ModelConfig, OutputConfig, RunConfig
from vqpipe.run.guard import failure_verdict
from vqpipe.run.shard_job import ShardResult, StageTimes

CONFIG = RunConfig(input=InputConfig(urls=("x",)), model=ModelConfig(path="demo"), output=OutputConfig(path="out"))


def _result(rows: int, **reasons: int) -> ShardResult:
    return ShardResult("x.tar", "x", True, rows, [], StageTimes(), failures_by_reason=reasons)


def test_most_samples_overflowing_float16_stops_with_the_dtype_hint():
    verdict = failure_verdict([_result(1, latent_overflow=9), _result(0, latent_overflow=10)], 0.9, CONFIG)
    assert "19 of 20 samples" in verdict and "'latent_overflow'" in verdict
    assert "set output.latent_dtype: float32" in verdict


def test_a_few_overflows_do_not_stop_the_run():
    assert failure_verdict([_result(390, latent_overflow=10)], 0.9, CONFIG) is None
