"""``preprocess.decoder: gpu`` (``vqpipe.input.device_decode``) on a CPU device: the path a GPU runs
(deferral on the decode threads, one batched decode, the per-image fallback, EXIF orientation,
the float resize, the slotting) with the stand-in decode where torchvision is absent, and with
torchvision's own ``decode_jpeg`` where it is installed.

Agreement figures (measured on this CPU with the stand-in; the test bounds carry margin):
- vs the CPU fast path, 5 photos x 7 sizes at 256 px: mean |diff| <= 0.56/255, max 17/255, >= 47.8 dB
  where the CPU path decodes at 1/2 or 1/4 DCT scale and the device at full size; mean <= 0.18/255,
  max 5/255, >= 55.7 dB where neither scales (the Pillow path: the same within 0.01);
- against a full-size decode resized with Lanczos: >= 45.8 dB on those photos (the CPU path: >= 41.9),
  and on the demo shards' 14 photos >= 45.1 dB at 256 px and >= 42.6 dB at 128 px, where the CPU
  path's 1/2 DCT scale scores 36.0 dB (and the two paths differ by up to 1.7/255 mean, 38.2 dB).
"""

from __future__ import annotations

import collections
import functools
import glob
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardfactory as sf
from test_jpeg_decode import PHOTOS, SIZES, fuzz_inputs, psnr, reference
from vqpipe.config import IMAGE_KEYS, ConfigError, InputConfig, ModelConfig, OutputConfig, PreprocessConfig
from vqpipe.encode.audit import AuditSampler
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.input.device_decode import DeviceDecoder, ModelInput, pick_backend
from vqpipe.input.images import preprocess
from vqpipe.input.shards import iter_samples
from vqpipe.model.loading import load_model
from vqpipe.output.arrays import fixed_list_to_numpy
from vqpipe.output.sink import read_marker
from vqpipe.records import Deferred, Failure, Preprocessed, Sample
from vqpipe.run.shard_job import make_settings, process_shard

R = 64
CPU = torch.device("cpu")
DEMO_SHARDS = sorted(glob.glob(str(Path(__file__).resolve().parents[1] / "vqpipe/assets/demo-shards/*.tar")))


def decoder(resolution: int = R, **cfg) -> DeviceDecoder:
    return DeviceDecoder(PreprocessConfig(resolution=resolution, decoder="gpu", **cfg), IMAGE_KEYS, CPU)


def cpu_path(sample: Sample, resolution: int = R, **cfg) -> Preprocessed | Failure:
    return preprocess(sample, resolution=resolution, **cfg)


def run(dec: DeviceDecoder, samples: list[Sample]) -> dict[str, np.ndarray | Failure]:
    """``samples`` as process_shard sends them through ``decoder: gpu``: deferred on the decode
    threads or the CPU path there, then one batch. Key -> (R, R, 3) pixels, or the Failure."""
    cfg = dec.cfg
    outcomes: dict[str, np.ndarray | Failure] = {}
    batch = []
    for sample in samples:
        item = dec.defer(sample) or preprocess(sample, resolution=cfg.resolution, min_size=cfg.min_size,
                                               max_pixels=cfg.max_pixels)
        if isinstance(item, Failure):
            outcomes[item.key] = item
        else:
            batch.append(item)
    if not batch:
        return outcomes  # process_shard makes no empty batch
    inputs, failures = dec.model_input(batch)
    assert [s.key for s in inputs.samples] == [i.key for i in batch if i.key not in {f.key for f in failures}]
    outcomes.update({f.key: f for f in failures})
    pixels = inputs.pixels.numpy() if isinstance(inputs.pixels, torch.Tensor) else inputs.pixels
    assert pixels.shape == (len(inputs.samples), cfg.resolution, cfg.resolution, 3) and pixels.dtype == np.uint8
    outcomes.update({s.key: pixels[i] for i, s in enumerate(inputs.samples)})
    return outcomes


def one(data: bytes, key: str = "k") -> Sample:
    return Sample(key, {"jpg": data}, "test")


@functools.cache
def jpeg(name: str, size: tuple[int, int], orientation: int | None = None) -> bytes:
    return sf.jpeg_bytes(sf.photo(name, size), exif_orientation=orientation)


def bogus_huffman(data: bytes) -> bytes:
    """A JPEG whose header Pillow reads but whose Huffman table no decoder accepts: deferred, then
    refused by the device decode and by the CPU path alike (``decode_error``)."""
    out = bytearray(data)
    dht = out.index(b"\xff\xc4")
    out[dht + 5:dht + 21] = bytes([255] * 16)  # code counts summing far over 256
    return bytes(out)


def cut_then_ended(data: bytes) -> bytes:
    """Cut in the scan, an end marker appended: the strict decode refuses it, Pillow decodes it."""
    return data[: (data.rindex(b"\xff\xda") + len(data)) // 2] + b"\xff\xd9"


# -- geometry ---------------------------------------------------------------------------------------

GEOMETRY = [(1, 1), (3, 5), (17, 9), (63, 64), (64, 64), (65, 64), (64, 200), (200, 64), (127, 129), (333, 517),
            (517, 333), (1000, 7), (130, 129)]


@pytest.mark.parametrize("size", GEOMETRY, ids=lambda s: f"{s[0]}x{s[1]}")
def test_same_geometry_as_the_cpu_path(size):
    # Against the CPU path's full-size decode (draft=False), so only the resamplers' rounding differs:
    # measured mean <= 0.23/255, max 4/255. A crop off by one pixel measures ~5/255 mean.
    sample = one(jpeg("coffee", size))
    deferred = decoder().defer(sample)
    assert isinstance(deferred, Deferred) and (deferred.width, deferred.height) == size
    ours, theirs = run(decoder(), [sample])["k"], cpu_path(sample, draft=False)
    assert (theirs.width, theirs.height) == size
    diff = np.abs(ours.astype(int) - theirs.pixels)
    assert diff.mean() < 0.5 and diff.max() <= 8


def test_exact_size_passes_through_unresampled():
    data = jpeg("astronaut", (R, R))
    assert np.array_equal(run(decoder(), [one(data)])["k"], cpu_path(one(data)).pixels)


@pytest.mark.parametrize("orientation", [None, *range(1, 9)])
def test_exif_orientation_as_the_cpu_path(orientation):
    sample = one(jpeg("chelsea", (140, 106), orientation))
    deferred = decoder().defer(sample)
    theirs = cpu_path(sample, fast=False)
    assert (deferred.width, deferred.height) == (theirs.width, theirs.height) == \
        ((106, 140) if orientation and orientation >= 5 else (140, 106))
    # Measured max 2/255: a wrong flip or transpose would be off by tens.
    assert np.abs(run(decoder(), [sample])["k"].astype(int) - theirs.pixels).max() <= 6


# -- agreement --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", PHOTOS)
def test_agrees_with_the_cpu_paths(name, size):
    # Tolerances from the figures in the module docstring, with margin: mean 1/255 and 45 dB against
    # the CPU paths; 40 dB against Lanczos, the CPU path's own floor (tests/test_jpeg_decode.py).
    data = jpeg(name, size)
    ours = run(decoder(256), [one(data)])["k"]
    for theirs in (cpu_path(one(data), 256).pixels, cpu_path(one(data), 256, fast=False).pixels):
        assert np.abs(ours.astype(float) - theirs).mean() < 1.0 and psnr(ours, theirs) >= 45
    assert psnr(ours, reference(data, 256)) >= 40


@functools.cache
def demo_photos() -> list[Sample]:
    samples = [s for url in DEMO_SHARDS for s in iter_samples(url, {}, on_failure=lambda f: None) if "jpg" in s.fields]
    return [s for s in samples if isinstance(cpu_path(s), Preprocessed)]


@pytest.mark.parametrize("resolution", [128, 256])
def test_demo_photos_against_a_full_decode_with_lanczos(resolution):
    photos = demo_photos()
    ours = run(decoder(resolution), photos)
    assert len(photos) == 14 and all(isinstance(ours[s.key], np.ndarray) for s in photos)
    scores = [psnr(ours[s.key], reference(s.fields["jpg"], resolution)) for s in photos]
    assert min(scores) >= 40, scores  # measured >= 42.6 dB at 128 px, >= 45.1 at 256


# -- what the device does not take, and what it fails on --------------------------------------------

def _hostile() -> dict[str, bytes]:
    good = jpeg("chelsea", (96, 72))
    return {
        "truncated": good[: len(good) // 2],
        "garbage_after_soi": b"\xff\xd8\xff" + np.random.default_rng(0).bytes(512),
        "zero_bytes": b"",
        "png_as_jpg": sf.png_bytes(sf.photo("coffee", (96, 72))),
        "cmyk": sf.jpeg_bytes(sf.photo("coffee", (96, 72)).convert("CMYK")),
        "webp_as_jpg": sf.webp_bytes(sf.photo("coffee", (96, 72))),
    }


@pytest.mark.parametrize("name", sorted(_hostile()))
def test_what_the_device_does_not_take_stays_on_the_cpu_path(name):
    sample = one(_hostile()[name])
    assert decoder().defer(sample) is None
    theirs = cpu_path(sample)
    ours = run(decoder(), [sample])["k"]
    if isinstance(theirs, Failure):
        assert ours == theirs
    else:
        assert np.array_equal(ours, theirs.pixels)  # the CPU path's own pixels, uploaded


def test_limits_are_read_from_the_header_as_on_the_cpu_path():
    data = jpeg("astronaut", (500, 375))
    assert decoder(max_pixels=500 * 375 - 1).defer(one(data)) is None
    assert decoder(min_size=376).defer(one(data)) is None
    assert run(decoder(max_pixels=500 * 375 - 1), [one(data)])["k"].reason == "too_large"
    assert run(decoder(min_size=376), [one(data)])["k"].reason == "too_small"
    # A header claiming 40 000 x 30 000 (1.2 GP): over Pillow's bomb limit, refused before any decode.
    huge = bytearray(data)
    sof = huge.index(b"\xff\xc0")
    huge[sof + 5:sof + 9] = (30_000).to_bytes(2, "big") + (40_000).to_bytes(2, "big")
    assert decoder().defer(one(bytes(huge))) is None
    assert run(decoder(), [one(bytes(huge))])["k"] == cpu_path(one(bytes(huge))) and \
        cpu_path(one(bytes(huge))).reason == "too_large"


def test_one_bad_jpeg_in_a_batch_keeps_the_others_on_the_device():
    dec = decoder()
    names = ("astronaut", "chelsea", "coffee", "rocket")
    goods = [one(jpeg(n, (120, 90)), f"good-{n}") for n in names]
    bad, recoverable = one(bogus_huffman(jpeg("chelsea", (96, 72))), "bad"), \
        one(cut_then_ended(jpeg("coffee", (96, 72))), "recoverable")
    assert isinstance(dec.defer(bad), Deferred) and isinstance(dec.defer(recoverable), Deferred)
    alone = {s.key: run(decoder(), [s])[s.key] for s in goods}
    ours = run(dec, [goods[0], bad, goods[1], recoverable, *goods[2:]])
    assert ours["bad"] == cpu_path(bad) and ours["bad"].reason == "decode_error"  # same reason and message
    assert np.array_equal(ours["recoverable"], cpu_path(recoverable).pixels)  # Pillow decodes what libjpeg refused
    assert all(np.array_equal(ours[k], alone[k]) for k in alone)  # the good ones: the device's own pixels
    assert (dec.counts.device, dec.counts.cpu_path) == (4, 2)


def test_cpu_path_images_take_their_rows_in_batch_order():
    png = Sample("png", {"png": sf.png_bytes(sf.photo("rocket", (80, 70)))}, "t")
    items = [png if i == 1 else one(jpeg(n, (90, 80)), n) for i, n in enumerate(("astronaut", "x", "coffee"))]
    ours = run(decoder(), items)
    assert list(ours) == ["astronaut", "png", "coffee"]
    assert np.array_equal(ours["png"], cpu_path(png).pixels)


def test_the_audit_keeps_host_copies_of_device_rows():
    pixels = torch.arange(4 * 2 * 2 * 3, dtype=torch.uint8).reshape(4, 2, 2, 3)
    rows = ModelInput([], pixels).host_pixels([3, 1])
    assert len(rows) == 2 and isinstance(rows[0], np.ndarray)
    assert np.array_equal(rows[0], pixels[3].numpy()) and np.array_equal(rows[1], pixels[1].numpy())
    sampler = AuditSampler(2, "stem")
    sampler.offer(["a", "b"], rows, np.zeros((2, 1, 1)), np.zeros((2, 1, 1, 1)), "bf16")
    expected = pixels[3].numpy().copy()
    pixels.zero_()  # the batch's tensor is reused: the audit's copies must not change with it
    assert [s.key for s in sampler.samples()] == ["a", "b"] and np.array_equal(sampler.samples()[0].pixels, expected)


# -- hostile bytes ----------------------------------------------------------------------------------

FUZZ_R = 32
TAKEN: collections.Counter = collections.Counter()
_fuzz = settings(max_examples=200, deadline=timedelta(seconds=5), derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_flips = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), max_size=6)


def check_damaged(damaged: bytes) -> str:
    """``damaged`` in a batch with a good JPEG: nothing raises, every sample is pixels or a Failure,
    the damaged one's outcome is the CPU path's, and the good one keeps its device-decoded pixels.
    Returns whether the device decoded the damaged one."""
    dec = decoder(FUZZ_R)
    good = one(fuzz_inputs()["baseline"], "good")
    ours = run(dec, [one(damaged, "damaged"), good])
    theirs = cpu_path(one(damaged, "damaged"), FUZZ_R)
    if isinstance(theirs, Failure):
        assert ours["damaged"] == theirs
    else:
        assert isinstance(ours["damaged"], np.ndarray) and ours["damaged"].shape == (FUZZ_R, FUZZ_R, 3)
    assert np.array_equal(ours["good"], run(decoder(FUZZ_R), [good])["good"])
    return "device" if dec.counts.device == 2 else "cpu"


def flipped(data: bytes, flips: list[tuple[int, int]], span: int) -> bytes:
    out = bytearray(data)
    for position, mask in flips:
        out[position % span] ^= mask
    return bytes(out)


@_fuzz
@given(st.sampled_from(sorted(fuzz_inputs())), st.integers(-1, 1 << 16), _flips)
def test_damaged_jpeg_in_a_batch(name, cut, flips):
    """Cut and/or flipped anywhere (most such bytes are cut before their end marker, or make the
    strict decode raise: the CPU path decides)."""
    data = flipped(fuzz_inputs()[name], flips, len(fuzz_inputs()[name]))
    TAKEN["anywhere", check_damaged(data if cut < 0 else data[: max(1, cut % (len(data) + 1))])] += 1


@_fuzz
@given(st.sampled_from(sorted(fuzz_inputs())), _flips.filter(bool))
def test_damaged_jpeg_header_in_a_batch(name, flips):
    """Flips in the header only (sizes, tables, sampling factors, EXIF orientation): the bytes the
    deferral and the geometry trust; many of these still decode, on the device."""
    data = fuzz_inputs()[name]
    TAKEN["header", check_damaged(flipped(data, flips, data.index(b"\xff\xda") + 2))] += 1


def test_fuzzing_reaches_the_device_decode():
    # After the fuzz test above (file order): without it that test could pass by deferring nothing.
    if not TAKEN:
        pytest.skip("run with the fuzz test")
    assert TAKEN["header", "device"] >= 30, dict(TAKEN)


# -- backends ---------------------------------------------------------------------------------------

def test_without_torchvision_a_cpu_device_runs_the_stand_in_and_cuda_refuses():
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        pass
    else:
        pytest.skip("torchvision is installed: the real backend runs (tests below)")
    assert "stand-in" in pick_backend(CPU)[1]
    with pytest.raises(ConfigError, match="preprocess.decoder: gpu needs torchvision: pip install torchvision"):
        DeviceDecoder(PreprocessConfig(decoder="gpu"), IMAGE_KEYS, torch.device("cuda"))


def test_views_other_than_center_need_the_cpu_decoder(tmp_path):
    from vqpipe.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("input: {urls: x}\nmodel: {path: demo}\noutput: {path: out}\n")
    assert load_config(path, ["preprocess.decoder=gpu"]).preprocess.decoder == "gpu"
    with pytest.raises(ConfigError, match=r"preprocess.decoder: gpu makes the plain center crop only"):
        load_config(path, ["preprocess.decoder=gpu", "preprocess.views=[center, hflip]"])
    with pytest.raises(ConfigError, match="preprocess.decoder"):
        load_config(path, ["preprocess.decoder=nvjpeg"])


@pytest.fixture(scope="module")
def torchvision_decoder():
    pytest.importorskip("torchvision")
    dec = decoder()
    assert "torchvision" in dec.backend_name
    return dec


def test_torchvision_decode_agrees_with_the_stand_in(torchvision_decoder):
    from vqpipe.input.device_decode import _stand_in

    stand_in = DeviceDecoder(torchvision_decoder.cfg, IMAGE_KEYS, CPU, _stand_in, "stand-in")
    samples = [one(jpeg(n, s), f"{n}{s}") for n in PHOTOS for s in ((120, 90), (333, 517))]
    ours, theirs = run(torchvision_decoder, samples), run(stand_in, samples)
    # Both are libjpeg(-turbo) full-size decodes; their IDCTs may round differently.
    assert all(np.abs(ours[k].astype(float) - theirs[k]).mean() < 0.5 for k in ours)


def test_torchvision_decode_with_a_bad_jpeg_in_the_batch(torchvision_decoder):
    bad = one(bogus_huffman(jpeg("chelsea", (96, 72))), "bad")
    goods = [one(jpeg(n, (120, 90)), n) for n in ("astronaut", "coffee")]
    ours = run(torchvision_decoder, [goods[0], bad, goods[1]])
    assert ours["bad"] == cpu_path(bad)
    assert all(isinstance(ours[s.key], np.ndarray) for s in goods)


# -- end to end -------------------------------------------------------------------------------------

def test_process_shard_with_the_gpu_decoder_matches_the_cpu_decoder(tmp_path, tiny_model_path):
    members = sf.hostile_members() + [m for i, n in enumerate(PHOTOS * 2) for m in sf.good_members(f"p{i}", n)]
    shard = sf.write_tar(tmp_path / "mixed.tar", members)
    model = load_model(ModelConfig(path=tiny_model_path))
    encoder = TokenEncoder(model, CPU, "fp32", False, 8, (-1.0, 1.0))
    tables, results = {}, {}
    with ThreadPoolExecutor(2) as pool:
        for name in ("cpu", "gpu"):
            cfg = PreprocessConfig(resolution=sf.HOSTILE_RESOLUTION, min_size=sf.HOSTILE_MIN_SIZE, decoder=name)
            job = make_settings(InputConfig(urls=("x",)), cfg, OutputConfig(path=str(tmp_path / name)), model, "fp32")
            results[name] = process_shard(str(shard), "mixed", job, encoder, pool)
            tables[name] = pq.read_table(tmp_path / name / "mixed.parquet")
    cpu, gpu = tables["cpu"], tables["gpu"]
    assert gpu.column("key").to_pylist() == cpu.column("key").to_pylist()
    for column in ("caption", "metadata", "width", "height"):
        assert gpu.column(column).to_pylist() == cpu.column(column).to_pylist()
    assert sorted(map(json.dumps, results["gpu"].failures)) == sorted(map(json.dumps, results["cpu"].failures))
    # Pixels within rounding move a few of the tiny random model's codes: measured 95.0% equal.
    codes = fixed_list_to_numpy(gpu.column("codes")) == fixed_list_to_numpy(cpu.column("codes"))
    assert codes.mean() >= 0.9
    assert json.loads(gpu.schema.metadata[b"vqpipe"])["decoder"] == "gpu"
    record = read_marker(str(tmp_path / "gpu"), "mixed", {})["decoder"]
    assert record["name"] == "gpu" and "stand-in" in record["backend"]
    # Deferred: the good JPEGs, EXIF-rotated, grayscale and the 15 MP one; none fell back.
    assert record["device_decoded"] >= 20 and record["cpu_path"] == 0
    assert read_marker(str(tmp_path / "cpu"), "mixed", {})["decoder"] == {"name": "cpu"}
