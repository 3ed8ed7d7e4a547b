"""Shared fixtures: one real local Ray cluster per test session, a small random VQModel
checkpoint, and shard folders built from real photos."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/shardfactory.py, tests/s3server.py

from tinymodel import tiny_model  # noqa: E402



@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A small random VQModel (f2, 64 codes) in diffusers layout: fast, and enough to check the
    pipeline's bookkeeping; quality checks use the shipped demo tokenizer."""
    path = tmp_path_factory.mktemp("tiny-vq")
    tiny_model().save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with 2 fake GPUs: workers are pinned to distinct GPU ids, and run on the CPU
    (torch sees no CUDA device). Started once: ray.init costs seconds here."""
    import ray

    from vqpipe.run.driver import start_embedded_ray

    start_embedded_ray(num_cpus=4, num_gpus=2)
    yield ray
    ray.shutdown()


REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DemoRun:
    out: Path  # the run's output.path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The quick start's first command as a new user runs it: ``vqpipe run configs/demo.yaml`` in a
    fresh process from the repository root (embedded Ray, the shipped shards and tokenizer), into
    a temporary output folder. Run once per session: Ray's start dominates its ~30 s here."""
    import subprocess

    out = tmp_path_factory.mktemp("demo") / "out" / "demo"
    result = subprocess.run([sys.executable, "-m", "vqpipe.cli", "run", "configs/demo.yaml", f"output.path={out}"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return DemoRun(out, result.stdout, result.stderr)


