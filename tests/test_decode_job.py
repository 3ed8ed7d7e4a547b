"""`vqpipe decode` on real `vqpipe run` outputs: the report files, PSNR equal to an independent
computation, and failing checks that name the offending file and key."""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from runfiles import make_shards, write_config
from vqpipe import VQModel, cli
from vqpipe.output import sink
from vqpipe.read import decode_job, decode_report
from vqpipe.output.arrays import fixed_list_to_numpy, to_fixed_list_array
from vqpipe.input.images import preprocess
from vqpipe.read.tokens import sample_rows
from vqpipe.input.shards import iter_samples
from vqpipe.output.sink import ShardWriter, TokenLayout

pytestmark = pytest.mark.usefixtures("ray_cluster")

DEMO = resources.files("vqpipe") / "assets" / "demo-vq"
DEMO_MIN_PSNR_DB = 21.0  # under the demo's ~25.6 dB on these photos; the random tiny model scores ~11


@pytest.fixture(scope="module")
def model_setup(tiny_model_path) -> tuple[str, str, int]:
    """(model.path, its folder, resolution): the shipped demo tokenizer at 128 px once it is in the
    package, else the tiny random model at 32 px (which checks the bookkeeping, not the quality)."""
    if (DEMO / "config.json").is_file():
        return "demo", str(DEMO), 128
    return tiny_model_path, tiny_model_path, 32


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("decode-in")
    make_shards(folder, 2, per_shard=3)
    return folder


def encode(tmp: Path, inputs: Path, model_setup, shards: str = "shard-*.tar", **output) -> tuple[Path, Path]:
    """`vqpipe run` over the input shards on one worker (one model load); returns (config, output)."""
    model, _, resolution = model_setup
    out = tmp / "out"
    # float32 latents, as configs/demo.yaml stores them: the demo's 1024 close-packed codes flip
    # ~0.5% on re-quantizing float16 latents, under the consistency check's 99.9% floor.
    output = {"latent_dtype": "float32", **output}
    config = write_config(tmp, model, str(inputs / shards), out, preprocess={"resolution": resolution},
                          output=output, ray={"max_retries": 1, "num_workers": 1})
    assert cli.main(["run", str(config)]) == 0
    return config, out


def data_file(folder: Path, shard: int) -> Path:
    return next(folder.glob(f"shard-{shard:05d}-*.parquet"))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, inputs, model_setup) -> tuple[Path, Path]:
    return encode(tmp_path_factory.mktemp("decode"), inputs, model_setup)


def decode(config: Path, out: Path, report: Path, *extra: str) -> tuple[int, dict]:
    code = cli.main(["decode", str(config), f"output.path={out}", "--out", str(report), "--num-samples", "100",
                     *extra])
    return code, json.loads((report / "report.json").read_text())


def independent_psnr(out: Path, inputs: Path, model_dir: str, resolution: int) -> dict[str, float]:
    """PSNR per key, from scratch: every row's codes through VQModel.decode_codes, to 8 bits, against
    its photo preprocessed from the input shard."""
    model = VQModel.from_pretrained(model_dir).eval()
    table = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("*.parquet"))])
    meta = json.loads(table.schema.metadata[b"vqpipe"])
    codes = torch.from_numpy(fixed_list_to_numpy(table.column("codes")).astype(np.int64))
    with torch.inference_mode():
        images = model.decode_codes(codes).numpy()
    low, high = meta["value_range"]
    recon = np.clip(np.rint((images - low) / (high - low) * 255.0), 0, 255).transpose(0, 2, 3, 1)
    originals = {s.key: preprocess(s, resolution=resolution).pixels
                 for tar in sorted(inputs.glob("*.tar")) for s in iter_samples(str(tar), {}, lambda f: None)
                 if s.key.endswith(("000", "001", "002"))}
    result = {}
    for key, image in zip(table.column("key").to_pylist(), recon):
        mse = np.mean((originals[key].astype(np.float64) - image) ** 2)
        result[key] = 10 * np.log10(255.0**2 / mse)
    return result


def test_report_files_and_psnr_match_an_independent_computation(encoded, inputs, model_setup, tmp_path, capsys):
    config, out = encoded
    code, report = decode(config, out, tmp_path / "report")
    assert code == 0, report["checks"]
    assert {c["name"]: c["ok"] for c in report["checks"]} == {
        "files": True, "metadata": True, "schema": True, "lineage": True, "consistency": True, "psnr": True}
    keys = [s["key"] for s in report["samples"]]
    assert sorted(keys) == [f"{s:03d}{i:03d}" for s in range(2) for i in range(3)]
    for name in ["report.json", "report.html", "grid.png", *(f"{k}.png" for k in keys)]:
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    assert {s["file"] for s in report["samples"]} == {str(p) for p in out.glob("*.parquet")}
    expected = independent_psnr(out, inputs, model_setup[1], model_setup[2])
    for sample in report["samples"]:
        # Batches of a different size may round a few pixels the other way: 0.05 dB is ~1% of MSE.
        assert sample["psnr"] == pytest.approx(expected[sample["key"]], abs=0.05), sample["key"]
    assert report["mean_psnr"] == pytest.approx(np.mean(list(expected.values())), abs=0.05)
    if model_setup[0] == "demo":
        assert report["mean_psnr"] > DEMO_MIN_PSNR_DB
    assert "report:" in capsys.readouterr().out


def test_report_shows_what_the_run_skipped_by_reason_with_keys(encoded, tmp_path, capsys):
    config, out = encoded
    code, report = decode(config, out, tmp_path / "report")
    assert code == 0
    # make_shards puts one sample without an image in each of the 2 shards: 000999 and 001999.
    (no_image,) = report["run_failures"]["samples"]
    assert no_image["reason"] == "no_image" and no_image["count"] == 2
    # stems are the shard's name and a hash of its URL
    assert [(e["stem"].rsplit("-", 1)[0], e["key"]) for e in no_image["examples"]] == [("shard-00000", "000999"),
                                                                                       ("shard-00001", "001999")]
    assert report["run_failures"]["shards"] == []
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Not encoded by the run: 2 samples (no_image 2), 0 shards" in page
    assert re.search(r"shard-00000-[0-9a-f]{8}: 000999", page) and re.search(r"shard-00001-[0-9a-f]{8}: 001999", page)
    assert "not encoded by the run: 2 samples (no_image 2), 0 shards" in capsys.readouterr().out


def test_grid_labels_each_pair_with_its_psnr():
    size = 32
    recon = np.full((2, size, size, 3), 128, np.uint8)
    canvas = np.asarray(decode_report.grid(["a", "b"], {}, recon, [23.4, None]).convert("L"))
    line = decode_report.LABEL_LINE
    # The second label line of each pair holds its PSNR (or "no original"): dark text on white.
    assert (canvas[line:2 * line, : 2 * size] < 128).any() and (canvas[line:2 * line, 2 * size + 8:] < 128).any()
    assert decode_report.pair_label(23.44) == "PSNR 23.4 dB" and decode_report.pair_label(float("inf")) == "lossless"
    assert decode_report.pair_label(None) == "no original"


def test_psnr_floor_fails_naming_the_worst_rows(encoded, tmp_path):
    config, out = encoded
    code, report = decode(config, out, tmp_path / "report", "--min-psnr", "99")
    check = next(c for c in report["checks"] if c["name"] == "psnr")
    assert code == 1 and not check["ok"] and "(floor 99.0 dB); lowest: " in check["figure"]
    named = check["figure"].split("lowest: ")[1]
    ranked = sorted(report["samples"], key=lambda s: s["psnr"])
    assert all(s["key"] in named and s["file"] in named for s in ranked[:5])
    assert ranked[5]["key"] not in named  # five rows are named: the best of six is not


def corrupt_one_code(path: Path, row: int, value: int) -> str:
    """Rewrite ``path`` with the same schema (and metadata) and one code replaced; returns the row's key."""
    table = pq.read_table(path)
    codes = fixed_list_to_numpy(table.column("codes")).copy()
    codes[row, 0, 0] = value
    column = to_fixed_list_array(codes, table.schema.field("codes").type.value_type.value_type)
    table = table.set_column(table.schema.get_field_index("codes"), table.schema.field("codes"), column)
    pq.write_table(table, path)
    return table.column("key")[row].as_py()


@pytest.mark.parametrize("num_samples", ["100", "1"], ids=["row-sampled", "row-not-sampled"])
def test_out_of_range_code_fails_naming_file_and_key(encoded, tmp_path, capsys, num_samples):
    config, out = encoded
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    target = data_file(copy, 1)
    codebook = json.loads(pq.read_schema(target).metadata[b"vqpipe"])["num_vq_embeddings"]
    key = corrupt_one_code(target, 1, codebook)  # fits the uint16 column, not the codebook
    capsys.readouterr()
    code, report = decode(config, copy, tmp_path / "report", "--num-samples", num_samples)
    assert code == 1
    printed = capsys.readouterr().out
    # the rewritten file no longer matches its commit marker ("FAILED files"); the rows are the point here
    failed = [line for line in printed.splitlines() if line.startswith("FAILED") and "FAILED files" not in line]
    assert len(failed) == 1 and "schema" in failed[0]  # the other rows still decode and pass
    assert str(target) in failed[0] and key in failed[0] and f"code {codebook} outside" in failed[0]
    decoded = {"100": 5, "1": 1}[num_samples]  # with 1 sample the bad row is not drawn: the footers find it
    assert key not in {s["key"] for s in report["samples"]} and len(report["samples"]) == decoded


def test_a_file_with_other_columns_is_named_and_left_out(encoded, tmp_path):
    config, out = encoded
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    target = data_file(copy, 1)
    table = pq.read_table(target)
    latents = fixed_list_to_numpy(table.column("latents")).astype(np.float16)  # the output holds float32
    field = pa.field("latents", to_fixed_list_array(latents, pa.float16()).type, nullable=False)
    table = table.set_column(table.schema.get_field_index("latents"), field,
                             to_fixed_list_array(latents, pa.float16()))
    pq.write_table(table, target)
    code, report = decode(config, copy, tmp_path / "report")
    schema = next(c for c in report["checks"] if c["name"] == "schema")
    assert code == 1 and not schema["ok"]
    assert f"{target}: columns differ" in schema["figure"] and "halffloat" in schema["figure"]
    assert {s["file"] for s in report["samples"]} == {str(data_file(copy, 0))}


def test_without_latents_skips_the_consistency_check(tmp_path, inputs, model_setup):
    config, out = encode(tmp_path, inputs, model_setup, "shard-00000.tar", latents=False)
    assert "latents" not in pq.read_schema(data_file(out, 0)).names
    code, report = decode(config, out, tmp_path / "report")
    assert code == 0 and [c["name"] for c in report["checks"]] == ["files", "metadata", "schema", "lineage", "psnr"]


def test_without_codes_decodes_from_latents(tmp_path, inputs, model_setup, encoded):
    config, out = encode(tmp_path, inputs, model_setup, "shard-00000.tar", codes=False)
    assert "codes" not in pq.read_schema(data_file(out, 0)).names
    code, report = decode(config, out, tmp_path / "report")
    assert code == 0 and "consistency" not in [c["name"] for c in report["checks"]]
    _, from_codes = decode(encoded[0], encoded[1], tmp_path / "from-codes")
    # decode(latents) quantizes first, so it lands on the stored codes but for near-ties float16
    # storage may flip: allow a small difference.
    expected = {s["key"]: s["psnr"] for s in from_codes["samples"]}
    assert [s["key"] for s in report["samples"]] == ["000000", "000001", "000002"]
    for sample in report["samples"]:
        assert sample["psnr"] == pytest.approx(expected[sample["key"]], abs=0.1)


def test_a_missing_source_shard_fails_lineage_naming_keys(encoded, inputs, tmp_path, capsys):
    config, out = encoded
    moved = tmp_path / "in"
    shutil.copytree(inputs, moved)
    (moved / "shard-00000.tar").unlink()
    table = pq.read_table(data_file(out, 0))
    sources = pa.array([str(moved / "shard-00000.tar")] * table.num_rows)
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    pq.write_table(table.set_column(table.schema.get_field_index("source"), table.schema.field("source"), sources),
                   data_file(copy, 0))
    code, report = decode(config, copy, tmp_path / "report")
    assert code == 1
    lineage = next(c for c in report["checks"] if c["name"] == "lineage")
    assert not lineage["ok"] and str(data_file(copy, 0)) in lineage["figure"]
    assert "000000" in lineage["figure"] and "missing_shard" in lineage["figure"]
    # the test rewrote that file, so it no longer matches its commit marker: the files check says so
    assert all(c["ok"] for c in report["checks"] if c["name"] not in ("lineage", "files"))


def test_code_range_check_reads_only_suspect_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(sink, "ROW_GROUP_ROWS", 4)
    layout = TokenLayout(codes_shape=(2, 2), latent_shape=(1, 2, 2), codebook_size=2**16)  # lets 99 through
    for stem, rows in (("a", 10), ("empty", 0)):
        writer = ShardWriter(str(tmp_path), stem, layout, {"num_vq_embeddings": 99}, {})
        if rows:
            codes = np.zeros((rows, 2, 2), np.int64)
            codes[6, 1, 1] = 99  # row group 1 of 3
            writer.write([f"k{i}" for i in range(rows)], ["x.tar"] * rows, codes, None, [None] * rows,
                         [None] * rows, np.ones(rows), np.ones(rows))
        writer.commit({})
    sampled = sample_rows(str(tmp_path), {}, 1, seed=0)
    original, read = decode_job._keys_with_codes_over, []

    def spy(fs, path, group, codebook):
        read.append(group)
        return original(fs, path, group, codebook)

    monkeypatch.setattr(decode_job, "_keys_with_codes_over", spy)
    problems = decode_job._code_range_problems(sampled, 99)
    assert problems == [f"code 99 outside the codebook of 99: {tmp_path / 'a.parquet'}: key k6"]
    assert read == [1]  # the other row groups' statistics cleared them; the empty file has no rows


def test_decode_of_an_output_with_no_tokens_exits_2(tmp_path, tiny_model_path, capsys):
    config = write_config(tmp_path, tiny_model_path, "unused.tar", tmp_path / "empty-output")
    (tmp_path / "empty-output").mkdir()
    assert cli.main(["decode", str(config)]) == 2
    assert "empty-output" in capsys.readouterr().err


def test_on_a_cluster_with_gpus_the_decoder_runs_on_a_gpu_worker(encoded, tmp_path, caplog):
    """The session's Ray has 2 fake GPUs: with ray.address set, the decoder pass is a task holding
    one of them (on this machine it still runs on the CPU), and the figures do not change."""
    import logging

    from vqpipe.config import load_config
    from vqpipe.run.driver import GpuReconstruct, gpu_reconstruct

    config, out = encoded
    local_code, local = decode(config, out, tmp_path / "local")
    assert gpu_reconstruct(load_config(config, [f"output.path={out}"])) is None  # no cluster named: here
    with caplog.at_level(logging.INFO, logger="vqpipe.run.driver"):
        code = cli.main(["decode", str(config), f"output.path={out}", "ray.address=auto", "--out",
                         str(tmp_path / "remote"), "--num-samples", "100"])
    remote = json.loads((tmp_path / "remote" / "report.json").read_text())
    assert code == local_code == 0
    ran = [r.message for r in caplog.records if r.message.startswith("decoded ")]
    assert len(ran) == 1 and "(GPU ids ['" in ran[0]
    # Another process with another torch thread count sums convolutions in another order: a pixel
    # may round the other way (1e-3 dB is ~0.02% of the MSE).
    assert [s["psnr"] for s in remote["samples"]] == pytest.approx([s["psnr"] for s in local["samples"]], abs=1e-3)
    assert isinstance(gpu_reconstruct(load_config(config, ["ray.address=auto"])), GpuReconstruct)
def test_damaged_files_are_named_and_fail_without_a_traceback(encoded, tmp_path, capsys):
    """A data file deleted with its marker kept and one cut short: both named, exit 1, and the rest
    of the output still decodes."""
    config, out = encoded
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    deleted, cut = data_file(copy, 0), data_file(copy, 1)
    deleted.unlink()
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    code, report = decode(config, copy, tmp_path / "report")
    files = next(c for c in report["checks"] if c["name"] == "files")
    assert code == 1 and not files["ok"]
    assert f"{deleted}: {deleted.name} is missing" in files["figure"]
    assert f"{cut}: unreadable Parquet" in files["figure"]
    assert "FAILED files" in capsys.readouterr().out


def test_another_model_config_is_a_metadata_problem(tiny_model_path):
    """Same weights, another architecture setting: `decode` must not say "metadata ok"."""
    model = VQModel.from_pretrained(tiny_model_path)
    meta = {"weights_sha256": model.weights_sha256, "scaling_factor": model.config.scaling_factor,
            "model_config": json.loads(json.dumps(model.config.to_dict()))}
    assert decode_job._metadata_problems(meta, model) == []
    meta["model_config"]["norm_num_groups"] = 1 + meta["model_config"]["norm_num_groups"]
    assert decode_job._metadata_problems(meta, model) == ["model config differs (norm_num_groups)"]
