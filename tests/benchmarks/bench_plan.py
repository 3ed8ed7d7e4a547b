"""Driver planning and resume check for 100 000 shard URLs, 50 000 of them committed.

    python tests/benchmarks/bench_plan.py [--shards 100000] [--committed 50000]

Times `vqpipe.run.plan.make_plan` on local folders: brace expansion and normalisation, reading
every commit marker (their source URLs name the committed shards) and checking each against one
listing of the data files, one listing of the input folder (do the shards exist?), output stems,
and the pending list.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from vqpipe.input.urls import shard_stem
from vqpipe.config import InputConfig, ModelConfig, OutputConfig, RunConfig
from vqpipe.run.plan import make_plan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--committed", type=int, default=50_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    out, inputs = tmp / "out", tmp / "laion"
    markers = out / "_vqpipe" / "shards"
    markers.mkdir(parents=True)
    inputs.mkdir()
    for i in range(args.shards):
        (inputs / f"{i:06d}.tar").touch()
    for i in range(0, args.shards, args.shards // args.committed):
        url = str(inputs / f"{i:06d}.tar")
        stem = shard_stem(url)
        (out / f"{stem}.parquet").touch()
        (markers / f"{stem}.json").write_text(json.dumps({"source": url, "bytes": 0, "rows": 0}))
    config = RunConfig(input=InputConfig(urls=(f"{inputs}/{{000000..{args.shards - 1:06d}}}.tar",)),
                       model=ModelConfig(path="demo"), output=OutputConfig(path=str(out)))
    started = time.perf_counter()
    plan = make_plan(config)
    elapsed = time.perf_counter() - started
    print(f"{plan.total} shards, {len(plan.committed)} committed, {len(plan.pending)} pending: "
          f"planned in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
