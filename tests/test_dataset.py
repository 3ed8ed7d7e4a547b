"""TokenDataset: every row exactly once across ranks x DataLoader workers, streamed by row group,
with values recomputable from the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vqpipe.output import sink
from vqpipe.read.dataset import TokenDataset, shuffled
from vqpipe.output.sink import ShardWriter, TokenLayout

LAYOUT = TokenLayout(codes_shape=(2, 3), latent_shape=(2, 2, 3), codebook_size=50, write_latents=True)
ROWS_PER_FILE = 10


def expected_codes(i: int) -> np.ndarray:
    return (i + np.arange(6).reshape(2, 3)) % LAYOUT.codebook_size


def expected_latents(i: int) -> np.ndarray:
    return (i / 8 + np.linspace(-1, 1, 12).reshape(2, 2, 3)).astype(np.float16).astype(np.float32)


def write_output(url: str, files: int) -> list[str]:
    """``files`` shards of ``ROWS_PER_FILE`` rows, key ``k{i}``; row groups of 4 rows (3 per file)."""
    keys = []
    for f in range(files):
        i = np.arange(f * ROWS_PER_FILE, (f + 1) * ROWS_PER_FILE)
        writer = ShardWriter(url, f"shard-{f:05d}", LAYOUT, {"num_vq_embeddings": 50}, {})
        writer.write([f"k{j}" for j in i], ["in.tar"] * len(i), np.stack([expected_codes(j) for j in i]),
                     np.stack([expected_latents(j) for j in i]), [f"c{j}" if j % 3 else None for j in i],
                     [None] * len(i), i, i)
        writer.commit({})
        keys += [f"k{j}" for j in i]
    return keys


@pytest.fixture(autouse=True)
def small_row_groups(monkeypatch):
    monkeypatch.setattr(sink, "ROW_GROUP_ROWS", 4)


def read_all(url: str, world_size: int = 2, workers: int = 2, **options) -> list[dict]:
    """Every rank's rows, each rank iterated through its own DataLoader, as the ranks of a job would."""
    rows = []
    for rank in range(world_size):
        dataset = TokenDataset(url, rank=rank, world_size=world_size, **options)
        for batch in DataLoader(dataset, batch_size=3, num_workers=workers):
            rows += [{name: batch[name][j] for name in batch} for j in range(len(batch["key"]))]
    return rows


@pytest.mark.parametrize("files", [3, 6], ids=["row-groups-split", "files-split"])
@pytest.mark.parametrize("shuffle_buffer", [0, 7])
def test_two_ranks_two_workers_yield_every_row_once(tmp_path, files, shuffle_buffer):
    keys = write_output(str(tmp_path / "out"), files)
    rows = read_all(str(tmp_path / "out"), shuffle_buffer=shuffle_buffer, seed=1)
    got = [r["key"] for r in rows]
    assert sorted(got) == sorted(keys) and len(got) == len(set(got))
    for row in rows:
        i = int(row["key"][1:])
        assert row["codes"].dtype == torch.int64 and row["latents"].dtype == torch.float32
        assert np.array_equal(row["codes"].numpy(), expected_codes(i))
        assert np.array_equal(row["latents"].numpy(), expected_latents(i))
        assert row["caption"] == (f"c{i}" if i % 3 else "")  # no caption -> "" so default_collate works


def test_split_units_are_disjoint_and_cover_the_output(tmp_path):
    write_output(str(tmp_path / "out"), 3)
    dataset = TokenDataset(str(tmp_path / "out"))
    units = [u for c in range(4) for u in dataset.units(c, 4)]
    assert len(units) == len(set(units)) == 3 * 3  # fewer files than consumers: row groups are dealt
    files = [u for c in range(2) for u in dataset.units(c, 2)]
    assert sorted(files) == sorted((f, None) for f in dataset.files)  # enough files: whole files


def test_shuffle_is_seeded_per_epoch(tmp_path):
    url = str(tmp_path / "out")
    write_output(url, 3)

    def order(epoch: int, seed: int = 0) -> list[str]:
        dataset = TokenDataset(url, columns=["key"], shuffle_buffer=8, seed=seed)
        dataset.set_epoch(epoch)
        return [row["key"] for row in dataset]

    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1))
    assert order(0, seed=5) != order(0)
    plain = [row["key"] for row in TokenDataset(url, columns=["key"])]
    assert plain == [f"k{i}" for i in range(30)]  # no buffer: file order, row order


def test_columns_choice_and_errors(tmp_path):
    url = str(tmp_path / "out")
    write_output(url, 1)
    row = next(iter(TokenDataset(url, columns=["key", "codes", "width"])))
    assert set(row) == {"key", "codes", "width"} and row["width"] == 0
    with pytest.raises(ValueError, match="no column 'pixels'"):
        TokenDataset(url, columns=["pixels"])
    with pytest.raises(ValueError, match="rank=2"):
        TokenDataset(url, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError):
        TokenDataset(str(tmp_path / "empty"))


def test_reads_any_fsspec_store(tmp_path):
    url = f"memory://tokens-{tmp_path.name}"
    keys = write_output(url, 2)
    assert sorted(row["key"] for row in TokenDataset(url, columns=["key"])) == sorted(keys)


def test_shuffle_buffer_is_a_permutation():
    rng = np.random.default_rng(0)
    out = list(shuffled(iter(range(100)), 10, rng))
    assert sorted(out) == list(range(100)) and out != list(range(100))
