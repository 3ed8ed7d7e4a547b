"""`vqpipe inspect`: every figure checked against NumPy on the same Parquet files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from runfiles import make_shards, write_config
from vqpipe import cli
from vqpipe.output import sink
from vqpipe.output.arrays import fixed_list_to_numpy
from vqpipe.output.sink import ShardWriter, TokenLayout
from vqpipe.read.inspect import ChannelMoments, inspect_output, perplexity


@pytest.fixture(scope="module")
def run_output(tmp_path_factory, tiny_model_path, ray_cluster) -> Path:
    """A real `vqpipe run` output: 2 shards of 5 good samples and 1 imageless sample each, and a
    third shard URL with no file behind it (a failed shard)."""
    tmp = tmp_path_factory.mktemp("inspect")
    make_shards(tmp / "in", 2)
    out = tmp / "out"
    config = write_config(tmp, tiny_model_path, str(tmp / "in" / "shard-{00000..00002}.tar"), out,
                          ray={"max_retries": 1, "num_workers": 1})
    assert cli.main(["run", str(config)]) == 1  # the missing shard fails the run
    return out


def numpy_figures(out: Path) -> dict:
    tables = [pq.read_table(f) for f in sorted(out.glob("*.parquet"))]
    codes = np.concatenate([fixed_list_to_numpy(t.column("codes")) for t in tables]).astype(np.int64)
    latents = np.concatenate([fixed_list_to_numpy(t.column("latents")) for t in tables]).astype(np.float64)
    counts = np.bincount(codes.ravel(), minlength=64)
    p = counts[counts > 0] / counts.sum()
    return {"rows": sum(t.num_rows for t in tables), "counts": counts,
            "perplexity": float(np.exp(-(p * np.log(p)).sum())), "mean": latents.mean(axis=(0, 2, 3)),
            "std": latents.std(axis=(0, 2, 3)), "overall_std": latents.std(),
            "bytes": sum(f.stat().st_size for f in out.glob("*.parquet"))}


def test_figures_match_numpy(run_output):
    stats = inspect_output(str(run_output))
    expected = numpy_figures(run_output)
    assert stats.rows == expected["rows"] == 10
    assert stats.shards.committed == 2 and stats.shards.data_files == 2 and stats.shards.without_marker == 0
    assert [(Path(f.source).stem, f.reason) for f in stats.shards.failed] == [("shard-00002", "missing_shard")]
    assert stats.problems == []
    assert stats.shards.failed_samples_by_reason == {"no_image": 2}
    assert stats.bytes_per_sample == pytest.approx(expected["bytes"] / 10)
    counts = expected["counts"]
    codes = stats.codes
    assert codes.codebook_size == 64 and codes.used == np.count_nonzero(counts) and codes.dead == 64 - codes.used
    assert codes.perplexity == pytest.approx(expected["perplexity"], rel=1e-12)
    assert [n for _, n in codes.top] == [n for n in sorted(counts, reverse=True)[:10] if n]  # unused codes are no "top"
    assert all(counts[c] == n for c, n in codes.top) and codes.out_of_range == 0
    latents = stats.latents
    assert latents.shape == [4, 16, 16] and latents.dtype == "float16"
    np.testing.assert_allclose(latents.mean, expected["mean"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(latents.std, expected["std"], rtol=1e-10)
    assert latents.overall_std == pytest.approx(expected["overall_std"], rel=1e-10)
    meta = json.loads(pq.read_schema(next(run_output.glob("*.parquet"))).metadata[b"vqpipe"])
    assert latents.unit_variance_scaling_factor == pytest.approx(meta["scaling_factor"] / expected["overall_std"])


def test_cli_text_and_json(run_output, capsys):
    assert cli.main(["inspect", str(run_output)]) == 0
    text = capsys.readouterr().out
    for words in ("shards: 2 committed, 1 failed (missing_shard 1)",
                  "failed shard-00002-", "(missing_shard): ShardError: missing_shard", "rows: 10",
                  "failed samples: no_image 2", "bytes per sample", "perplexity", "scaling_factor for unit variance"):
        assert words in text
    assert cli.main(["inspect", str(run_output), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    stats = inspect_output(str(run_output))
    assert data["rows"] == 10 and data["shards"]["failed_by_reason"] == {"missing_shard": 1}
    assert data["codes"]["perplexity"] == pytest.approx(stats.codes.perplexity)
    assert data["latents"]["std"] == pytest.approx(stats.latents.std)


LAYOUT = TokenLayout(codes_shape=(2, 2), latent_shape=(3, 2, 2), codebook_size=16)


def write_synthetic(url: str, write_codes: bool, write_latents: bool, rows: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """One shard whose codes use only 0..9 and whose latents have a large mean against their spread
    (the case a naive sum of squares gets wrong), in row groups of 8."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 10, size=(rows, 2, 2))
    latents = (300 + rng.standard_normal((rows, 3, 2, 2)) * [[[0.5]], [[1.0]], [[2.0]]]).astype(np.float16)
    layout = TokenLayout(LAYOUT.codes_shape, LAYOUT.latent_shape, LAYOUT.codebook_size, write_codes, write_latents)
    meta = {"num_vq_embeddings": 16, "latent_shape": [3, 2, 2], "latent_dtype": "float16", "scaling_factor": 0.5}
    writer = ShardWriter(url, "shard-00000", layout, meta, {})
    writer.write([f"k{i}" for i in range(rows)], ["in.tar"] * rows, codes, latents, [None] * rows, [None] * rows,
                 np.ones(rows), np.ones(rows))
    writer.commit({"failures_by_reason": {"decode_error": 1}})
    return codes, latents.astype(np.float64)


@pytest.mark.parametrize("write_codes, write_latents", [(True, False), (False, True)], ids=["codes", "latents"])
def test_codes_only_and_latents_only(tmp_path, monkeypatch, capsys, write_codes, write_latents):
    monkeypatch.setattr(sink, "ROW_GROUP_ROWS", 8)
    url = f"memory://inspect-{tmp_path.name}"  # any fsspec store
    codes, latents = write_synthetic(url, write_codes, write_latents)
    stats = inspect_output(url)
    assert stats.rows == 50 and stats.shards.failed_samples_by_reason == {"decode_error": 1}
    if write_codes:
        assert stats.latents is None and stats.codes.used == 10 and stats.codes.dead == 6
        assert stats.codes.perplexity == pytest.approx(perplexity(np.bincount(codes.ravel())))
    else:
        assert stats.codes is None
        np.testing.assert_allclose(stats.latents.mean, latents.mean(axis=(0, 2, 3)), rtol=1e-12)
        np.testing.assert_allclose(stats.latents.std, latents.std(axis=(0, 2, 3)), rtol=1e-9)
        assert stats.latents.unit_variance_scaling_factor == pytest.approx(0.5 / latents.std(), rel=1e-9)
    assert cli.main(["inspect", url]) == 0
    text = capsys.readouterr().out
    assert ("codebook:" in text) == write_codes and ("latents (" in text) == write_latents


def test_moments_merge_matches_numpy_in_any_split():
    rng = np.random.default_rng(1)
    x = 1000 + rng.standard_normal((37, 2, 3, 3))
    moments = ChannelMoments(2)
    for part in np.array_split(x, [1, 2, 20]):
        moments.add(part)
    np.testing.assert_allclose(moments.mean, x.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(np.sqrt(moments.m2 / moments.n), x.std(axis=(0, 2, 3)), rtol=1e-9)
    assert moments.overall()[1] == pytest.approx(x.std(), rel=1e-9)
    assert perplexity(np.array([5, 5, 5, 5, 0])) == pytest.approx(4.0) and perplexity(np.zeros(3)) == 0.0
    assert math.isnan(ChannelMoments(2).overall()[1])


@pytest.mark.parametrize("argv, words", [
    (["inspect", "/nonexistent/vqpipe-out"], "no vqpipe output here"),
    (["inspect", "/tmp", "--storage-options", "{nope"], "not valid JSON"),
    (["inspect", "/tmp", "--storage-options", "[1]"], "must be a JSON object"),
])
def test_usage_errors_exit_2(argv, words, capsys):
    assert cli.main(argv) == 2
    assert words in capsys.readouterr().err
