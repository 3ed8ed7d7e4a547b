"""Readers: codes_array / latents_array share Arrow's memory for one chunk and are right for many."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pyarrow as pa
import pytest

from vqpipe.output import sink
from vqpipe.read.tokens import codes_array, data_file_sizes, latents_array, read_tokens, sample_rows, token_metadata
from vqpipe.output.sink import ShardWriter, TokenLayout

LAYOUT = TokenLayout(codes_shape=(3, 2), latent_shape=(2, 3, 2), codebook_size=1000, write_latents=True)


def write_output(url: str, files: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(files * rows)
    codes = (i[:, None, None] * 5 + np.arange(6).reshape(3, 2)) % LAYOUT.codebook_size
    latents = (i[:, None, None, None] / 16 + np.linspace(-1, 1, 12).reshape(2, 3, 2)).astype(np.float16)
    for f in range(files):
        part = slice(f * rows, (f + 1) * rows)
        writer = ShardWriter(url, f"shard-{f:05d}", LAYOUT, {"num_vq_embeddings": 1000}, {})
        writer.write([f"k{j:04d}" for j in i[part]], ["in.tar"] * rows, codes[part], latents[part],
                     [None] * rows, [None] * rows, i[part], i[part])
        writer.commit({})
    return codes, latents


def leaf_address(column: pa.ChunkedArray) -> int:
    array = column.chunk(0)
    while pa.types.is_fixed_size_list(array.type):
        array = array.flatten()
    return array.buffers()[1].address + array.offset * array.type.byte_width


def test_one_chunk_is_zero_copy(tmp_path):
    codes, latents = write_output(str(tmp_path), 1, 20)
    table = read_tokens(str(tmp_path))
    assert table.column("codes").num_chunks == 1
    got_codes, got_latents = codes_array(table), latents_array(table)
    assert got_codes.__array_interface__["data"][0] == leaf_address(table.column("codes"))
    assert got_latents.__array_interface__["data"][0] == leaf_address(table.column("latents"))
    assert got_codes.dtype == np.uint16 and got_latents.dtype == np.float16
    assert np.array_equal(got_codes, codes) and np.array_equal(got_latents, latents)
    sliced = table.slice(5, 7)  # an offset into the buffers, still no copy
    assert np.array_equal(codes_array(sliced), codes[5:12])
    assert codes_array(sliced).__array_interface__["data"][0] == leaf_address(sliced.column("codes"))


@pytest.mark.parametrize("files, rows", [(3, 7), (2, 9)])
def test_several_chunks_are_combined_in_order(tmp_path, monkeypatch, files, rows):
    monkeypatch.setattr(sink, "ROW_GROUP_ROWS", 4)
    codes, latents = write_output(str(tmp_path), files, rows)
    table = read_tokens(str(tmp_path))
    assert table.column("codes").num_chunks > files  # several row groups per file
    assert np.array_equal(codes_array(table), codes) and np.array_equal(latents_array(table), latents)
    picked = read_tokens(str(tmp_path), columns=["key", "codes"], filters=[("key", "in", ["k0001", "k0010"])])
    assert np.array_equal(codes_array(picked), codes[[1, 10]])


def test_empty_selection_keeps_the_shape(tmp_path):
    write_output(str(tmp_path), 1, 3)
    table = read_tokens(str(tmp_path), filters=[("key", "==", "nope")])
    assert codes_array(table).shape == (0, 3, 2) and latents_array(table).shape == (0, 2, 3, 2)


def test_listing_skips_markers_and_reads_metadata(tmp_path):
    write_output(str(tmp_path), 2, 3)
    (tmp_path / ".shard-00009.parquet").write_bytes(b"partial")  # a temp file mid-write
    sizes = data_file_sizes(str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in sorted(sizes)] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert all(size == (tmp_path / p.rsplit("/", 1)[-1]).stat().st_size for p, size in sizes.items())
    assert token_metadata(str(tmp_path)) == {"num_vq_embeddings": 1000}


def test_sample_rows_keeps_each_rows_file_and_reads_only_its_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(sink, "ROW_GROUP_ROWS", 4)
    codes, _ = write_output(str(tmp_path), 3, 10)
    requested = []  # the real reader, watched: which row groups each read asks for
    real_read = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, groups, **kw: requested.append(sorted(groups)) or real_read(self, groups, **kw))
    sampled = sample_rows(str(tmp_path), {}, 7, seed=3)
    keys = sampled.table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 7
    rows = [int(k[1:]) for k in keys]
    assert np.array_equal(codes_array(sampled.table), codes[rows])
    assert [f.rsplit("/", 1)[-1] for f in sampled.table.column("file").to_pylist()] == [
        f"shard-{r // 10:05d}.parquet" for r in rows]
    # 10 rows a file in groups of 4: row r of a file lives in group (r % 10) // 4, and no other is read
    by_file = {}
    for r in rows:
        by_file.setdefault(r // 10, set()).add((r % 10) // 4)
    assert sorted(requested) == sorted(sorted(g) for g in by_file.values())
    assert sample_rows(str(tmp_path), {}, 7, seed=3).table.equals(sampled.table)  # seeded
    assert sample_rows(str(tmp_path), {}, 100, seed=0).table.num_rows == 30
    assert sampled.reference_metadata() == {"num_vq_embeddings": 1000} and not sampled.skipped
