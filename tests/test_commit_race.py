"""Racing attempts of one shard: the committed file is the marker winner's, byte for byte.

Duplicates of a shard (speculative copies, stragglers) run on other workers, possibly other GPU
types, so their bytes differ. Each round here commits two real ShardWriters of one stem with
different rows at the same instant (threads released by a barrier), locally and on S3 (moto):
whichever created the marker, the file under the final name must hash to the marker's sha256 and
hold the winner's rows, and no attempt file may be left behind.
"""

import hashlib
import json
import threading

import duckdb
import fsspec
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from s3server import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)
from test_sink import LAYOUT, META, Rows
from vqpipe.output import layout
from vqpipe.output.arrays import fixed_list_to_numpy
from vqpipe.output.sink import ShardWriter

ROUNDS = 12


def _race(out: str, options: dict, stem: str) -> tuple[list, list[ShardWriter]]:
    writers = [ShardWriter(out, stem, LAYOUT, META, options) for _ in range(2)]
    for i, writer in enumerate(writers):
        Rows(1000 * i, 30).write(writer)  # different rows: different bytes
    barrier = threading.Barrier(len(writers))
    results: list = [None, None]

    def commit(i: int) -> None:
        barrier.wait()
        results[i] = writers[i].commit({"source": f"s3://in/{stem}.tar"})

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, writers


def _check_round(out: str, options: dict, stem: str) -> None:
    results, writers = _race(out, options, stem)
    assert sorted(r.committed for r in results) == [False, True]
    winner = next(i for i, r in enumerate(results) if r.committed)
    marker = json.loads(fsspec.open(layout.marker_path(out, stem), "rb", **options).open().read())
    assert marker["attempt"] == writers[winner].attempt
    data = fsspec.open(layout.data_path(out, stem), "rb", **options).open().read()
    assert hashlib.sha256(data).hexdigest() == marker["sha256"] and len(data) == marker["bytes"]
    codes = fixed_list_to_numpy(pq.read_table(fsspec.open(layout.data_path(out, stem), "rb", **options).open())["codes"])
    assert np.array_equal(codes, Rows(1000 * winner, 30).codes)
    assert marker["rows"] == 30


def _attempt_files(out: str, options: dict) -> list[str]:
    fs, root = fsspec.core.url_to_fs(out, **options)
    fs.invalidate_cache()
    return [p for p in fs.find(root) if p.endswith(layout.ATTEMPT_SUFFIX)]


def test_racing_attempts_commit_the_winners_bytes_locally(tmp_path):
    out = str(tmp_path / "out")
    for n in range(ROUNDS):
        _check_round(out, {}, f"s{n:02d}")
    assert _attempt_files(out, {}) == []
    assert pq.read_table(out).num_rows == 30 * ROUNDS  # a reader of the folder sees each shard once


def test_racing_attempts_commit_the_winners_bytes_on_s3(s3_bucket):  # noqa: F811
    out, options = f"{s3_bucket.url}/race", s3_bucket.storage_options
    for n in range(ROUNDS // 2):
        _check_round(out, options, f"s{n:02d}")
    assert _attempt_files(out, options) == []
    keys = sorted(o["Key"] for o in s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name, Prefix="race/")["Contents"])
    assert [k for k in keys if not k.startswith("race/_vqpipe/shards/")] == [
        f"race/s{n:02d}.parquet" for n in range(ROUNDS // 2)]


def test_s3_marker_records_the_etag(s3_bucket):  # noqa: F811
    out, options = f"{s3_bucket.url}/etag", s3_bucket.storage_options
    writer = ShardWriter(out, "s", LAYOUT, META, options)
    Rows(0, 5).write(writer)
    marker = writer.commit({}).marker
    assert marker["etag"]
    assert marker["attempt_file"] == layout.attempt_file("s", writer.attempt)


def test_readers_never_see_an_attempt_file(tmp_path, monkeypatch):
    """An attempt whose marker a killed worker never wrote: no reader of the folder (pyarrow, polars,
    duckdb, HF datasets), recursive globs included, sees it."""
    out = tmp_path / "out"
    for folder, stem in ((out, "done"), (tmp_path / "elsewhere", "busy")):
        writer = ShardWriter(str(folder), stem, LAYOUT, META, {})
        Rows(0, 10).write(writer)
        writer.commit({})
    attempt = out / layout.attempt_file("busy", "0123456789abcdef")
    (tmp_path / "elsewhere" / "busy.parquet").rename(attempt)
    assert list(out.rglob("*.parquet")) == [out / "done.parquet"]
    assert pq.read_table(str(out)).num_rows == 10
    assert pl.read_parquet(f"{out}/*.parquet").height == 10
    assert pl.read_parquet(f"{out}/**/*.parquet").height == 10
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/**/*.parquet')").fetchall() == [(10,)]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    ds = datasets.load_dataset("parquet", data_files=f"{out}/**/*.parquet", split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 10


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_publish_a_killed_run_never_did_is_finished_by_the_next_plan(tmp_path, where):
    """Killed between the marker and the publish: the attempt file is there, the data file is not.
    Readers see nothing of it meanwhile; the next run's planning publishes the winner's bytes."""
    from vqpipe.config import load_config
    from vqpipe.output.folder import repair
    from vqpipe.output.markers import audit
    from runfiles import write_config

    out = str(tmp_path / "out") if where == "local" else f"memory://unpublished-{tmp_path.name}"
    writer = ShardWriter(out, "s", LAYOUT, META, {})
    Rows(0, 7).write(writer)
    marker = writer.commit({"source": "/in/s.tar"}).marker
    fs, root = fsspec.core.url_to_fs(out)
    fs.mv(f"{root}/s.parquet", f"{root}/{marker['attempt_file']}")  # undo the publish
    checked = audit(fs, root)
    assert checked.to_publish == {"s": f"{root}/{marker['attempt_file']}"} and checked.committed == {"s"}
    repair(load_config(write_config(tmp_path, "demo", "x.tar", tmp_path / "unused", output={"path": out})),
           checked, {"s"})
    assert hashlib.sha256(fs.cat_file(f"{root}/s.parquet")).hexdigest() == marker["sha256"]
    assert _attempt_files(out, {}) == []
    assert set(audit(fs, root).good) == {"s"}
