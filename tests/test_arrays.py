"""narrow_rows: the one float32 -> float16 conversion that both checks and writes latents."""

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from vqpipe.output.arrays import narrow_rows

SPECIAL = [0.0, -0.0, 1e-8, 6.1e-5, 65504.0, 65519.9, 65520.0, -65520.0, 1e6, np.inf, -np.inf, np.nan, 3e38]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.integers(1, 6), st.integers(1, 40), st.lists(st.tuples(st.integers(0, 239), st.sampled_from(SPECIAL)),
                                                        max_size=10), st.floats(1e-3, 1e5))
def test_same_bits_and_rows_as_numpy(n, width, specials, scale):
    values = (np.random.default_rng(n * 1000 + width).standard_normal((n, width)) * scale).astype(np.float32)
    for position, value in specials:
        values.flat[position % values.size] = value
    cast, bad = narrow_rows(values, pa.float16())
    with np.errstate(over="ignore"):
        reference = values.astype(np.float16)
    assert cast.dtype == np.float16 and cast.view(np.uint16).tolist() == reference.view(np.uint16).tolist()
    expected = (np.isfinite(values) & ~np.isfinite(reference)).reshape(n, -1).any(axis=1)
    assert bad.tolist() == expected.tolist()


def test_float32_storage_is_left_as_it_is():
    values = np.array([[1e30, np.nan]], dtype=np.float32)
    cast, bad = narrow_rows(values, pa.float32())
    assert cast is values and not bad.any()
