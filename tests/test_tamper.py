"""Tampering and rot in an output folder are found and named; nothing vqpipe did not write is touched.

Parquet files deleted with their marker kept, cut short, or rewritten; commit markers and run.json
that are not JSON; an img2dataset folder's own ``{shard}.parquet`` files. `vqpipe inspect`
names each damaged file and exits 1 without a traceback; `vqpipe run` names each, redoes the
damaged shards, refuses (exit 2, before Ray) a folder holding Parquet files it did not write, and
`--overwrite` deletes only vqpipe's own files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runfiles import make_shards, write_config, written_keys
from test_sink import LAYOUT, META, Rows
from vqpipe import cli
from vqpipe.config import load_config
from vqpipe.input.urls import shard_stem
from vqpipe.output.folder import remove_output
from vqpipe.output.sink import ShardWriter


def committed_output(out: Path, n: int) -> list[Path]:
    """``n`` shards committed through the real sink; their data files."""
    files = []
    for i in range(n):
        writer = ShardWriter(str(out), f"s{i}", LAYOUT, {**META, "num_vq_embeddings": 1024, "latent_shape": [2, 4, 3],
                                                          "latent_dtype": "float16", "scaling_factor": 1.0}, {})
        Rows(10 * i, 10).write(writer)
        writer.commit({"source": f"/in/s{i}.tar"})
        files.append(out / f"s{i}.parquet")
    return files


def damage(out: Path, files: list[Path]) -> None:
    """0: deleted (marker kept); 1: cut in half; 2: its marker not JSON; 3: bytes flipped, same size."""
    files[0].unlink()
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])
    (out / "_vqpipe" / "shards" / "s2.json").write_text('{"source": "/in/s2.tar", "rows"')
    data = bytearray(files[3].read_bytes())
    data[len(data) // 3] ^= 0xFF
    files[3].write_bytes(bytes(data))


def test_inspect_names_every_damaged_file_and_exits_1(tmp_path, capsys):
    out = tmp_path / "out"
    files = committed_output(out, 5)
    damage(out, files)
    assert cli.main(["inspect", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{files[0]}: s0.parquet is missing" in err
    assert f"{files[1]}: s1.parquet is " in err and "its commit marker records" in err
    assert f"{files[1]}: unreadable Parquet" in err
    assert f"{out}/_vqpipe/shards/s2.json: commit marker unreadable" in err
    assert "Traceback" not in err
    assert cli.main(["inspect", str(out), "--verify"]) == 1
    err = capsys.readouterr().err
    assert f"{files[3]}: sha256 differs from its commit marker's" in err or f"{files[3]}: unreadable" in err
    assert str(files[4]) not in err  # the intact one is not named


def test_inspect_of_an_intact_output_verifies(tmp_path, capsys):
    out = tmp_path / "out"
    committed_output(out, 3)
    assert cli.main(["inspect", str(out), "--verify"]) == 0
    assert "PROBLEMS" not in capsys.readouterr().out


def img2dataset_folder(out: Path) -> Path:
    out.mkdir(parents=True)
    foreign = out / "00000.parquet"  # img2dataset's per-shard metadata, the name vqpipe would write
    pq.write_table(pa.table({"url": ["http://x/a.jpg"], "status": ["success"]}), foreign)
    pq.write_table(pa.table({"url": ["http://x/a.jpg"]}), out / "my_url_list.parquet")
    return foreign


def test_a_folder_with_parquet_files_vqpipe_did_not_write_is_refused(tmp_path, tiny_model_path, capsys):
    make_shards(tmp_path / "in", 1, per_shard=1)
    out = tmp_path / "out"
    img2dataset_folder(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-00000.tar"), out)
    started = time.time()
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "did not write: 00000.parquet, my_url_list.parquet" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing replaced
    assert time.time() - started < 30  # refused at planning, no Ray


def test_overwrite_deletes_only_what_vqpipe_wrote(tmp_path):
    out = tmp_path / "out"
    committed_output(out, 2)
    foreign = img2dataset_folder(out / "nested")  # a user's folder inside: not listed as data
    notes = out / "notes.parquet"
    pq.write_table(pa.table({"x": [1]}), notes)
    orphan = ShardWriter(str(tmp_path / "elsewhere"), "o", LAYOUT, META, {})  # vqpipe's, its marker lost
    Rows(0, 3).write(orphan)
    orphan.commit({})
    (tmp_path / "elsewhere" / "o.parquet").rename(out / "o.parquet")
    config = load_config(write_config(tmp_path, "demo", "x.tar", out))
    remove_output(config)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["nested/00000.parquet", "nested/my_url_list.parquet", "notes.parquet"]
    assert foreign.exists()


def test_missing_inputs_and_unwritable_outputs_exit_2_before_ray(tmp_path, tiny_model_path, capsys):
    make_shards(tmp_path / "in", 1, per_shard=1)
    out = tmp_path / "out"
    typo = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-{00010..00019}.tar"), out)
    assert cli.main(["run", str(typo)]) == 2
    assert "none of the 10 input shards exists" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "file.txt").write_text("x")
    for bad in ("/proc/vqpipe-test/out", str(tmp_path / "file.txt" / "out")):
        config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "shard-00000.tar"), Path(bad))
        started = time.time()
        assert cli.main(["run", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"output.path {bad} cannot be written" in err and err.count("\n") == 1 and "Traceback" not in err
        assert time.time() - started < 30


def test_output_inside_an_input_glob_is_refused_and_globs_skip_non_tar_files(tmp_path, tiny_model_path, capsys):
    make_shards(tmp_path / "in", 2, per_shard=1)
    for name in ("notes.txt", "urls.parquet"):
        (tmp_path / "in" / name).write_bytes(b"x")
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "*"), tmp_path / "in")
    assert cli.main(["run", str(config)]) == 2
    assert "inside the reach of the input glob" in capsys.readouterr().err
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "in" / "*"), tmp_path / "out")
    assert cli.main(["run", str(config), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "shards: 2" in text and "non-tar files passed over by globs: 2" in text


@pytest.mark.usefixtures("ray_cluster")
def test_rerun_redoes_damaged_shards_and_a_grown_list_duplicates_nothing(tmp_path, tiny_model_path, capsys):
    keys = make_shards(tmp_path / "a", 4, per_shard=2)
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_model_path, str(tmp_path / "a" / "shard-*.tar"), out,
                          ray={"num_workers": 1})
    assert cli.main(["run", str(config)]) == 0
    stems = [shard_stem(str(tmp_path / "a" / f"shard-{i:05d}.tar")) for i in range(4)]
    files = [out / f"{s}.parquet" for s in stems]
    files[0].unlink()
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])
    (out / "_vqpipe" / "shards" / f"{stems[2]}.json").write_text("{not json")
    (out / "_vqpipe" / "run.json").write_text("{not json")
    intact = files[3].stat().st_mtime_ns
    # the same file names in a second folder, added to the list
    more = make_shards(tmp_path / "b", 2, per_shard=2, prefix="shard")
    grown = write_config(tmp_path, tiny_model_path, [str(tmp_path / "b" / "shard-*.tar"),
                                                     str(tmp_path / "a" / "shard-*.tar")], out, ray={"num_workers": 1})
    capsys.readouterr()
    assert cli.main(["run", str(grown), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "shards: 6" in plan and "committed: 1" in plan and "pending (this run): 5" in plan
    assert f"{stems[0]}.parquet is missing" in plan and str(out / "_vqpipe" / "shards" / f"{stems[2]}.json") in plan
    assert cli.main(["run", str(grown)]) == 0
    got = written_keys(out)
    assert sorted(got) == sorted(keys + more)  # b's keys repeat a's: each key of b twice, every other once
    assert files[3].stat().st_mtime_ns == intact
    assert json.loads((out / "_vqpipe" / "run.json").read_text())["status"] == "complete"
    assert cli.main(["inspect", str(out), "--verify"]) == 0
