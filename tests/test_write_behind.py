"""WriteBehind: a shard's Parquet writing on its own thread, with ShardWriter's order and
exactly-once commit kept."""

import os
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from test_sink import LAYOUT, META, Rows
from vqpipe.output import layout
from vqpipe.output.sink import ShardWriter
from vqpipe.output.write_behind import WriteBehind


def _columns(rows: Rows) -> dict:
    return dict(keys=rows.keys, sources=rows.sources, codes=rows.codes, latents=rows.latents,
                captions=rows.captions, metadatas=rows.metadatas, widths=rows.widths, heights=rows.heights)


def test_rows_arrive_in_order_across_row_groups(tmp_path):
    out = str(tmp_path / "out")
    writer = WriteBehind(ShardWriter(out, "s", LAYOUT, META, {}))
    for start in range(0, 2500, 100):  # 25 batches, three row groups of 1024
        writer.write(**_columns(Rows(start, 100)))
    result = writer.commit({"source": "in.tar"})
    assert result.committed and result.rows == 2500
    table = pq.read_table(os.path.join(out, "s.parquet"))
    assert table.column("key").to_pylist() == Rows(0, 2500).keys
    assert pq.ParquetFile(os.path.join(out, "s.parquet")).metadata.num_row_groups == 3
    assert writer.busy_s > 0


def test_writes_run_off_the_callers_thread_and_stay_bounded(tmp_path):
    seen, gate = [], threading.Event()

    class Slow(ShardWriter):
        def write(self, *args, **kwargs):
            seen.append(threading.current_thread().name)
            gate.wait(10)
            super().write(*args, **kwargs)

    writer = WriteBehind(Slow(str(tmp_path / "out"), "s", LAYOUT, META, {}), max_pending=2)
    writer.write(**_columns(Rows(0, 10)))
    writer.write(**_columns(Rows(10, 10)))  # both handed over while the first still blocks
    third = threading.Thread(target=writer.write, kwargs=_columns(Rows(20, 10)))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # a third batch waits: at most two are in flight
    gate.set()
    third.join(10)
    assert writer.commit({"source": "in.tar"}).rows == 30
    assert seen and all(name.startswith("vqpipe-write") for name in seen)


def test_a_failed_write_reraises_before_anything_commits(tmp_path):
    out = str(tmp_path / "out")
    writer = WriteBehind(ShardWriter(out, "s", LAYOUT, META, {}))
    writer.write(**_columns(Rows(0, 10)))
    bad = Rows(10, 10)
    bad.codes = np.full_like(bad.codes, LAYOUT.codebook_size)  # out of the codebook: the writer refuses it
    writer.write(**_columns(bad))
    with pytest.raises(ValueError, match="outside"):
        writer.commit({"source": "in.tar"})
    writer.abort()
    writer.abort()  # idempotent
    assert not os.path.exists(os.path.join(out, "s.parquet"))
    assert not os.path.exists(os.path.join(out, layout.MARKER_DIR, "s.json"))
    assert [name for name in os.listdir(out) if not name.startswith("_")] == []


def test_abort_waits_for_the_write_in_flight(tmp_path):
    out = str(tmp_path / "out")
    started, release, finished = threading.Event(), threading.Event(), []

    class Slow(ShardWriter):
        def write(self, *args, **kwargs):
            started.set()
            release.wait(10)
            super().write(*args, **kwargs)
            finished.append(True)

    writer = WriteBehind(Slow(out, "s", LAYOUT, META, {}))
    writer.write(**_columns(Rows(0, 10)))
    started.wait(10)
    threading.Timer(0.2, release.set).start()
    writer.abort()  # returns only once the write stopped touching the attempt's file
    assert finished == [True]
    assert not os.path.exists(os.path.join(out, "s.parquet"))
