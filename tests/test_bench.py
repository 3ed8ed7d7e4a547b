"""``vqpipe bench``: a table on the terminal and one JSON line per run in the history file, with
positive figures, on the demo config's shards (a tiny model keeps it fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vqpipe.bench.cli import main
from vqpipe.bench.report import peak_device
from vqpipe.bench.null_model import null_encoder
from vqpipe.config import load_config
from vqpipe.model.loading import load_model, pick_device

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("img_s", "fp32_eager_img_s", "flops_per_image", "achieved_tflops")


@pytest.fixture
def argv(tiny_model_path, tmp_path, monkeypatch) -> list[str]:
    monkeypatch.chdir(REPO)  # configs/demo.yaml names its shards relative to the repository
    return ["configs/demo.yaml", f"model.path={tiny_model_path}", "model.batch_size=4",
            "preprocess.resolution=64", "--samples", "6",
            "--repeats", "1", "--json", str(tmp_path / "history" / "bench.jsonl")]


def test_bench_prints_the_table_and_appends_one_line_per_run(argv, tmp_path, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for row in ("| model ceiling (fp32, eager", "| decode, per core", "| decode, per core, Pillow path only",
                "| pipeline (process_shard", "| efficiency"):
        assert row in out
    assert "bottleneck: " in out and "GFLOP/img" in out
    assert "codes agree with fp32 on 100.00%" in out  # fp32 on a CPU: the model's own codes
    # Torch on every core: the "all cores" rows are then skipped (and the run is quicker).
    assert main(argv + ["--jpeg-size", "96x64", "--jpeg-quality", "95",
                        "--torch-threads", str(len(os.sched_getaffinity(0)))]) == 0
    out = capsys.readouterr().out
    assert "re-encoded as 96x64 JPEG q95" in out and "torch on all" not in out

    lines = (tmp_path / "history" / "bench.jsonl").read_text().splitlines()
    assert len(lines) == 2
    record = json.loads(lines[0])
    assert record["config"] == "configs/demo.yaml" and record["overrides"][0].startswith("model.path=")
    assert record["setup"]["device"] == "cpu" and record["setup"]["resolution"] == 64
    assert record["setup"]["batch_size"] == 4 and record["setup"]["samples"] == 6
    assert all(record["model"][k] > 0 for k in FIGURES)
    assert record["decode_img_s_per_core"] > 0 and record["decode_pillow_img_s_per_core"] > 0
    assert record["pipeline"]["img_s"] > 0
    assert record["pipeline"]["rows"] == 6  # every sample of the scratch shard written
    assert record["efficiency"] > 0 and record["bottleneck"] in ("model", "decode")
    assert record["advice"] and record["peak_rss_mb"] > 0
    assert record["model"]["code_agreement"] == 1.0 and record["precisions"] == []  # CPU: no extra precisions


def test_bench_prints_the_agreement_of_an_amp_precision(argv, capsys):
    assert main(argv[:4] + ["model.precision=bf16"] + argv[4:]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| model ceiling (bf16"))
    share = float(row.split("codes agree with fp32 on ")[1].split("%")[0])
    assert 50 < share <= 100


def test_null_model_runs_the_pipeline_without_the_model(argv, capsys):
    assert main(argv + ["--null-model"]) == 0
    out = capsys.readouterr().out
    assert "--null-model" in out and "| rows written | 6 |" in out  # every sample through to Parquet
    figures = {line.split(" | ")[0].strip("| "): line.rsplit("|", 2)[1].strip() for line in out.splitlines()
               if line.startswith("| ") and not line.startswith("| figure")}
    for name in ("pipeline, model replaced by zeros (img/s)", "img/s per decode thread",
                 "CPU ms per image: main thread (batching, upload, handing rows over)",
                 "CPU ms per image: shard-reading thread (tar parsing)", "CPU ms per image: decode threads, summed",
                 "CPU ms per image: the whole process", "one process's ceiling: its slowest single thread (img/s)",
                 "per-core decode ceiling, timed between the runs (img/s per CPU-second)",
                 "efficiency: pipeline / (ceiling x 2 decode thread(s))"):
        assert float(figures[name]) > 0, name
    # The threads' own CPU can never exceed the whole process's.
    parts = sum(float(v) for k, v in figures.items() if k.startswith("CPU ms per image:") and "whole" not in k)
    assert parts <= float(figures["CPU ms per image: the whole process"]) * 1.01


def test_decode_only_reports_both_paths(argv, capsys):
    assert main(argv + ["--decode-only", "--jpeg-size", "96x64"]) == 0
    out = capsys.readouterr().out
    assert "| Pillow path only (before) |" in out and "| with the JPEG fast path |" in out and "| speed-up |" in out


def test_null_encoder_returns_the_model_shapes(tiny_model_path):
    config = load_config(str(REPO / "configs/demo.yaml"), [f"model.path={tiny_model_path}", "model.batch_size=4",
                                                           "preprocess.resolution=64"])
    model = load_model(config.model)
    encoded = null_encoder(config, model, pick_device())(np.zeros((3, 64, 64, 3), np.uint8))
    side = 64 // model.config.downsample_factor
    assert encoded.codes.shape == (3, side, side) and encoded.codes.dtype == np.int64
    assert encoded.latents.shape == (3, model.config.embed_dim, side, side) and encoded.finite.all()


def test_bench_refuses_a_bad_jpeg_size_before_any_work(argv, capsys):
    assert main(argv + ["--jpeg-size", "512by384"]) == 2
    assert "--jpeg-size '512by384' is not WxH" in capsys.readouterr().err
    assert main(argv + ["--jpeg-quality", "0"]) == 2
    assert "--jpeg-quality 0 must be in 1..100" in capsys.readouterr().err


@pytest.mark.parametrize("name, key", [
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200"), ("NVIDIA L4", "L4"), ("NVIDIA A10G", "A10G"), ("NVIDIA L40S", None),
    ("Tesla T4", None),
])
def test_peak_table_matches_whole_device_words(name, key):
    assert peak_device(name) == key


def test_bench_module_does_not_import_ray():
    code = "import sys, vqpipe.bench.measure; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
