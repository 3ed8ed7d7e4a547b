"""NumPy <-> Arrow nested fixed-size lists without copying the values.

A batch of (h, w) code grids is stored as ``fixed_size_list<fixed_size_list<uint16>[w]>[h]``:
one flat buffer plus list sizes, which pyarrow, polars (``Array`` dtype), duckdb and HF
datasets all read back with the shape intact.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def to_fixed_list_array(values: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """(N, *shape) array -> N nested fixed-size lists of ``value_type``.

    Zero-copy when ``values`` is C-contiguous with the matching dtype. Otherwise it is cast,
    and a cast that would change a value (integer out of range, float16 overflow to inf)
    raises ValueError naming the value instead of wrapping silently.
    """
    if values.ndim < 2:
        raise ValueError(f"expected (N, *shape) with at least one inner dim, got {values.shape}")
    target = np.dtype(value_type.to_pandas_dtype())
    flat = _cast(np.ascontiguousarray(values).reshape(-1), target)
    array: pa.Array = pa.array(flat, type=value_type)
    for size in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, type=pa.list_(array.type, size))
    return array


def narrow_rows(values: np.ndarray, value_type: pa.DataType) -> tuple[np.ndarray, np.ndarray]:
    """(N, ...) floats in ``value_type``'s dtype, and the (N,) rows holding a finite value that
    dtype cannot hold (float16 tops out at 65504), so a writer can drop those rows instead of the
    batch.

    One conversion for the check and the write alike, in torch (F16C: 0.012 vs numpy's 0.077 ms
    per 16 384 values), with the exact elementwise test only for rows whose peak is out of range:
    float16 latents cost 0.13-0.17 ms less per image than a cast and a check done apart
    (tests/benchmarks/bench_pipeline_parts.py)."""
    target = np.dtype(value_type.to_pandas_dtype())
    bad = np.zeros(len(values), dtype=bool)
    if values.dtype == target or not np.issubdtype(target, np.floating) \
            or np.finfo(target).max >= np.finfo(values.dtype).max:
        return values, bad
    import torch  # here, not at the top: `vqpipe inspect` reads arrays through this module without torch

    cast = torch.from_numpy(np.ascontiguousarray(values)).to(getattr(torch, target.name)).numpy()
    rows, cast_rows = values.reshape(len(values), -1), cast.reshape(len(values), -1)
    if rows.shape[1]:
        peak = np.maximum(rows.max(axis=1), -rows.min(axis=1))
        for i in np.flatnonzero(~(peak <= np.finfo(target).max)):  # NaN peaks too: rare, so checked exactly
            bad[i] = bool((np.isfinite(rows[i]) & ~np.isfinite(cast_rows[i])).any())
    return cast, bad


def _cast(flat: np.ndarray, target: np.dtype) -> np.ndarray:
    if flat.dtype == target:
        return flat
    if np.issubdtype(target, np.integer):
        if not np.issubdtype(flat.dtype, np.integer):
            raise ValueError(f"refusing to cast {flat.dtype} to {target}")
        info = np.iinfo(target)
        bad = flat[(flat < info.min) | (flat > info.max)]
        if bad.size:
            raise ValueError(f"value {bad[0]} does not fit {target}")
        return flat.astype(target)
    with np.errstate(over="ignore"):  # checked on the next line, with the value named
        cast = flat.astype(target)
    overflow = np.isfinite(flat) & ~np.isfinite(cast)
    if overflow.any():
        raise ValueError(f"value {flat[overflow][0]} overflows {target}")
    return cast


def fixed_list_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Nested fixed-size lists -> (N, *shape) array, zero-copy for a single chunk.

    Chunked input (one chunk per row group) is combined first, which copies once. Slices
    are honoured: ``flatten()`` applies the array's offset, unlike ``.values``.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if column.null_count:
        raise ValueError(f"{column.null_count} null rows cannot become an array")
    shape = [len(column)]
    array = column
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()
    return array.to_numpy(zero_copy_only=True).reshape(shape)
