"""CPU encoding in cache-sized passes on single-threaded streams: the arithmetic, the cache probe,
the per-thread torch settings, and that none of it changes the tokens."""

import threading

import numpy as np
import pytest
import torch

from tinymodel import tiny_model
from vqpipe.encode.cpu_passes import (FALLBACK_CACHE_BYTES, Streams, cache_per_stream, cpu_micro_batch,
                               last_level_cache)
from vqpipe.encode.encoder import TokenEncoder

MiB = 2**20


@pytest.mark.parametrize("batch, channels, size, cache, expected", [
    (16, 32, 128, 32 * MiB, 4),    # demo at 128 px: 6 MiB per image, room for 5 -> 4 passes of 4
    (64, 32, 128, 32 * MiB, 5),    # room for 5 -> 13 passes, cut evenly: 5 (last one 4)
    (3, 32, 128, 32 * MiB, 3),     # the batch already fits
    (16, 32, 128, 16 * MiB, 2),    # half the cache (two streams sharing it)
    (16, 32, 256, 32 * MiB, 1),    # 24 MiB per image: one at a time
    (64, 128, 256, 32 * MiB, 1),   # LDM-f4 at 256 px does not fit even alone: still 1
    (16, 32, 128, 256 * MiB, 16),  # a big cache takes the whole batch
])
def test_passes_fit_the_cache(batch, channels, size, cache, expected):
    assert cpu_micro_batch(batch, channels, size, size, cache) == expected


def test_streams_split_the_cache_they_share():
    assert cache_per_stream(1, (32 * MiB, 8)) == 32 * MiB
    assert cache_per_stream(4, (32 * MiB, 8)) == 8 * MiB
    assert cache_per_stream(64, (32 * MiB, 8)) == 4 * MiB  # 8 per L3, the others under other L3s


def test_cache_read_from_sysfs_layout(tmp_path):
    for name, size, cpus in [("index0", "32K", "0"), ("index2", "512K", "0"), ("index3", "32768K", "0-3,8-11")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
        (tmp_path / name / "shared_cpu_list").write_text(cpus + "\n")
    (tmp_path / "index1").mkdir()  # no files: ignored, not fatal
    assert last_level_cache(tmp_path) == (32 * MiB, 8)
    assert last_level_cache(tmp_path / "missing") == (FALLBACK_CACHE_BYTES, 1)
    size, sharing = last_level_cache()  # this machine's, whatever it is
    assert size >= 2**16 and sharing >= 1


def test_streams_run_single_threaded_and_leave_the_caller_alone():
    before = torch.get_num_threads()
    streams = Streams(2)
    try:
        assert streams.single_threaded
        assert torch.get_num_threads() == before
        seen = streams.map(lambda i: (i, torch.get_num_threads(), torch.is_inference_mode_enabled(),
                                      threading.current_thread().name), range(6))
        assert [s[0] for s in seen] == list(range(6))  # in order
        assert all(s[1] == 1 and s[2] for s in seen)
        assert all(s[3].startswith("vqpipe-encode") for s in seen)
        # a thread started afterwards gets the process default, not the streams' 1
        other = []
        t = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert other == [before]
    finally:
        streams.close()




@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("compile, streams", [(False, 1), (False, 2), (True, "auto")])
def test_passes_give_the_same_tokens_as_one_batch(model, compile, streams):
    pixels = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    whole = TokenEncoder(model, torch.device("cpu"), "fp32", False, 8, (-1.0, 1.0), micro_batch=8, streams=1)
    split = TokenEncoder(model, torch.device("cpu"), "fp32", compile, 8, (-1.0, 1.0), micro_batch=3,
                         streams=streams)
    assert split.pass_size(32, 32) == 3 and whole.pass_size(32, 32) == 8
    assert split.streams == (1 if compile else streams)  # compiled graphs stay on one thread
    ours, reference = split(pixels), whole(pixels)  # 7 images -> passes of 3, 3 and 1 (padded if compiled)
    np.testing.assert_array_equal(ours.codes, reference.codes)
    np.testing.assert_allclose(ours.latents, reference.latents, rtol=1e-4, atol=1e-5)


def test_auto_passes_are_cache_sized_on_cpu(model):
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, 16, (-1.0, 1.0), streams=2)
    # One 128 px image's live first-stage activations: 3 x 32 channels x 128 x 128 x 4 bytes = 6 MiB.
    encoder._cache = (24 * 2**20, 2)  # 24 MiB shared by both streams: 12 MiB each, room for 2
    assert encoder.pass_size(128, 128) == 2
    encoder._cache = (40 * 2**20, 1)  # a cache per stream: room for 6 -> 3 equal passes of 6 (not 6+6+4)
    assert encoder.pass_size(128, 128) == 6
    assert encoder.pass_size(8, 8) == 16  # tiny images: one pass
    capped = TokenEncoder(model, torch.device("cpu"), "fp32", False, 4, (-1.0, 1.0), micro_batch=32)
    assert capped.pass_size(8, 8) == 4  # never more than the batch


def test_auto_streams_follow_the_callers_threads_and_are_kept(model):
    before = torch.get_num_threads()
    pixels = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, 8, (-1.0, 1.0), micro_batch=2)
    try:
        torch.set_num_threads(2)
        first = encoder(pixels)
        pool = encoder._streams
        assert pool is not None and pool.streams == 2
        second = encoder(pixels)  # the stream threads (1 torch thread each) must not rebuild the pool
        assert encoder._streams is pool
        np.testing.assert_array_equal(first.codes, second.codes)
        torch.set_num_threads(1)
        assert encoder.streams == 1  # one thread given: the passes run on the caller
    finally:
        torch.set_num_threads(before)


def test_describe_says_how_a_batch_runs(model):
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, 8, (-1.0, 1.0), micro_batch=2, streams=2)
    assert encoder.describe(32) == "batch 8 in passes of 2 on 2 single-threaded streams"
    whole = TokenEncoder(model, torch.device("cpu"), "fp32", False, 8, (-1.0, 1.0), micro_batch=8, streams=1)
    assert whole.describe(32) == "batch 8 in one pass"
