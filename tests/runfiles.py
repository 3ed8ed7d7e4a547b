"""Inputs and outputs of a `vqpipe run` in tests: small LAION-layout shards of real photos, a run
config around them, and the sample keys a finished run wrote."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow.parquet as pq
import yaml

import shardfactory as sf
from vqpipe import faults

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def make_shards(folder: Path, n: int, per_shard: int = 5, prefix: str = "shard") -> list[str]:
    """``n`` shards of ``per_shard`` good samples with globally unique keys, plus one sample without
    an image in each shard (a failure to account for)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n):
        members = []
        for i in range(per_shard):
            key = f"{s:03d}{i:03d}"
            members += sf.good_members(key, name=PHOTOS[(s + i) % len(PHOTOS)], caption=f"photo {key}")
            keys.append(key)
        members.append((f"{s:03d}999.txt", b"no image here"))
        sf.write_tar(folder / f"{prefix}-{s:05d}.tar", members)
    return keys


def write_config(tmp_path: Path, model: str, urls: str, out: Path, **sections) -> Path:
    config = {
        "input": {"urls": urls},
        "preprocess": {"resolution": 32},
        "model": {"path": model, "batch_size": 2},
        "output": {"path": str(out)},
        "ray": {"num_workers": 2, "cpus_per_worker": 1, "shard_timeout_s": 120},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def written_keys(out: Path) -> list[str]:
    return [k for f in sorted(out.glob("*.parquet")) for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()]


@contextlib.contextmanager
def slow_driver(config: Path, stems: Sequence[str], seconds: float = 1.0) -> Iterator[subprocess.Popen]:
    """``vqpipe run CONFIG`` in a process group of its own, each shard held ``seconds`` after its
    first batch (so a test can catch it mid-run); SIGKILLed with the Ray cluster it started when
    the block ends, as a preempted node would be."""
    plan = [{"stem": stem, "after_batches": 1, "action": "sleep", "seconds": seconds} for stem in stems]
    env = dict(os.environ, **{faults.ENV: json.dumps(plan)})
    driver = subprocess.Popen([sys.executable, "-m", "vqpipe.cli", "run", str(config)], env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield driver
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()

