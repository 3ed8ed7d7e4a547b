"""The driver alone at scale: many fake workers, a no-op shard function, 10 000 shards.

    python tests/benchmarks/bench_driver.py [--shards 10000] [--workers 64] [--cpus 2]

Each fake worker is a Ray actor holding a fraction of a CPU whose ``process`` returns at once, so
the run's pace is the driver's: handing out shards, collecting results, heartbeats, bookkeeping.
Prints shards/s and the driver's cost per shard: wall time, and CPU time of the driver process
(its Python loop plus Ray's core-worker threads in it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from vqpipe.config import InputConfig, ModelConfig, OutputConfig, RayConfig, RunConfig
from vqpipe.run.driver import Driver, WorkerSpec, start_embedded_ray
from vqpipe.run.plan import Plan
from vqpipe.run.progress import Progress


@dataclass
class NoTimes:
    read_s: float = 0.0
    decode_s: float = 0.0
    encode_s: float = 0.0
    write_s: float = 0.0
    wait_s: float = 0.0


@dataclass
class NoOpResult:
    """What the driver reads of a ShardResult (without importing torch into 64 workers)."""

    url: str
    stem: str
    committed: bool = True
    rows: int = 0
    failures_by_reason: dict = field(default_factory=dict)
    times: NoTimes = field(default_factory=NoTimes)


class NoOpWorker:
    """ShardWorker's methods, doing nothing."""

    def __init__(self, config: RunConfig) -> None:
        self.current = None

    def ready(self) -> dict:
        return {"node": "bench", "device": "none", "gpu_ids": [], "batches": "no-op"}

    def process(self, url: str, stem: str) -> NoOpResult:
        return NoOpResult(url, stem)

    def heartbeat(self):
        return self.current


class TimedDriver(Driver):
    """Hands out no shard before every worker is up (64 process spawns take minutes on a small
    machine), and notes when that was: the figures are the driver's steady state."""

    ready_at: tuple[float, float] | None = None  # (wall, driver CPU) when the last worker came up

    def _assign(self) -> None:
        if self.ready_at is None and len(self.idle) == len(self.workers):
            self.ready_at = (time.perf_counter(), time.process_time())
        if self.ready_at is not None:
            super()._assign()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the embedded Ray")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp()) / "out"
    config = RunConfig(input=InputConfig(urls=("unused",)), model=ModelConfig(path="demo"),
                       output=OutputConfig(path=str(out)),
                       ray=RayConfig(guard_fail_fraction=0.0, speculative=False, shard_timeout_s=60))
    urls = [f"s3://bucket/laion/{i:06d}.tar" for i in range(args.shards)]
    plan = Plan(urls, {u: f"{i:06d}" for i, u in enumerate(urls)}, set(), list(urls))
    start_embedded_ray(num_cpus=args.cpus)
    spec = WorkerSpec(NoOpWorker, args.workers, 0.0, args.cpus / args.workers)
    driver = TimedDriver(config, plan, Progress(total=plan.total, already=0, interval_s=3600))
    started = time.perf_counter()
    outcome = driver.run(spec)
    ended, cpu_end = time.perf_counter(), time.process_time()
    ray.shutdown()
    ready, cpu_ready = driver.ready_at
    done = len(outcome.committed)
    wall, cpu = ended - ready, cpu_end - cpu_ready
    print(f"{len(outcome.committed)}/{args.shards} shards on {args.workers} no-op workers ({args.cpus} CPUs); "
          f"workers up after {ready - started:.1f} s; then {done} shards in {wall:.1f} s: {done / wall:.0f} shards/s, "
          f"driver {1000 * wall / done:.2f} ms wall and {1000 * cpu / done:.2f} ms CPU per shard")


if __name__ == "__main__":
    main()
