"""CPU forward passes sized to the cache: the arithmetic, the cache probe, and that splitting a
batch into passes changes nothing but speed."""

import numpy as np
import pytest
import torch

from vqpipe import VQModel
from vqpipe.encode import TokenEncoder
from vqpipe.micro_batch import FALLBACK_CACHE_BYTES, cpu_micro_batch, last_level_cache_bytes

MiB = 2**20


@pytest.mark.parametrize("batch, channels, size, cache, expected", [
    (16, 32, 128, 32 * MiB, 4),    # demo at 128 px: 6 MiB per image, room for 5 -> 4 passes of 4
    (64, 32, 128, 32 * MiB, 5),    # room for 5 -> 13 passes, cut evenly: 5 (last one 4)
    (3, 32, 128, 32 * MiB, 3),     # the batch already fits
    (16, 32, 256, 32 * MiB, 1),    # 24 MiB per image: one at a time
    (64, 128, 256, 32 * MiB, 1),   # LDM-f4 at 256 px does not fit even alone: still 1
    (16, 32, 128, 256 * MiB, 16),  # a big cache takes the whole batch
])
def test_passes_fit_the_cache(batch, channels, size, cache, expected):
    assert cpu_micro_batch(batch, channels, size, size, cache) == expected


def test_cache_size_read_from_sysfs_layout(tmp_path):
    for name, size in [("index0", "32K"), ("index2", "512K"), ("index3", "32768K")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    (tmp_path / "index1").mkdir()  # no size file: ignored, not fatal
    assert last_level_cache_bytes(tmp_path) == 32 * MiB
    assert last_level_cache_bytes(tmp_path / "missing") == FALLBACK_CACHE_BYTES
    assert last_level_cache_bytes() >= 2**16  # this machine's, whatever it is


CONFIG = dict(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, num_vq_embeddings=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VQModel(**CONFIG).eval()


@pytest.mark.parametrize("compile", [False, True])
def test_passes_give_the_same_tokens_as_one_batch(model, compile):
    pixels = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    whole = TokenEncoder(model, torch.device("cpu"), "fp32", False, 8, (-1.0, 1.0), micro_batch=8)
    split = TokenEncoder(model, torch.device("cpu"), "fp32", compile, 8, (-1.0, 1.0), micro_batch=3)
    assert split.forward_batch(32, 32) == 3 and whole.forward_batch(32, 32) == 8
    ours, reference = split(pixels), whole(pixels)  # 7 images -> passes of 3, 3 and 1 (padded if compiled)
    np.testing.assert_array_equal(ours.codes, reference.codes)
    np.testing.assert_allclose(ours.latents, reference.latents, rtol=1e-4, atol=1e-5)


def test_auto_is_cache_sized_on_cpu(model):
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, 16, (-1.0, 1.0))
    assert encoder.forward_batch(128, 128) == cpu_micro_batch(16, 32, 128, 128)
    assert encoder.forward_batch(8, 8) == 16  # tiny images: one pass
    capped = TokenEncoder(model, torch.device("cpu"), "fp32", False, 4, (-1.0, 1.0), micro_batch=32)
    assert capped.forward_batch(8, 8) == 4  # never more than the batch
