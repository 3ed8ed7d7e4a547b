"""The driver's own storage calls (planning, manifests, failure records, markers, inspect) under
transient faults: every answer must be the true one, never "absent" because a connection dropped.

``faulty://`` over ``memory://`` fails 30% of listings, reads and writes; a failed write may have
reached the store. No Ray here: these are the calls the driver makes before and between shards.
"""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest
import yaml

import faultyfs
from vqpipe.output import folder
from vqpipe.run import plan
from vqpipe.output.layout import FAILED_DIR, MANIFEST
from vqpipe.run.manifest import read_manifest
from vqpipe.output import retry
from vqpipe.output import storage
from vqpipe.config import load_config
from vqpipe.output.layout import marker_path
from vqpipe.output.sink import committed_stems, read_marker
from vqpipe.read.inspect import inspect_output
from vqpipe.input.urls import expand_urls, shard_stem

# One cached filesystem instance for all calls, so its fault generator runs on instead of restarting.
FAULTS = {"target_protocol": "memory", "rate": 0.3, "seed": 11}


@pytest.fixture()
def prefix():
    """A fresh memory:// folder (the memory filesystem is process-wide)."""
    name = f"/faults-{uuid.uuid4().hex[:8]}"
    yield name
    fsspec.filesystem("memory").rm(name, recursive=True)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(retry, "DEFAULT_POLICY", retry.RetryPolicy(attempts=12, base_s=0.0, max_s=0.0))


def _config(tmp_path, prefix: str, urls: str):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "input": {"urls": urls, "storage_options": FAULTS},
        "model": {"path": "demo"},
        "output": {"path": f"faulty://{prefix}/out", "storage_options": FAULTS},
    }))
    return load_config(path)


def _seed(prefix: str, shards: int, committed: list[int]) -> None:
    memory = fsspec.filesystem("memory")
    for i in range(shards):
        memory.pipe_file(f"{prefix}/in/shard-{i:05d}.tar", b"tar")
    for i in committed:
        memory.pipe_file(f"{prefix}/out/shard-{i:05d}.parquet", b"data")
        marker = {"rows": i, "source": f"faulty://{prefix}/in/shard-{i:05d}.tar"}
        memory.pipe_file(marker_path(f"{prefix}/out", f"shard-{i:05d}"), json.dumps(marker).encode())


def test_plan_sees_every_shard_and_every_marker_despite_faults(tmp_path, prefix):
    _seed(prefix, shards=12, committed=[0, 3, 4, 9])
    before = sum(faultyfs.FaultyFileSystem.injected.values())
    for _ in range(5):  # several plans, so the faults land on different calls
        config = _config(tmp_path, prefix, f"faulty://{prefix}/in/shard-*.tar")
        p = plan.make_plan(config)
        assert len(p.urls) == 12
        # Committed under vqpipe 0.1's stems, recognised by the source their markers record.
        assert p.committed == {"shard-00000", "shard-00003", "shard-00004", "shard-00009"}
        assert [p.stems[u] for u in p.pending] == [shard_stem(f"faulty://{prefix}/in/shard-{i:05d}.tar")
                                                   for i in (1, 2, 5, 6, 7, 8, 10, 11)]
    assert sum(faultyfs.FaultyFileSystem.injected.values()) > before  # the faults did happen


def test_manifest_and_failure_records_round_trip_despite_faults(tmp_path, prefix):
    _seed(prefix, shards=1, committed=[])
    config = _config(tmp_path, prefix, f"faulty://{prefix}/in/shard-00000.tar")
    for i in range(10):
        manifest = {"fingerprint": {"resolution": i}}
        folder.write_json(config, MANIFEST, manifest)
        assert read_manifest(config) == manifest
        folder.write_json(config, f"{FAILED_DIR}/s{i}.json", {"error": "x"})
        folder.remove_json(config, f"{FAILED_DIR}/s{i}.json")
        assert not fsspec.filesystem("memory").exists(f"{prefix}/out/{FAILED_DIR}/s{i}.json")
    folder.remove_json(config, f"{FAILED_DIR}/never-written.json")  # absent is not an error


def test_markers_read_and_overwrite_clears_despite_faults(tmp_path, prefix):
    _seed(prefix, shards=6, committed=[1, 2, 5])
    out = f"faulty://{prefix}/out"
    for _ in range(5):
        assert committed_stems(out, FAULTS) == {"shard-00001", "shard-00002", "shard-00005"}
        assert read_marker(out, "shard-00002", FAULTS)["rows"] == 2
        assert read_marker(out, "shard-00003", FAULTS) is None
    folder.remove_output(_config(tmp_path, prefix, f"faulty://{prefix}/in/shard-00000.tar"))
    memory = fsspec.filesystem("memory")
    assert memory.find(f"{prefix}/out") == []


def test_exists_raises_when_the_store_stays_unreachable(prefix):
    """fsspec's ``exists`` would say False here and let a committed shard be published again."""
    fs = faultyfs.FaultyFileSystem(target_protocol="memory", always=[f"{prefix}/down"], skip_instance_cache=True)
    fsspec.filesystem("memory").pipe_file(f"{prefix}/down/marker.json", b"{}")
    assert fs.exists(f"{prefix}/down/marker.json") is False  # the trap
    with pytest.raises(OSError, match="injected permanent outage"):
        storage.exists(fs, f"{prefix}/down/marker.json")
    assert storage.exists(fs, f"{prefix}/missing.json") is False


def test_globs_match_the_same_files_despite_faults(prefix):
    _seed(prefix, shards=7, committed=[])
    for _ in range(5):
        urls = expand_urls(f"faulty://{prefix}/in/shard-0000[0-6].tar", FAULTS)
        assert urls == [f"faulty://{prefix}/in/shard-{i:05d}.tar" for i in range(7)]


def test_inspect_counts_every_marker_and_failure_record_despite_faults(prefix):
    memory = fsspec.filesystem("memory")
    for i in range(7):
        memory.pipe_file(marker_path(f"{prefix}/out", f"shard-{i:05d}"),
                         json.dumps({"rows": 3, "failures_by_reason": {"decode_error": 1}}).encode())
    for i in (7, 8):
        memory.pipe_file(f"{prefix}/out/{FAILED_DIR}/shard-{i:05d}.json",
                         json.dumps({"error": "truncated tar", "attempts": 3}).encode())
    before = sum(faultyfs.FaultyFileSystem.injected.values())
    for _ in range(5):
        shards = inspect_output(f"faulty://{prefix}/out", FAULTS).shards
        assert shards.committed == 7 and shards.failed_samples_by_reason == {"decode_error": 7}
        assert sorted(f.stem for f in shards.failed) == ["shard-00007", "shard-00008"]
    assert sum(faultyfs.FaultyFileSystem.injected.values()) > before
