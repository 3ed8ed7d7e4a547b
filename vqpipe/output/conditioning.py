"""The per-view conditioning columns of a multi-view output (``preprocess.views`` with V > 1).

    crop_box      [V][4] float64   x0, y0, x1, y1 in the original's pixels after EXIF orientation
    mirrored      [V]    bool      the crop was flipped left to right
    resized_size  [V][2] int32     (width, height) the image was resized to before the R x R crop

With the ``width`` / ``height`` columns that is SDXL's micro-conditioning (original size, crop
top-left, target size) and enough to rebuild every view from the original image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from vqpipe.output.arrays import to_fixed_list_array

COLUMNS = ("crop_box", "mirrored", "resized_size")


def conditioning_fields(views: int) -> list[pa.Field]:
    return [
        pa.field("crop_box", pa.list_(pa.list_(pa.float64(), 4), views), nullable=False),
        pa.field("mirrored", pa.list_(pa.bool_(), views), nullable=False),
        pa.field("resized_size", pa.list_(pa.list_(pa.int32(), 2), views), nullable=False),
    ]


def conditioning_columns(crops: Sequence[Sequence[Any]]) -> dict[str, pa.Array]:
    """One row per sample from its ``ViewCrop`` list (``vqpipe.input.views``), views in order."""
    n, views = len(crops), len(crops[0]) if crops else 0
    boxes = np.array([[c.box for c in row] for row in crops], dtype=np.float64).reshape(n, views, 4)
    mirrored = np.array([[c.mirrored for c in row] for row in crops], dtype=bool).reshape(n, views)
    resized = np.array([[c.resized for c in row] for row in crops], dtype=np.int32).reshape(n, views, 2)
    return {"crop_box": to_fixed_list_array(boxes, pa.float64()),
            "mirrored": to_fixed_list_array(mirrored, pa.bool_()),
            "resized_size": to_fixed_list_array(resized, pa.int32())}
