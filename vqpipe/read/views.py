"""A multi-view output (``preprocess.views`` with V > 1) seen one view per row, for the checks and
pictures of ``vqpipe decode``: row ``key`` becomes rows ``key#center``, ``key#hflip``, ..."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from vqpipe.records import Preprocessed

# The columns that lead with the view axis (codes, latents and the conditioning).
VIEW_AXIS = ("codes", "latents", "crop_box", "mirrored", "resized_size")


def view_key(key: str, view: str) -> str:
    return f"{key}#{view}"


def per_view_rows(table: pa.Table, views: Sequence[str]) -> pa.Table:
    """N rows of V views -> N * V rows of one view each; ``sample_key`` keeps the sample's key."""
    repeat = pa.array(np.repeat(np.arange(table.num_rows), len(views)), pa.int64())
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        columns[name] = column.flatten() if name in VIEW_AXIS else column.take(repeat)
    keys = table.column("key").to_pylist()
    columns["sample_key"] = columns["key"]
    columns["key"] = pa.array([view_key(k, v) for k in keys for v in views], pa.string())
    return pa.table(columns)


def per_view_originals(originals: dict[str, Preprocessed], views: Sequence[str]) -> dict[str, Preprocessed]:
    """Samples preprocessed into (V, R, R, 3) views -> one record per ``key#view``."""
    return {view_key(key, name): dataclasses.replace(p, pixels=p.pixels[v])
            for key, p in originals.items() for v, name in enumerate(views)}

