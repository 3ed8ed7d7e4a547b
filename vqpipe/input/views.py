"""Views of one decoded image: the crops ``preprocess.views`` asks for, each with the box it was cut
from, so one decode feeds several encodes and every view can be rebuilt from the original.

Kinds (in the order listed, concatenated):

* ``center``: today's crop -- the shorter side resized to R, a centered R x R square (floored).
* ``hflip``: the ``center`` view mirrored left to right (its pixels, flipped; no second resample).
* ``ten_crop``: LlamaGen's (``extract_codes_c2i.py --ten-crop``): the image resized so its shorter
  side is ``S = int(crop_range * R)``, its centered S x S square, then the four R x R corners and
  the center of that square (torchvision's ``five_crop``), then the same five mirrored. (torchvision's
  ``ten_crop`` orders the mirrored half as crops of the mirrored image, so its mirrored "top left" is
  our mirrored top right; the ten views are the same set.)

Geometry: a :class:`ViewCrop` holds the crop box ``(x0, y0, x1, y1)`` in pixels of the original image
after EXIF orientation (floats), whether the crop is mirrored, and the size the image was resized to
before cropping. A view's pixels are ``original.resize((R, R), BICUBIC, box=box)``, mirrored if
flagged: one resample from the (JPEG-draft) source, which matches resize-then-crop within 1/255.
(Resampling ten_crop's square once and slicing its five crops would save four resamples, but its
pixels drift up to 2/255 from what the recorded box rebuilds: Pillow's fixed-point coefficients
depend on the box offset.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vqpipe.config import PreprocessConfig, ViewKind
from vqpipe.input.images import resize_center_crop

Box = tuple[float, float, float, float]

_FIVE = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


@dataclass(frozen=True)
class ViewCrop:
    """Where one view came from: enough to rebuild it from the original, and SDXL's conditioning."""

    name: str  # center, hflip, ten_crop.top_left, ... ten_crop.center.mirrored
    box: Box  # (x0, y0, x1, y1) in the original's pixels after EXIF orientation
    mirrored: bool  # flipped left to right after cropping
    resized: tuple[int, int]  # (width, height) the image was resized to before the R x R crop


def view_names(kinds: Sequence[ViewKind]) -> list[str]:
    """The names of the views ``kinds`` make, in order (what the file metadata lists)."""
    return [crop.name for crop in view_crops(kinds, 2, 1, 8, 1.0)]  # names never depend on the geometry


def view_crops(kinds: Sequence[ViewKind], width: int, height: int, resolution: int,
               crop_range: float) -> list[ViewCrop]:
    """The crops of a ``width`` x ``height`` (oriented) image, in view order."""
    crops: list[ViewCrop] = []
    for kind in kinds:
        if kind == "center":
            crops.append(center_crop(width, height, resolution))
        elif kind == "hflip":
            crops.append(_mirror(center_crop(width, height, resolution), "hflip"))
        else:
            five = five_crops(width, height, resolution, int(crop_range * resolution))
            crops += five + [_mirror(c, f"{c.name}.mirrored") for c in five]
    return crops


def center_crop(width: int, height: int, resolution: int) -> ViewCrop:
    """The box of :func:`vqpipe.input.images.resize_center_crop`: shorter side to R, centered, floored."""
    resized = _resized(width, height, resolution)
    left, top = (resized[0] - resolution) // 2, (resized[1] - resolution) // 2
    return ViewCrop("center", _to_original((left, top), resolution, resized, width, height), False, resized)


def five_crops(width: int, height: int, resolution: int, square: int) -> list[ViewCrop]:
    """The corners and center (R x R) of the centered ``square`` x ``square`` of the image resized
    to shorter side ``square``, as LlamaGen's center_crop_arr followed by torchvision's five_crop."""
    resized = _resized(width, height, square)
    sx, sy = (resized[0] - square) // 2, (resized[1] - square) // 2
    far = square - resolution
    middle = int(round(far / 2.0))  # torchvision's center_crop offset
    corners = [(0, 0), (far, 0), (0, far), (far, far), (middle, middle)]
    return [ViewCrop(f"ten_crop.{name}", _to_original((sx + dx, sy + dy), resolution, resized, width, height),
                     False, resized) for name, (dx, dy) in zip(_FIVE, corners)]


def _resized(width: int, height: int, shorter: int) -> tuple[int, int]:
    if width <= height:
        return shorter, max(shorter, round(height * shorter / width))
    return max(shorter, round(width * shorter / height)), shorter


def _to_original(corner: tuple[int, int], side: int, resized: tuple[int, int], width: int, height: int) -> Box:
    fx, fy = width / resized[0], height / resized[1]
    return (corner[0] * fx, corner[1] * fy, (corner[0] + side) * fx, (corner[1] + side) * fy)


def _mirror(crop: ViewCrop, name: str) -> ViewCrop:
    return ViewCrop(name, crop.box, True, crop.resized)


@dataclass(frozen=True)
class ViewRenderer:
    """The render hook of :func:`vqpipe.input.images.preprocess`: a decoded image -> ``(V, R, R, 3)``
    uint8 pixels and their :class:`ViewCrop` records."""

    kinds: tuple[ViewKind, ...]
    resolution: int
    crop_range: float

    @classmethod
    def for_config(cls, cfg: PreprocessConfig) -> "ViewRenderer | None":
        """The renderer for ``preprocess.views``; None for the plain ``[center]`` (today's path)."""
        return None if tuple(cfg.views) == ("center",) else cls(tuple(cfg.views), cfg.resolution, cfg.crop_range)

    @property
    def draft_size(self) -> int:
        """The shorter side a JPEG may be draft-decoded down to: ten_crop needs crop_range * R."""
        return int(self.crop_range * self.resolution) if "ten_crop" in self.kinds else self.resolution

    def __call__(self, img: Image.Image, source_size: tuple[int, int], scale: int = 1
                 ) -> tuple[np.ndarray, list[ViewCrop]]:
        """``img`` shows a ``source_size`` original downscaled by ``scale`` (JPEG draft)."""
        crops = view_crops(self.kinds, *source_size, self.resolution, self.crop_range)
        center = center_crop(*source_size, self.resolution).box
        rendered: dict[Box, np.ndarray] = {}  # a mirrored view flips its twin's pixels: one resample per box
        views = []
        for crop in crops:
            if crop.box not in rendered:
                # The center box goes through the plain center path: the same pixels a [center] run
                # gets, and an R x R image is not resampled at all.
                rendered[crop.box] = (resize_center_crop(img, self.resolution, source_size, scale)
                                      if crop.box == center else self._crop(img, crop.box, scale))
            pixels = rendered[crop.box]
            views.append(np.ascontiguousarray(pixels[:, ::-1]) if crop.mirrored else pixels)
        return np.stack(views), crops

    def _crop(self, img: Image.Image, box: Box, scale: int) -> np.ndarray:
        in_img = (box[0] / scale, box[1] / scale, box[2] / scale, box[3] / scale)
        out = img.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC, box=in_img)
        return np.asarray(out, dtype=np.uint8)
