"""Driver planning and resume check for 100 000 shard URLs, 50 000 of them committed.

    python tests/benchmarks/bench_plan.py [--shards 100000] [--committed 50000]

Times `vqpipe.run.plan.make_plan`: brace expansion, output stems, listing the commit markers on a
local folder, and the pending list.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from vqpipe.config import InputConfig, ModelConfig, OutputConfig, RunConfig
from vqpipe.run.plan import make_plan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--committed", type=int, default=50_000)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp()) / "out"
    markers = out / "_vqpipe" / "shards"
    markers.mkdir(parents=True)
    for i in range(0, args.shards, args.shards // args.committed):
        (markers / f"{i:06d}.json").write_text("{}")
    config = RunConfig(input=InputConfig(urls=(f"s3://bucket/laion/{{000000..{args.shards - 1:06d}}}.tar",)),
                       model=ModelConfig(path="demo"), output=OutputConfig(path=str(out)))
    started = time.perf_counter()
    plan = make_plan(config)
    elapsed = time.perf_counter() - started
    print(f"{plan.total} shards, {len(plan.committed)} committed, {len(plan.pending)} pending: "
          f"planned in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
