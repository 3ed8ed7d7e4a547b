"""The fidelity audit: every shard's marker says how far its codes are from the model's fp32 ones,
and the figure is honest (an independent fp32 run on the same keys agrees with it)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import shardfactory as sf
from runfiles import PHOTOS
from vqpipe import faults
from vqpipe.config import InputConfig, ModelConfig, OutputConfig, PreprocessConfig
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.encode.fidelity import guard_verdict, summarize, summary_lines
from vqpipe.model.loading import load_model
from vqpipe.output.arrays import fixed_list_to_numpy
from vqpipe.output.sink import read_marker
from vqpipe.run.shard_job import make_settings, process_shard

RESOLUTION = 64  # the demo tokenizer is convolutional: 16x16 codes here, quick on a CPU


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """Two shards of real photos, each photo cropped differently by its own size."""
    folder = tmp_path_factory.mktemp("audit-in")
    urls = []
    for s in range(2):
        members = []
        for i in range(6):
            image = sf.photo(PHOTOS[(s + i) % len(PHOTOS)], (96 + 16 * i, 80 + 8 * s))
            members.append((f"{s}{i:03d}.jpg", sf.jpeg_bytes(image)))
        urls.append(str(sf.write_tar(folder / f"a-{s}.tar", members)))
    return urls


def _run(model_path, shards, out, precision, pool, audit_samples=3, **output):
    model = load_model(ModelConfig(path=model_path))
    encoder = TokenEncoder(model, torch.device("cpu"), precision, False, 4, (-1.0, 1.0))
    job = make_settings(InputConfig(urls=tuple(shards)), PreprocessConfig(resolution=RESOLUTION),
                        OutputConfig(path=str(out), **output), model, encoder.precision, audit_samples)
    return [process_shard(url, f"a-{i}", job, encoder, pool) for i, url in enumerate(shards)]


def _codes(out, stem) -> dict[str, np.ndarray]:
    table = pq.read_table(out / f"{stem}.parquet", columns=["key", "codes"])
    return dict(zip(table.column("key").to_pylist(), fixed_list_to_numpy(table.column("codes"))))


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, shards, pool):
    out = tmp_path_factory.mktemp("audit-fp32")
    return out, _run("demo", shards, out, "fp32", pool)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_recorded_agreement_matches_an_independent_fp32_run(tmp_path, shards, pool, fp32_run, amp):
    out32, results32 = fp32_run
    results = _run("demo", shards, tmp_path, amp, pool, latent_dtype="float16")
    for result in results:
        audit = read_marker(str(tmp_path), result.stem, {})["audit"]
        assert audit == result.audit and audit["precision"] == amp and audit["samples"] == 3
        ours, theirs = _codes(tmp_path, result.stem), _codes(out32, result.stem)
        assert set(audit["keys"]) <= set(ours)
        independent = np.mean([np.mean(ours[k] == theirs[k]) for k in audit["keys"]])
        assert abs(audit["code_agreement"] - independent) <= 0.01
        assert 0.5 < audit["code_agreement"] <= 1.0
        assert 0 <= audit["latent_mean_rel_err"] <= audit["latent_max_rel_err"] < 1
        assert 0.5 < audit["stored_code_agreement"] <= 1.0
        # The reconstruction of the stored codes, against the very pixels the model was given.
        assert 15 < audit["psnr_db"]["min"] <= audit["psnr_db"]["mean"] < 60
        assert result.times.audit_s > 0
    for result in results32:
        assert result.audit["skipped"].startswith("precision is fp32") and result.audit["precision"] == "fp32"


def test_the_same_shard_audits_the_same_keys(tmp_path, tiny_model_path, shards, pool):
    first = _run(tiny_model_path, shards[:1], tmp_path / "a", "bf16", pool, audit_samples=2)
    again = _run(tiny_model_path, shards[:1], tmp_path / "b", "bf16", pool, audit_samples=2, latent_dtype="float32")
    assert first[0].audit["keys"] == again[0].audit["keys"] and len(first[0].audit["keys"]) == 2
    assert "stored_code_agreement" in first[0].audit  # latents stored as float16 (the default)
    assert "stored_code_agreement" not in again[0].audit


def test_audit_off_and_more_samples_than_the_shard_has(tmp_path, tiny_model_path, shards, pool):
    off = _run(tiny_model_path, shards[:1], tmp_path / "off", "bf16", pool, audit_samples=0)
    assert off[0].audit == {"precision": "bf16", "samples": 0, "skipped": "model.audit_samples is 0"}
    assert off[0].times.audit_s == 0
    every = _run(tiny_model_path, shards[:1], tmp_path / "all", "bf16", pool, audit_samples=50)
    assert every[0].audit["samples"] == every[0].rows == 6


def test_a_precision_fallback_is_in_the_marker(tmp_path, tiny_model_path, shards, pool, monkeypatch):
    monkeypatch.setenv(faults.ENV, json.dumps([{"action": "non_finite", "precision": "fp16"}]))
    results = _run(tiny_model_path, shards, tmp_path, "fp16", pool)
    first, second = (read_marker(str(tmp_path), r.stem, {}) for r in results)
    # 6 images in batches of 4: two redone batches in the first shard, the third switches.
    assert first["amp_fallback_batches"] == 2 and first["precision_switches"] == []
    assert second["precision_switches"] == [{"from": "fp16", "to": "bf16", "after_non_finite_batches": 3}]
    assert second["precision"] == "bf16" and second["amp_fallback_batches"] == 1
    assert first["audit"]["skipped"].startswith("precision is fp32")  # every audited code came from the redo
    meta = json.loads(pq.read_schema(tmp_path / "a-1.parquet").metadata[b"vqpipe"])
    assert meta["precision"] == "fp16"  # the shard began in fp16; its marker tells the rest


def test_summary_min_median_and_the_shards_under_the_floor():
    def audit(agreement, psnr):
        return {"precision": "bf16", "samples": 4, "keys": [], "code_agreement": agreement,
                "latent_max_rel_err": 0.01, "latent_mean_rel_err": 0.001, "psnr_db": {"mean": psnr, "min": psnr - 1}}
    audits = [("s0", audit(0.99, 30.0)), ("s1", audit(0.95, 25.0)), ("s2", audit(0.98, 28.0)),
              ("s3", {"precision": "fp32", "samples": 0, "skipped": "precision is fp32"})]
    summary = summarize(audits, 0.97)
    assert summary["shards_audited"] == 3 and summary["skipped"] == {"precision is fp32": 1}
    assert summary["code_agreement"] == {"min": 0.95, "median": 0.98}
    assert summary["psnr_db"] == {"min": 24.0, "median": 28.0}
    assert summary["below_min_code_agreement"] == ["s1"]
    text = "\n".join(summary_lines(summary))
    assert "codes agree min 95.00%, median 98.00%" in text and "PSNR: min 24.00 dB" in text
    assert "1 shard(s) below model.min_code_agreement 97.00%: s1" in text and "not audited: precision is fp32 (1)" in text


def test_guard_verdict_names_the_precision_and_the_fix():
    low = {"precision": "bf16", "code_agreement": 0.93}
    message = guard_verdict([low, low, {"precision": "fp32", "samples": 0, "skipped": "x"}], 0.97)
    assert "bf16" in message and "93.00%" in message and "model.precision=fp16" in message
    assert guard_verdict([low], 0.9) is None and guard_verdict([low], 0) is None
    assert guard_verdict([None, {"skipped": "precision is fp32"}], 0.97) is None


@pytest.mark.usefixtures("ray_cluster")
def test_run_reports_the_audits_in_summary_manifest_and_inspect(tmp_path, capsys):
    from runfiles import make_shards, write_config
    from vqpipe import cli

    make_shards(tmp_path / "in", 3, per_shard=4)
    out = tmp_path / "out"
    config = write_config(tmp_path, "demo", str(tmp_path / "in" / "shard-*.tar"), out)
    assert cli.main(["run", str(config), "model.precision=fp16", "model.audit_samples=2",
                     "model.min_code_agreement=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "fidelity audit (3 shards, fp16 vs fp32): codes agree min" in printed
    totals = json.loads((out / "_vqpipe" / "run.json").read_text())["totals"]
    fidelity = totals["fidelity"]
    assert fidelity["shards_audited"] == 3 and fidelity["precision"] == ["fp16"]
    assert 0.5 < fidelity["code_agreement"]["min"] <= fidelity["code_agreement"]["median"] <= 1
    assert fidelity["below_min_code_agreement"] == [] and totals["stage_times_s"]["audit_s"] > 0
    assert cli.main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)["fidelity"]
    assert inspected["code_agreement"] == fidelity["code_agreement"] and inspected["min_code_agreement"] == 0.5


@pytest.mark.usefixtures("ray_cluster")
def test_guard_stops_a_run_whose_audits_fall_under_the_floor(tmp_path, capsys):
    from runfiles import make_shards, write_config
    from vqpipe import cli

    make_shards(tmp_path / "in", 4, per_shard=3)
    out = tmp_path / "out"
    # bf16 keeps ~94% of the demo tokenizer's codes (see the README's fidelity table): under the floor.
    config = write_config(tmp_path, "demo", str(tmp_path / "in" / "shard-*.tar"), out,
                          ray={"guard_shards": 2, "num_workers": 1})
    assert cli.main(["run", str(config), "model.precision=bf16", "model.audit_samples=2",
                     "model.min_code_agreement=0.99"]) == 1
    err = capsys.readouterr().err
    assert "fidelity audit of the first 2 shards" in err and "bf16 codes" in err
    assert "Likely fix: set model.precision=fp16" in err
    assert json.loads((out / "_vqpipe" / "run.json").read_text())["status"] == "aborted"
