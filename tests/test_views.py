"""preprocess.views: several views of each image from one decode, encoded in the same batches, with
the crop box, mirrored flag and resized size of every view; readers keep (or pick from) the view axis."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image, ImageFile, ImageOps

import shardfactory as sf
from vqpipe.config import ConfigError, InputConfig, ModelConfig, OutputConfig, PreprocessConfig, load_config
from vqpipe.encode.encoder import TokenEncoder
from vqpipe.input.images import preprocess
from vqpipe.input.views import ViewRenderer, view_crops, view_names
from vqpipe.model.loading import load_model
from vqpipe.read.dataset import TokenDataset
from vqpipe.read.tokens import codes_array, latents_array, read_tokens, token_metadata
from vqpipe.records import Sample
from vqpipe.run import manifest
from vqpipe.run.shard_job import make_settings, process_shard

R = 32
ALL = ("center", "hflip", "ten_crop")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def _run(model_path, shard, out, views, stem="s", batch_size=4):
    model = load_model(ModelConfig(path=model_path))
    encoder = TokenEncoder(model, torch.device("cpu"), "fp32", False, batch_size, (-1.0, 1.0))
    job = make_settings(InputConfig(urls=("x",)), PreprocessConfig(resolution=R, views=tuple(views)),
                        OutputConfig(path=str(out)), model, "fp32")
    with ThreadPoolExecutor(2) as pool:
        result = process_shard(str(shard), stem, job, encoder, pool)
    assert result.committed and not result.failures
    return pq.read_table(out / f"{stem}.parquet")


def _exact_members(mirror=False):
    """PNGs of exactly R x R (no resampling in the center view): pixels are what the model sees."""
    members = []
    for i, name in enumerate(PHOTOS):
        img = sf.photo(name, (R, R))
        members.append((f"{i:03d}.png", sf.png_bytes(ImageOps.mirror(img) if mirror else img)))
    return members


@pytest.fixture(scope="module")
def multiview(tmp_path_factory, tiny_model_path):
    """An output of 6 photos of assorted sizes with every kind of view (12 per sample)."""
    tmp = tmp_path_factory.mktemp("views")
    sizes = [(120, 80), (80, 120), (64, 64), (200, 90), (33, 47), (300, 300)]
    members = [(f"{i:03d}.jpg", sf.jpeg_bytes(sf.photo(PHOTOS[i % 4], size))) for i, size in enumerate(sizes)]
    members += [(f"{i:03d}.txt", f"photo {i}".encode()) for i in range(len(sizes))]
    shard = sf.write_tar(tmp / "views.tar", sorted(members))
    _run(tiny_model_path, shard, tmp / "out", ALL)
    return tmp / "out", sizes


def _render(data: bytes, views=ALL, crop_range=1.1):
    return preprocess(Sample("k", {"jpg": data}, "x"), resolution=R, render=ViewRenderer(views, R, crop_range))


def test_hflip_is_the_mirror_of_center_and_center_is_todays_crop():
    data = sf.jpeg_bytes(sf.photo("astronaut", (150, 100)))
    result = _render(data, ("center", "hflip"))
    assert result.pixels.shape == (2, R, R, 3)
    np.testing.assert_array_equal(result.pixels[1], result.pixels[0][:, ::-1])
    # Views are cut on the Pillow path; a plain [center] run takes the JPEG fast path, which agrees
    # with it within rounding (tests/test_jpeg_decode.py): the center view is the Pillow path's crop.
    pillow = preprocess(Sample("k", {"jpg": data}, "x"), resolution=R, fast=False).pixels
    np.testing.assert_array_equal(result.pixels[0], pillow)
    assert [v.mirrored for v in result.views] == [False, True] and result.views[0].box == result.views[1].box


def test_one_decode_for_all_views(monkeypatch):
    data = sf.jpeg_bytes(sf.photo("coffee", (150, 100)))
    loads = []
    load = ImageFile.ImageFile.load

    def counted(img):
        if img.tile:
            loads.append(img.size)
        return load(img)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    assert _render(data).pixels.shape == (12, R, R, 3)
    assert len(loads) == 1  # one (JPEG-draft) decode feeds all twelve views


def test_ten_crop_boxes_tile_the_resized_square():
    width, height, crop_range = 300, 200, 1.1
    side = int(crop_range * R)  # 35, as LlamaGen's int(image_size * crop_range)
    crops = view_crops(("ten_crop",), width, height, R, crop_range)
    assert [c.name for c in crops] == view_names(("ten_crop",)) and len(crops) == 10
    assert [c.mirrored for c in crops] == [False] * 5 + [True] * 5
    assert [c.box for c in crops[5:]] == [c.box for c in crops[:5]]
    rw, rh = crops[0].resized
    assert (rw, rh) == (round(width * side / height), side)
    # back in the resized image's pixels: R x R crops at the corners of the centered S x S square
    fx, fy = width / rw, height / rh
    boxes = [tuple(round(v / f, 6) for v, f in zip(c.box, (fx, fy, fx, fy))) for c in crops[:5]]
    sx, far = (rw - side) // 2, side - R
    assert boxes[:4] == [(sx, 0, sx + R, R), (sx + far, 0, sx + side, R), (sx, far, sx + R, side),
                         (sx + far, far, sx + side, side)]
    middle = int(round(far / 2))
    assert boxes[4] == (sx + middle, middle, sx + middle + R, middle + R)


def test_ten_crop_center_is_a_center_crop_of_the_image_resized_to_crop_range():
    img = sf.photo("chelsea", (120, 80))
    result = _render(sf.png_bytes(img), ("ten_crop",))
    center = result.views[4]
    assert center.name == "ten_crop.center"
    side = int(1.1 * R)
    resized = img.resize(center.resized, Image.Resampling.BICUBIC)
    left, top = (center.resized[0] - side) // 2, (center.resized[1] - side) // 2
    square = resized.crop((left, top, left + side, top + side))
    offset = int(round((side - R) / 2))
    expected = np.asarray(square.crop((offset, offset, offset + R, offset + R)), dtype=np.int16)
    # one resample of the box vs resize-then-crop: the same sample points, rounding apart
    assert np.abs(result.pixels[4].astype(np.int16) - expected).max() <= 1


def test_crop_boxes_from_the_output_rebuild_each_view(tmp_path, tiny_model_path):
    shard = sf.write_tar(tmp_path / "exact.tar", _exact_members())
    table = _run(tiny_model_path, shard, tmp_path / "out", ALL)
    for row, (name, data) in enumerate(_exact_members()):
        original = Image.open(io.BytesIO(data)).convert("RGB")
        rendered = _render(data).pixels
        boxes, mirrored = table.column("crop_box")[row].as_py(), table.column("mirrored")[row].as_py()
        sizes = table.column("resized_size")[row].as_py()
        assert table.column("width")[row].as_py() == R
        for v, (box, flip) in enumerate(zip(boxes, mirrored)):
            view = original.resize((R, R), Image.Resampling.BICUBIC, box=tuple(box))
            view = ImageOps.mirror(view) if flip else view
            diff = np.abs(np.asarray(view, dtype=np.int16) - rendered[v].astype(np.int16))
            assert diff.max() <= 1, (name, v)
            assert min(sizes[v]) == (R if v < 2 else int(1.1 * R))


def test_hflip_codes_equal_the_mirrored_images_center_codes_in_fp32(tmp_path, tiny_model_path):
    both = _run(tiny_model_path, sf.write_tar(tmp_path / "a.tar", _exact_members()), tmp_path / "a",
                ("center", "hflip"))
    mirrored = _run(tiny_model_path, sf.write_tar(tmp_path / "b.tar", _exact_members(mirror=True)), tmp_path / "b",
                    ("center",))
    plain = _run(tiny_model_path, sf.write_tar(tmp_path / "c.tar", _exact_members()), tmp_path / "c", ("center",))
    codes = codes_array(both)
    assert codes.shape == (len(PHOTOS), 2, R // 2, R // 2)
    np.testing.assert_array_equal(codes[:, 1], codes_array(mirrored))
    np.testing.assert_array_equal(codes[:, 0], codes_array(plain))
    assert not np.array_equal(codes[:, 0], codes[:, 1])  # the mirror really is another image


def test_one_view_keeps_todays_layout(tmp_path, tiny_model_path):
    shard = sf.write_tar(tmp_path / "exact.tar", _exact_members())
    today = _run(tiny_model_path, shard, tmp_path / "a", ("center",))
    flipped = _run(tiny_model_path, shard, tmp_path / "b", ("hflip",))
    assert flipped.schema.remove_metadata().equals(today.schema.remove_metadata())
    assert codes_array(flipped).shape == codes_array(today).shape == (len(PHOTOS), R // 2, R // 2)
    assert token_metadata(str(tmp_path / "a"))["views"] == ["center"]
    assert token_metadata(str(tmp_path / "b"))["views"] == ["hflip"]


def test_multiview_output_shapes_and_metadata(multiview):
    out, sizes = multiview
    table = read_tokens(str(out))
    meta = token_metadata(str(out))
    assert meta["views"] == view_names(ALL) and len(meta["views"]) == 12
    assert meta["views"][:2] == ["center", "hflip"] and meta["views"][-1] == "ten_crop.center.mirrored"
    n, h = len(sizes), R // 2
    assert codes_array(table).shape == (n, 12, h, h)
    assert latents_array(table).shape == (n, 12, 4, h, h)
    assert table.column("crop_box").type.list_size == 12
    boxes = np.array(table.column("crop_box").to_pylist())
    assert boxes.shape == (n, 12, 4)
    widths = np.array(table.column("width").to_pylist())
    assert (boxes[..., 2] <= widths[:, None] + 1e-6).all() and (boxes[..., :2] >= 0).all()


def test_dataset_view_modes(multiview):
    out, sizes = multiview
    h = R // 2
    stored = next(iter(TokenDataset(str(out))))
    assert stored["codes"].shape == (12, h, h) and stored["latents"].shape == (12, 4, h, h)
    every = next(iter(TokenDataset(str(out), view="all", columns=["key", "codes", "crop_box", "mirrored"])))
    assert every["codes"].shape == (12, h, h) and every["crop_box"].shape == (12, 4)
    third = next(iter(TokenDataset(str(out), view=3, columns=["key", "codes", "crop_box", "mirrored"])))
    assert third["codes"].shape == (h, h) and torch.equal(third["codes"], every["codes"][3])
    assert third["crop_box"].shape == (4,) and bool(third["mirrored"]) is False
    with pytest.raises(ValueError, match="view must be"):
        TokenDataset(str(out), view=12)


def _random_picks(out, epoch, rank=0, world_size=1):
    dataset = TokenDataset(str(out), view="random", seed=7, rank=rank, world_size=world_size,
                           columns=["codes"], shuffle_buffer=4)
    every = {row["key"]: row["codes"] for row in TokenDataset(str(out), columns=["key", "codes"])}
    dataset.set_epoch(epoch)
    # key is not requested, yet "random" draws from it: find each row's view by its codes
    picks = {}
    for row in dataset:
        assert set(row) == {"codes"} and row["codes"].shape == (R // 2, R // 2)
        key, view = next((k, v) for k, views in every.items() for v in range(12) if torch.equal(views[v], row["codes"]))
        picks[key] = view
    return picks


def test_random_view_is_agreed_by_every_rank_and_changes_with_the_epoch(multiview):
    out, sizes = multiview
    alone = _random_picks(out, epoch=0)
    split = {**_random_picks(out, 0, rank=0, world_size=2), **_random_picks(out, 0, rank=1, world_size=2)}
    assert len(alone) == len(sizes) and split == alone
    later = [_random_picks(out, epoch) for epoch in range(1, 4)]
    assert any(picks != alone for picks in later)


def test_single_view_output_with_view_all_gets_an_axis(tmp_path, tiny_model_path):
    shard = sf.write_tar(tmp_path / "exact.tar", _exact_members())
    _run(tiny_model_path, shard, tmp_path / "a", ("center",))
    row = next(iter(TokenDataset(str(tmp_path / "a"), view="all")))
    assert row["codes"].shape == (1, R // 2, R // 2)
    assert next(iter(TokenDataset(str(tmp_path / "a"), view=0)))["codes"].shape == (R // 2, R // 2)


def _config(tmp_path, *overrides):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"input": {"urls": "x.tar"}, "model": {"path": "demo"},
                                    "output": {"path": str(tmp_path / "out")}}))
    return load_config(path, list(overrides))


def test_views_and_crop_range_are_part_of_the_fingerprint(tmp_path):
    metadata = {"weights_sha256": "abc", "model_config": {"norm_num_groups": 8}, "scaling_factor": 1.0, "codes_shape": [4, 4], "latent_shape": [4, 4, 4],
                "latent_dtype": "float16", "resolution": 32, "value_range": [-1.0, 1.0], "image_keys": ["jpg"]}
    before = {"fingerprint": manifest.fingerprint(metadata, _config(tmp_path))}
    flipped = manifest.fingerprint(metadata, _config(tmp_path, "preprocess.views=[center, hflip]"))
    wider = manifest.fingerprint(metadata, _config(tmp_path, "preprocess.crop_range=1.05"))
    assert manifest.incompatibilities(before, flipped) == [
        "views: output has ['center'], this run ['center', 'hflip']"]
    assert manifest.incompatibilities(before, wider) == ["crop_range: output has 1.1, this run 1.05"]


@pytest.mark.parametrize("override, message", [
    ("preprocess.views=[center, mirror]", "preprocess.views[1] = 'mirror'"),
    ("preprocess.views=[]", "preprocess.views must list at least one view"),
    ("preprocess.views=[hflip, hflip]", "lists a view twice"),
    ("preprocess.crop_range=0.9", "preprocess.crop_range must be within"),
])
def test_bad_views_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        _config(tmp_path, override)


def test_views_metadata_is_json(multiview):
    out, _ = multiview
    raw = pq.read_schema(next(out.glob("*.parquet"))).metadata[b"vqpipe"]
    assert json.loads(raw)["view_kinds"] == list(ALL)


def test_decode_shows_and_checks_every_view_of_a_sampled_row(multiview, tiny_model_path, tmp_path):
    from vqpipe.read import decode_job

    out, sizes = multiview
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "input": {"urls": str(out.parent / "views.tar")}, "model": {"path": tiny_model_path},
        "output": {"path": str(out)}, "preprocess": {"resolution": R, "views": list(ALL)}}))
    report = decode_job.run_decode(load_config(config_path), num_samples=2, seed=0, out=str(tmp_path / "report"))
    names = view_names(ALL)
    keys = [s["key"] for s in report.samples]
    assert len(keys) == 2 * len(names) and {k.split("#")[1] for k in keys} == set(names)
    checks = {c.name: c for c in report.checks}
    assert checks["lineage"].ok and checks["schema"].ok, report.checks
    assert all(s["psnr"] is not None for s in report.samples)
    grid = Image.open(tmp_path / "report" / "grid.png")
    assert grid.height >= (2 * len(names) // 4) * R  # one original | reconstruction pair per view


def test_inspect_reports_the_views(multiview):
    from vqpipe.read.inspect import format_text, inspect_output

    out, sizes = multiview
    stats = inspect_output(str(out))
    assert stats.views == view_names(ALL) and stats.rows == len(sizes)
    assert stats.latents.shape == [4, R // 2, R // 2]
    assert "views: 12 per row (center, hflip, ten_crop.top_left" in format_text(stats)
    assert stats.to_dict()["views"][0] == "center"
