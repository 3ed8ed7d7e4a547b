"""TokenEncoder: uint8 pixels in, codes and scaled latents out, with AMP and overflow guards."""

import json
import logging

import numpy as np
import pytest
import torch

from tinymodel import tiny_model
from vqpipe import faults
from vqpipe.encode.encoder import TokenEncoder



@pytest.fixture
def model():
    return tiny_model()


def _pixels(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_matches_model_on_scaled_pixels(model, value_range):
    pixels = _pixels(5)
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, batch_size=4, value_range=value_range)
    out = encoder(pixels)
    low, high = value_range
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 * (high - low) + low
    with torch.no_grad():
        codes, latents = model.tokenize(x)
    assert out.codes.shape == (5, 16, 16) and out.latents.shape == (5, 4, 16, 16)
    np.testing.assert_array_equal(out.codes, codes.numpy())
    np.testing.assert_allclose(out.latents, latents.numpy(), rtol=1e-5, atol=1e-6)
    assert out.finite.all() and not out.amp_fallback


def test_fp16_overflow_falls_back_to_fp32(model):
    # Weights ~1e5 overflow fp16 (max 65504) when autocast casts them, but are fine in fp32.
    with torch.no_grad():
        model.quant_conv.weight.mul_(1e6)
    encoder = TokenEncoder(model, torch.device("cpu"), "fp16", False, batch_size=4, value_range=(-1, 1))
    out = encoder(_pixels(3))
    assert out.amp_fallback and encoder.amp_fallback_batches == 1
    assert out.finite.all() and np.isfinite(out.latents).all()


def test_non_finite_even_in_fp32_is_flagged_per_sample(model):
    with torch.no_grad():
        model.quant_conv.bias.fill_(float("inf"))
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, batch_size=4, value_range=(-1, 1))
    out = encoder(_pixels(2))
    assert not out.finite.any()


def test_rejects_wrong_pixel_arrays(model):
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, batch_size=4, value_range=(-1, 1))
    with pytest.raises(ValueError, match="uint8"):
        encoder(np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        encoder(torch.zeros((2, 32, 32, 3)))


def test_a_device_tensor_encodes_as_its_host_array_does(model):
    # preprocess.decoder: gpu hands the encoder the batch where it was decoded: no second upload.
    pixels = _pixels(3)
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, batch_size=4, value_range=(-1, 1))
    host, device = encoder(pixels), encoder(torch.from_numpy(pixels))
    np.testing.assert_array_equal(device.codes, host.codes)
    np.testing.assert_array_equal(device.latents, host.latents)


def test_compiled_partial_batches_are_padded_not_recompiled(model):
    # Dynamo's graph capture decides recompiles, whatever the backend: the eager backend skips
    # inductor's code generation (minutes on 2 cores), which tests/test_cpu_passes.py still covers.
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", True, batch_size=4, value_range=(-1, 1),
                           compile_backend="eager")
    reference = TokenEncoder(model, torch.device("cpu"), "fp32", False, batch_size=4, value_range=(-1, 1))
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    graphs = []
    for n in (4, 3, 1):
        pixels = _pixels(n, seed=n)
        out = encoder(pixels)
        np.testing.assert_array_equal(out.codes, reference(pixels).codes)
        graphs.append(counters["stats"]["unique_graphs"])
    # the padded partial batches reuse the full batch's graphs
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 3


def _poison(monkeypatch, *precisions):
    """Every batch encoded in these precisions comes out with a NaN image (vqpipe.faults)."""
    monkeypatch.setenv(faults.ENV, json.dumps([{"action": "non_finite", "precision": p} for p in precisions]))


def test_repeated_overflow_switches_to_the_next_safer_precision_once(model, monkeypatch, caplog):
    _poison(monkeypatch, "fp16")
    encoder = TokenEncoder(model, torch.device("cpu"), "fp16", False, batch_size=4, value_range=(-1, 1),
                           fallback_after=3)
    with caplog.at_level(logging.WARNING, logger="vqpipe.encode.encoder"):
        outs = [encoder(_pixels(4, seed=i)) for i in range(5)]
    assert [o.amp_fallback for o in outs] == [True, True, True, False, False]
    assert [o.precision for o in outs] == ["fp32", "fp32", "fp32", "bf16", "bf16"]
    assert encoder.precision == "bf16" and encoder.amp_fallback_batches == 3
    assert encoder.switches == [{"from": "fp16", "to": "bf16", "after_non_finite_batches": 3}]
    assert all(o.finite.all() for o in outs)  # the redone batches are whole
    assert len([r for r in caplog.records if "for the rest of this worker's life" in r.message]) == 1


def test_a_good_batch_resets_the_count_and_bf16_falls_back_to_fp32(model, monkeypatch):
    encoder = TokenEncoder(model, torch.device("cpu"), "fp16", False, batch_size=2, value_range=(-1, 1),
                           fallback_after=2)
    _poison(monkeypatch, "fp16")
    encoder(_pixels(2))
    monkeypatch.setenv(faults.ENV, "")
    encoder(_pixels(2))  # a finite fp16 batch: the run of failures starts again
    _poison(monkeypatch, "fp16", "bf16")
    encoder(_pixels(2))
    assert encoder.precision == "fp16"
    for _ in range(3):
        encoder(_pixels(2))
    assert [(s["from"], s["to"]) for s in encoder.switches] == [("fp16", "bf16"), ("bf16", "fp32")]
    assert encoder.precision == "fp32"


def test_the_fp32_redo_runs_in_the_configured_passes(model, monkeypatch):
    _poison(monkeypatch, "fp16")
    passes = []
    model.encoder.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
    encoder = TokenEncoder(model, torch.device("cpu"), "fp16", False, batch_size=6, value_range=(-1, 1),
                           micro_batch=2, streams=1)
    out = encoder(_pixels(6))
    assert out.amp_fallback and out.finite.all()
    assert passes == [2] * 6  # three fp16 passes, then the fp32 redo in passes of 2, not one of 6


def test_images_non_finite_in_fp32_too_do_not_count_against_amp(model):
    with torch.no_grad():
        model.quant_conv.bias.fill_(float("inf"))
    encoder = TokenEncoder(model, torch.device("cpu"), "fp16", False, batch_size=2, value_range=(-1, 1),
                           fallback_after=1)
    for _ in range(2):
        assert not encoder(_pixels(2)).finite.any()
    assert encoder.precision == "fp16" and encoder.switches == []
