import io
import json
import threading

import duckdb
import fsspec
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3server import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)
from vqpipe.output import layout, sink
from vqpipe.output.arrays import fixed_list_to_numpy, to_fixed_list_array
from vqpipe.output.sink import ShardWriter, TokenLayout, arrow_schema, committed_stems, read_marker

LAYOUT = TokenLayout(codes_shape=(4, 3), latent_shape=(2, 4, 3), codebook_size=1024, write_latents=True)
META = {"model": "test-vq", "resolution": 64}


class Rows:
    """N rows whose values are recomputable from the row index."""

    def __init__(self, start: int, n: int, layout: TokenLayout = LAYOUT) -> None:
        i = np.arange(start, start + n)
        self.keys = [f"k{j:05d}" for j in i]
        self.sources = ["s3://in/00000.tar"] * n
        self.codes = (i[:, None, None] * 7 + np.arange(12).reshape(4, 3)) % layout.codebook_size
        self.latents = (i[:, None, None, None] + np.linspace(-1, 1, 24).reshape(2, 4, 3)).astype(np.float32)
        self.captions = [None if j % 5 == 0 else f"caption {j}" for j in i]
        self.metadatas = [json.dumps({"i": int(j)}) for j in i]
        self.widths, self.heights = i + 100, i + 200

    def write(self, writer: ShardWriter) -> None:
        writer.write(self.keys, self.sources, self.codes, self.latents, self.captions, self.metadatas,
                     self.widths, self.heights)


def write_shard(url: str, stem: str, n: int, batch: int = 300, layout: TokenLayout = LAYOUT, **marker):
    writer = ShardWriter(url, stem, layout, META, {})
    for start in range(0, n, batch):
        Rows(start, min(batch, n - start), layout).write(writer)
    return writer.commit({"source": "s3://in/00000.tar", **marker})


@pytest.fixture(params=["local", "memory"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return f"memory://sink-{tmp_path.name}"


def read_table(url: str) -> pa.Table:
    with fsspec.open(url, "rb") as f:
        return pq.read_table(f)


def test_schema_columns_types_and_metadata():
    schema = arrow_schema(LAYOUT, META)
    assert schema.names == ["key", "source", "codes", "latents", "caption", "metadata", "width", "height"]
    assert schema.field("codes").type == pa.list_(pa.list_(pa.uint16(), 3), 4)
    assert schema.field("latents").type == pa.list_(pa.list_(pa.list_(pa.float16(), 3), 4), 2)
    assert json.loads(schema.metadata[b"vqpipe"]) == META
    def code_type(codebook_size):
        return arrow_schema(TokenLayout((4, 3), (2, 4, 3), codebook_size), {}).field("codes").type.value_type.value_type

    assert code_type(2**16) == pa.uint16()  # codes 0..65535 fit
    assert code_type(2**16 + 1) == pa.int32()
    assert arrow_schema(TokenLayout((4, 3), (2, 4, 3), 8, write_codes=False), {}).names == [
        "key", "source", "caption", "metadata", "width", "height"]


def test_fixed_list_round_trip_is_zero_copy_and_honours_slices():
    values = np.arange(5 * 4 * 3, dtype=np.uint16).reshape(5, 4, 3)
    array = to_fixed_list_array(values, pa.uint16())
    back = fixed_list_to_numpy(array)
    assert np.array_equal(back, values)
    assert np.shares_memory(back, values)  # numpy -> arrow -> numpy without a copy
    assert np.array_equal(fixed_list_to_numpy(array.slice(2, 2)), values[2:4])
    chunked = pa.chunked_array([array.slice(0, 2), array.slice(2)])
    assert np.array_equal(fixed_list_to_numpy(chunked), values)


@pytest.mark.parametrize("bad", [65536, -1, 1024])
def test_codes_out_of_range_raise_naming_the_value(tmp_path, bad):
    rows = Rows(0, 3)
    rows.codes[1, 2, 0] = bad
    with ShardWriter(str(tmp_path), "s", LAYOUT, META, {}) as writer:
        with pytest.raises(ValueError, match=str(bad)):
            rows.write(writer)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_float16_overflow_raises():
    with pytest.raises(ValueError, match="70000"):
        to_fixed_list_array(np.full((1, 2), 70000.0, np.float32), pa.float16())


def test_round_trip_with_pyarrow(output):
    result = write_shard(output, "00000", 2500)
    assert result.committed and result.rows == 2500
    table = read_table(layout.data_path(output, "00000"))
    expected = Rows(0, 2500)
    assert table.column("key").to_pylist() == expected.keys
    assert np.array_equal(fixed_list_to_numpy(table["codes"]), expected.codes)
    # float16 keeps ~3 significant digits; latents here reach 2500.
    np.testing.assert_allclose(fixed_list_to_numpy(table["latents"]), expected.latents, rtol=1e-3)
    assert table.column("caption").to_pylist() == expected.captions
    assert table.column("width").to_pylist() == expected.widths.tolist()
    assert json.loads(table.schema.metadata[b"vqpipe"]) == META


def test_row_groups_and_encodings(output):
    write_shard(output, "00000", 2500)
    with fsspec.open(layout.data_path(output, "00000"), "rb") as f:
        meta = pq.ParquetFile(f).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1024, 1024, 452]
    encodings = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).encodings
                 for i in range(meta.num_columns)}
    assert "RLE_DICTIONARY" in encodings["codes.list.element.list.element"]
    assert "RLE_DICTIONARY" not in encodings["latents.list.element.list.element.list.element"]
    assert not any("BYTE_STREAM_SPLIT" in e for e in encodings.values())
    stats = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).is_stats_set
             for i in range(meta.num_columns)}
    assert stats.pop("latents.list.element.list.element.list.element") is False  # nobody reads them
    assert all(stats.values()), stats  # the codes' min/max clear row groups in the decode job


def test_multi_view_codes_are_dictionary_encoded_too(tmp_path):
    views = TokenLayout(codes_shape=(2, 4, 3), latent_shape=(2, 2, 4, 3), codebook_size=1024, write_latents=True,
                        views=2)
    schema = arrow_schema(views, META)
    paths = sink._writer_options(views, schema)
    assert paths["use_dictionary"] == ["source", "codes" + ".list.element" * 3]
    assert "latents" + ".list.element" * 4 not in paths["write_statistics"]
    assert "crop_box.list.element.list.element" in paths["write_statistics"]


def test_other_readers_see_the_shapes(output):
    write_shard(output, "00000", 50)
    data = fsspec.open(layout.data_path(output, "00000"), "rb").open().read()
    expected = Rows(0, 50)
    frame = pl.read_parquet(io.BytesIO(data))
    assert frame.schema["codes"] == pl.Array(pl.UInt16, (4, 3))
    assert np.array_equal(frame["codes"].to_numpy(), expected.codes)
    assert frame["latents"].to_numpy().shape == (50, 2, 4, 3)
    pandas = pd.read_parquet(io.BytesIO(data))
    assert np.array_equal(np.stack([np.stack(c) for c in pandas["codes"]]), expected.codes)
    con = duckdb.connect()
    con.register_filesystem(fsspec.filesystem("memory"))
    fsspec.filesystem("memory").pipe_file("/duck/x.parquet", data)
    codes = con.sql("SELECT codes FROM read_parquet('memory://duck/x.parquet')").fetchall()
    assert np.array_equal(np.array([c[0] for c in codes]), expected.codes)


def test_hf_datasets_reads_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    out = tmp_path / "out"
    write_shard(str(out), "00000", 30)
    write_shard(str(out), "00001", 20)
    ds = datasets.load_dataset("parquet", data_files=f"{out}/*.parquet", split="train",
                               cache_dir=str(tmp_path / "hf")).with_format("numpy")
    assert len(ds) == 50
    assert ds[:]["codes"].shape == (50, 4, 3)
    assert ds[:]["latents"].shape == (50, 2, 4, 3)


def test_reading_the_folder_ignores_markers_and_temp_files(tmp_path):
    out = str(tmp_path / "out")
    write_shard(out, "00000", 30)
    write_shard(out, "00001", 20)
    pending = ShardWriter(out, "00002", LAYOUT, META, {})  # an attempt still in flight
    Rows(0, 10).write(pending)
    assert pq.read_table(out).num_rows == 50
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/*.parquet')").fetchall() == [(50,)]
    pending.abort()


def test_failure_mid_write_leaves_nothing_and_retry_commits(output):
    fs, root = fsspec.core.url_to_fs(output)
    with pytest.raises(RuntimeError, match="encoder died"):
        with ShardWriter(output, "00000", LAYOUT, META, {}) as writer:
            Rows(0, 1500).write(writer)  # one row group already handed to the writer
            raise RuntimeError("encoder died")
    assert not fs.exists(root) or fs.find(root) == []
    assert committed_stems(output, {}) == set()
    result = write_shard(output, "00000", 1500)
    assert result.committed and read_table(layout.data_path(output, "00000")).num_rows == 1500


def test_abort_is_explicit_too(tmp_path):
    writer = ShardWriter(str(tmp_path), "s", LAYOUT, META, {})
    Rows(0, 5).write(writer)
    writer.abort()
    writer.abort()  # idempotent
    assert _files(tmp_path) == []
    with pytest.raises(RuntimeError):
        writer.commit({})


def _files(folder) -> list:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_empty_shard_commits_a_valid_file(output):
    result = write_shard(output, "empty", 0)
    assert result.committed and result.rows == 0
    table = read_table(layout.data_path(output, "empty"))
    assert table.num_rows == 0 and table.schema.names == arrow_schema(LAYOUT, META).names
    assert read_marker(output, "empty", {})["rows"] == 0


def test_marker_content_and_listing(output):
    write_shard(output, "00000", 10, failures={"decode_error": 2})
    write_shard(output, "00001", 10)
    assert committed_stems(output, {}) == {"00000", "00001"}
    marker = read_marker(output, "00000", {})
    assert marker["rows"] == 10 and marker["failures"] == {"decode_error": 2}
    assert marker["parquet"] == layout.data_path(output, "00000")
    assert marker["source"] == "s3://in/00000.tar" and "committed_at" in marker
    assert read_marker(output, "nope", {}) is None


def test_second_commit_of_a_stem_loses(output):
    assert write_shard(output, "00000", 10).committed
    again = write_shard(output, "00000", 10)
    assert not again.committed
    assert committed_stems(output, {}) == {"00000"}


def test_concurrent_commits_have_one_winner(tmp_path):
    out = str(tmp_path / "out")
    writers = [ShardWriter(out, "00000", LAYOUT, META, {}) for _ in range(4)]
    for w in writers:
        Rows(0, 20).write(w)
    barrier = threading.Barrier(len(writers))
    results = []

    def commit(w):
        barrier.wait()
        results.append(w.commit({}).committed)

    threads = [threading.Thread(target=commit, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.parquet", "_vqpipe"]
    assert pq.read_table(out).num_rows == 20


def test_commit_to_s3(s3_bucket):  # noqa: F811
    out = f"{s3_bucket.url}/out"
    options = s3_bucket.storage_options
    writer = ShardWriter(out, "00000", LAYOUT, META, options)
    Rows(0, 40).write(writer)
    assert writer.commit({}).committed
    aborted = ShardWriter(out, "00001", LAYOUT, META, options)
    Rows(0, 40).write(aborted)
    aborted.abort()
    assert committed_stems(out, options) == {"00000"}
    keys = [o["Key"] for o in s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name)["Contents"]]
    assert sorted(keys) == ["out/00000.parquet", "out/_vqpipe/shards/00000.json"]
    with fsspec.open(layout.data_path(out, "00000"), "rb", **options) as f:
        assert np.array_equal(fixed_list_to_numpy(pq.read_table(f)["codes"]), Rows(0, 40).codes)
    assert read_marker(out, "00000", options)["rows"] == 40
