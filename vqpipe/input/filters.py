"""Sample filters, evaluated before any pixel is decoded: one :class:`Sample` in, a
:class:`Filtered` record or None (keep it) out.

Two kinds, as open-muse and img2dataset filter LAION: rules on the sample's ``json`` metadata
(``input.filters``: numeric ``min`` / ``max``, ``in`` a list of allowed values; a sample lacking
a key follows ``input.filter_missing``), and ``preprocess.max_aspect_ratio`` read from the image
header. A filtered sample is a choice, not a failure: it is counted by rule, apart from bad samples.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from vqpipe.config import IMAGE_KEYS, FilterRule, InputConfig, PreprocessConfig
from vqpipe.input.images import ALLOWED_FORMATS
from vqpipe.records import Filtered, Sample

ASPECT_RULE = "max_aspect_ratio"

# A header Pillow cannot read is left for preprocessing to fail with its own reason.
_HEADER_ERRORS = (OSError, ValueError, SyntaxError, struct.error, EOFError, zlib.error, Image.DecompressionBombError)

_MISSING = object()


@dataclass(frozen=True)
class SampleFilter:
    """``filter(sample)``: the first rule the sample fails, as a :class:`Filtered`, or None."""

    rules: dict[str, FilterRule] = field(default_factory=dict)
    missing: Literal["keep", "drop"] = "keep"
    max_aspect_ratio: float | None = None
    image_keys: Sequence[str] = IMAGE_KEYS

    @classmethod
    def from_config(cls, input: InputConfig, preprocess: PreprocessConfig) -> "SampleFilter":
        return cls(dict(input.filters), input.filter_missing, preprocess.max_aspect_ratio, tuple(input.image_keys))

    def __call__(self, sample: Sample) -> Filtered | None:
        return self._check_metadata(sample) or self._check_aspect(sample)

    def _check_metadata(self, sample: Sample) -> Filtered | None:
        if not self.rules:
            return None
        metadata = parse_metadata(sample.fields.get("json"))
        for name, rule in self.rules.items():
            value = metadata.get(name, _MISSING)
            if value is _MISSING or value is None:
                if self.missing == "drop":
                    return Filtered(sample.key, name, f"{name} is missing from the json metadata")
                continue
            why = rule_failure(name, rule, value)
            if why is not None:
                return Filtered(sample.key, name, why)
        return None

    def _check_aspect(self, sample: Sample) -> Filtered | None:
        if self.max_aspect_ratio is None:
            return None
        size = header_size(sample, self.image_keys)
        if size is None or min(size) == 0:
            return None
        ratio = max(size) / min(size)
        if ratio <= self.max_aspect_ratio:
            return None
        message = f"{size[0]}x{size[1]} is {ratio:.2f}:1, over {ASPECT_RULE} {self.max_aspect_ratio:g}"
        return Filtered(sample.key, ASPECT_RULE, message)


def parse_metadata(data: bytes | None) -> dict[str, Any]:
    """The sample's JSON object; anything else (absent, not JSON, not an object) has no keys."""
    if not data:
        return {}
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}
    return value if isinstance(value, dict) else {}


def rule_failure(name: str, rule: FilterRule, value: Any) -> str | None:
    """Why ``value`` (present, not null) fails ``rule``, or None if it passes."""
    if rule.allowed is not None and not any(_same(value, a) for a in rule.allowed):
        return f"{name} = {value!r} is not in {list(rule.allowed)}"
    if rule.min is None and rule.max is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return f"{name} = {value!r} is not a number"
    if rule.min is not None and value < rule.min:
        return f"{name} = {value!r} is below min {rule.min:g}"
    if rule.max is not None and value > rule.max:
        return f"{name} = {value!r} is above max {rule.max:g}"
    return None


def _same(value: Any, allowed: Any) -> bool:
    # Python's True == 1: a JSON true must not pass `in: [1]`, nor 1 pass `in: [true]`.
    return value == allowed and isinstance(value, bool) == isinstance(allowed, bool)


def header_size(sample: Sample, image_keys: Sequence[str]) -> tuple[int, int] | None:
    """(width, height) of the sample's image from its header alone (no pixel decoded), or None."""
    data = next((sample.fields[k] for k in image_keys if k in sample.fields), None)
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            return img.size
    except _HEADER_ERRORS:
        return None
