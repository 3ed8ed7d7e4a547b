import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

import shardfactory as sf
from vqpipe.input.images import Rejected, preprocess, to_rgb
from vqpipe.records import Failure, Preprocessed, Sample
from vqpipe.input.shards import iter_samples

R = sf.HOSTILE_RESOLUTION


def run(fields: dict[str, bytes], resolution: int = R, **kwargs) -> Preprocessed | Failure:
    kwargs.setdefault("min_size", sf.HOSTILE_MIN_SIZE)
    return preprocess(Sample("k", fields, "test"), resolution=resolution, **kwargs)


def ok(fields: dict[str, bytes], resolution: int = R, **kwargs) -> Preprocessed:
    out = run(fields, resolution, **kwargs)
    assert isinstance(out, Preprocessed), out
    return out


def test_hostile_shard_end_to_end(tmp_path):
    """Every catalogued case gets its defined outcome and the good samples survive."""
    shard = str(sf.write_tar(tmp_path / "hostile.tar", sf.hostile_members()))
    failures: list[Failure] = []
    outcomes = []
    for sample in iter_samples(shard, {}, failures.append):
        out = preprocess(sample, resolution=R, min_size=sf.HOSTILE_MIN_SIZE)
        outcomes.append((sample.key, out.reason if isinstance(out, Failure) else "ok"))
        if isinstance(out, Preprocessed):
            assert out.pixels.shape == (R, R, 3) and out.pixels.dtype == np.uint8
    outcomes += [(f.key, f.reason) for f in failures]
    assert sorted(outcomes) == sf.expected_outcomes()


def test_exact_size_rgb_passes_through_bit_identical():
    img = sf.photo("astronaut", (R, R))
    assert np.array_equal(ok({"png": sf.png_bytes(img)}).pixels, np.asarray(img))


def test_exif_rotation_swaps_size_and_rotates_pixels():
    stored = Image.open(io.BytesIO(sf.jpeg_bytes(sf.photo("chelsea"))))  # 451x300
    stored.load()
    rotated = ok({"jpg": sf.jpeg_bytes(sf.photo("chelsea"), exif_orientation=6)}, draft=False)
    # Orientation 6 means "rotate 90 degrees clockwise to display" (Image.ROTATE_270).
    reference = ok({"png": sf.png_bytes(stored.transpose(Image.Transpose.ROTATE_270))})
    assert (rotated.width, rotated.height) == (300, 451)
    assert np.array_equal(rotated.pixels, reference.pixels)


def test_transparent_pixels_become_white_and_opaque_ones_keep_color():
    rgb = sf.photo("coffee", (R, R))
    rgba = rgb.convert("RGBA")
    alpha = np.full((R, R), 255, np.uint8)
    alpha[:, : R // 2] = 0
    rgba.putalpha(Image.fromarray(alpha))
    pixels = ok({"png": sf.png_bytes(rgba)}).pixels
    assert (pixels[:, : R // 2] == 255).all()
    assert np.array_equal(pixels[:, R // 2 :], np.asarray(rgb)[:, R // 2 :])


def test_palette_transparency_becomes_white():
    img = Image.new("P", (R, R), 0)
    img.putpalette([255, 0, 0, 0, 0, 255])
    img.paste(1, (0, 0, R // 2, R))
    img.info["transparency"] = 0  # the red half is transparent
    pixels = ok({"png": sf.png_bytes(img)}).pixels
    assert (pixels[:, R // 2 :] == 255).all()
    assert (pixels[:, : R // 2] == [0, 0, 255]).all()


def test_sixteen_bit_is_scaled_not_clipped():
    gray = sf.photo("camera", (R, R))
    pixels = ok({"png": sf.png_bytes(sf.sixteen_bit(gray))}).pixels
    # Clipping at 255 would turn nearly every pixel white; scaling by 1/257 is exact here.
    assert np.array_equal(pixels, np.repeat(np.asarray(gray)[..., None], 3, axis=2))


def test_cmyk_jpeg_looks_like_its_rgb_source():
    rgb = sf.photo("chelsea")
    from_cmyk = ok({"jpg": sf.jpeg_bytes(rgb.convert("CMYK"))}).pixels.astype(float)
    from_rgb = ok({"jpg": sf.jpeg_bytes(rgb)}).pixels.astype(float)
    # Both went through lossy JPEG, in different color spaces (measured 0.7 levels apart);
    # an inverted or channel-swapped CMYK decode is off by tens of levels.
    assert np.abs(from_cmyk - from_rgb).mean() < 2


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "P", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"]
)
def test_every_mode_converts_to_rgb(mode):
    source = sf.photo("coffee", (32, 32)).convert("RGBA")
    img = source.convert(mode)
    assert img.mode == mode  # the conversion under test really starts from this mode
    assert to_rgb(img).mode == "RGB"


def test_int_and_float_modes_scale_to_8_bit():
    i = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32))
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(i))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255]


def test_mode_without_rgb_conversion_is_rejected():
    # Pillow 13 converts every mode its decoders produce; "La" is an internal one.
    with pytest.raises(Rejected) as err:
        to_rgb(Image.new("La", (4, 4)))
    assert err.value.reason == "unsupported_mode"


def test_real_photo_draft_is_close_to_full_decode():
    # retina is a 1411x1411 photograph; at 256 the decoder scales it by 1/4 in the DCT.
    data = sf.jpeg_bytes(Image.fromarray(skimage.data.retina()))
    fast = ok({"jpg": data}, resolution=256).pixels.astype(float)
    full = ok({"jpg": data}, resolution=256, draft=False).pixels.astype(float)
    diff = np.abs(fast - full).mean()
    # Measured 0.37/255. 2/255 on average is below what re-encoding a JPEG at q90 moves
    # (about 3/255), so the tokenizer sees no difference that the data does not already have.
    assert 0 < diff < 2, diff  # > 0: the draft path really ran


def test_draft_keeps_geometry_on_odd_sizes():
    # 2047x1535 is not a multiple of the DCT scale: a naive draft shifts the crop.
    data = sf.jpeg_bytes(sf.photo("rocket", (2047, 1535)))
    fast = ok({"jpg": data}, resolution=256)
    full = ok({"jpg": data}, resolution=256, draft=False)
    assert (fast.width, fast.height) == (2047, 1535)
    assert np.abs(fast.pixels.astype(float) - full.pixels).mean() < 2


def test_crop_is_centered_floor_left():
    # A 5-wide image at resolution 4 (no resize on the short side) drops column 4 only.
    img = Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3))
    out = ok({"png": sf.png_bytes(img)}, resolution=4, min_size=0)
    assert np.array_equal(out.pixels, np.asarray(img)[:, :4])


def test_caption_and_metadata():
    jpg = sf.jpeg_bytes(sf.photo())
    out = ok({"jpg": jpg, "txt": "café".encode(), "json": b'{"a": 1}'})
    assert (out.caption, out.metadata) == ("café", '{"a": 1}')
    out = ok({"jpg": jpg, "txt": b"caf\xe9", "json": b"[" * 100_000})  # latin-1; deeply nested
    assert (out.caption, out.metadata) == ("caf\ufffd", None)
    assert ok({"jpg": jpg}).caption is None


def test_image_key_order():
    fields = {"png": sf.png_bytes(sf.photo("coffee")), "jpg": b"broken"}
    assert ok(fields, image_keys=["png", "jpg"]).width == 600
    assert run(fields, image_keys=["jpg", "png"]).reason == "decode_error"
    assert run(fields, image_keys=["webp"]).reason == "no_image"


def test_programmer_errors_are_not_swallowed():
    with pytest.raises(TypeError):
        run({"jpg": "not bytes"})  # type: ignore[dict-item]


def test_max_pixels_rejects_from_the_header_before_decoding():
    # 8000 x 10000 = 80 MP, under Pillow's bomb limit, in 10 KB: decoding it would take 240 MB.
    claims_80mp = sf.bomb_png(8_000, 10_000)
    assert len(claims_80mp) < 16_000
    out = run({"png": claims_80mp}, max_pixels=50_000_000)
    assert isinstance(out, Failure) and out.reason == "too_large" and "max_pixels" in out.message
    # the limit is on pixels, so a real photo under it still goes through
    photo = sf.png_bytes(sf.photo("astronaut", (300, 200)))
    assert ok({"png": photo}, max_pixels=300 * 200).pixels.shape == (R, R, 3)
    assert run({"png": photo}, max_pixels=300 * 200 - 1).reason == "too_large"


def test_failure_messages_carry_no_memory_addresses():
    """Pillow names the stream it could not read (``<_io.BytesIO object at 0x7fc8...>``): the same
    bad sample must read the same in every run, on every worker."""
    sample = Sample("k", {"jpg": b"not an image at all"}, "shard.tar")
    first, second = preprocess(sample), preprocess(sample)
    assert first.reason == "decode_error" and first.message == second.message
    assert "0x" not in first.message and "BytesIO" in first.message
