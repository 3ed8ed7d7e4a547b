"""`vqpipe.ray_data` on a real local Ray Data pipeline: `read_webdataset` -> `map_batches(Tokenize)` ->
`write_parquet`, checked against `vqpipe run` on the same shards; `read_tokens` back as tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import shardfactory as sf
from runfiles import make_shards, write_config
from vqpipe import cli
from vqpipe.read.dataset import TokenDataset
from vqpipe.read.tokens import codes_array, latents_array, read_tokens, token_metadata

RESOLUTION = 32  # runfiles.write_config's: the tiny model gives 16x16 codes, 4x16x16 latents


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_model_path, ray_cluster) -> dict:
    """2 shards of 4 good samples and 1 imageless one, a third with a damaged JPEG beside a good
    one, and `vqpipe run`'s output for all three."""
    tmp = tmp_path_factory.mktemp("ray-data")
    make_shards(tmp / "in", 2, per_shard=4)
    sf.write_tar(tmp / "in" / "shard-00002.tar",
                 sf.good_members("002000", name="rocket") + [("002001.jpg", sf.jpeg_bytes(sf.photo())[:300])])
    urls = sorted(str(p) for p in (tmp / "in").glob("*.tar"))
    config = write_config(tmp, tiny_model_path, str(tmp / "in" / "shard-*.tar"), tmp / "run")
    assert cli.main(["run", str(config)]) == 0
    return {"tmp": tmp, "urls": urls, "run": tmp / "run", "model": tiny_model_path}


def tokenize(shards: dict, out: Path) -> tuple[Path, Path]:
    import ray.data

    from vqpipe.ray_data import Tokenize, drop_failures, only_failures

    ds = ray.data.read_webdataset(shards["urls"], decoder=None)
    tokens = ds.map_batches(Tokenize, fn_constructor_kwargs={"model": shards["model"], "resolution": RESOLUTION,
                                                             "batch_size": 2},
                            compute=ray.data.ActorPoolStrategy(size=1), num_gpus=1, batch_size=3).materialize()
    tokens.map_batches(drop_failures, batch_format="pyarrow").write_parquet(str(out / "tokens"))
    tokens.map_batches(only_failures, batch_format="pyarrow").write_parquet(str(out / "failures"))
    return out / "tokens", out / "failures"


def run_failures(run: Path) -> dict[str, int]:
    import json

    counts: dict[str, int] = {}
    for marker in (run / "_vqpipe" / "shards").glob("*.json"):
        for reason, n in json.loads(marker.read_text())["failures_by_reason"].items():
            counts[reason] = counts.get(reason, 0) + n
    return counts


def test_pipeline_matches_vqpipe_run(shards, tmp_path):
    tokens, failures = tokenize(shards, tmp_path)
    ours = read_tokens(str(tokens), columns=["key", "codes", "latents", "caption", "width"])
    theirs = read_tokens(str(shards["run"]), columns=["key", "codes", "latents", "caption", "width"])
    failed = pq.read_table(failures)
    assert ours.num_rows == theirs.num_rows == 9
    assert ours.num_rows + failed.num_rows == 9 + 3  # every sample read is a token row or a failure row
    reasons = failed.column("reason").to_pylist()
    assert {r: reasons.count(r) for r in set(reasons)} == run_failures(shards["run"]) == {"no_image": 2,
                                                                                       "decode_error": 1}
    ours = ours.take(np.argsort(ours.column("key").to_pylist()))
    theirs = theirs.take(np.argsort(theirs.column("key").to_pylist()))
    assert ours.column("key").equals(theirs.column("key")) and ours.column("caption").equals(theirs.column("caption"))
    np.testing.assert_array_equal(codes_array(ours), codes_array(theirs))
    np.testing.assert_array_equal(latents_array(ours), latents_array(theirs))
    assert token_metadata(str(tokens))["weights_sha256"] == token_metadata(str(shards["run"]))["weights_sha256"]
    rows = list(TokenDataset(str(tokens)))
    assert len(rows) == 9 and rows[0]["codes"].shape == (16, 16) and rows[0]["latents"].shape == (4, 16, 16)


def test_read_tokens_gives_tensors(shards):
    from vqpipe.ray_data import read_tokens as ray_read_tokens

    ds = ray_read_tokens(str(shards["run"]), columns=["key", "codes", "latents"])
    batch = ds.take_batch(4, batch_format="numpy")
    assert batch["codes"].shape == (4, 16, 16) and batch["codes"].dtype == np.uint16
    assert batch["latents"].shape == (4, 4, 16, 16) and batch["latents"].dtype == np.float16
    seen = 0
    tensors = ray_read_tokens(str(shards["run"]), columns=["codes", "latents"])  # torch batches: tensor columns only
    for batch in tensors.iter_torch_batches(batch_size=4, dtypes={"codes": torch.int64, "latents": torch.float32}):
        assert batch["codes"].dtype == torch.int64 and tuple(batch["codes"].shape[1:]) == (16, 16)
        assert tuple(batch["latents"].shape[1:]) == (4, 16, 16)
        seen += len(batch["codes"])
    assert seen == 9


def test_read_images_input(shards, tmp_path):
    import ray.data

    from vqpipe.ray_data import Tokenize

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("chelsea", "coffee", "rocket"):
        sf.photo(name, (64, 48)).save(folder / f"{name}.png")
    ds = ray.data.read_images(str(folder), include_paths=True, mode="RGB")
    rows = ds.map_batches(Tokenize, fn_constructor_kwargs={"model": shards["model"], "resolution": RESOLUTION},
                          compute=ray.data.ActorPoolStrategy(size=1), batch_size=2).take_all()
    assert sorted(r["key"] for r in rows) == ["chelsea", "coffee", "rocket"]
    assert all(r["reason"] is None and np.asarray(r["codes"]).shape == (16, 16) for r in rows)
    assert {(r["width"], r["height"]) for r in rows} == {(64, 48)}


def test_readme_reading_snippet_runs(shards):
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Inside a Ray Data pipeline"):]
    section = section[: section.index("\n## ", 1)]
    snippets = [s for s in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "out/demo" in s]
    assert snippets
    for code in snippets:
        namespace: dict = {}
        exec(compile(code.replace("out/demo", str(shards["run"])), "README Ray Data snippet", "exec"), namespace)
        assert namespace["batch"]["codes"].shape == (4, 16, 16)
        assert namespace["codes"].dtype == torch.int64 and tuple(namespace["codes"].shape[1:]) == (16, 16)
