"""Records that flow between the data-plane stages.

``shards`` yields :class:`Sample`, ``images`` turns one into :class:`Preprocessed` or a
:class:`Failure` (with ``preprocess.decoder: gpu``, ``device_decode`` first turns a JPEG into a
:class:`Deferred`, decoded later with its batch); a problem with a whole shard is raised as
:class:`ShardError`.
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

FailureReason = Literal[
    "decode_error",  # the image bytes could not be decoded
    "no_image",  # the sample has none of the configured image fields
    "too_small",  # shorter side below the configured minimum
    "too_large",  # over Pillow's decompression-bomb pixel limit, or a huge tar member
    "unsupported_mode",  # a pixel mode with no RGB conversion
    "empty",  # the image field is zero bytes
    "duplicate_key",  # the key already appeared earlier in the same shard
    "bad_member_name",  # absolute path, `..` component, or no extension
    "non_finite",  # the encoder produced NaN/inf for this sample
    "latent_overflow",  # a latent value exceeds output.latent_dtype's range (float16: 65504)
]

ShardErrorReason = Literal["missing_shard", "truncated_tar", "corrupt_tar", "read_error"]


@dataclass(frozen=True)
class Sample:
    """One WebDataset sample: ``fields`` maps a member extension (``jpg``, ``txt``,
    ``v2.jpg``...) to its bytes; ``source`` is the shard URL it came from."""

    key: str
    fields: dict[str, bytes]
    source: str


_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")


def deterministic(message: str) -> str:
    """``message`` without memory addresses (``<_io.BytesIO object at 0x7fc8...>`` becomes
    ``<_io.BytesIO>``): the same failure reads the same in every run and on every worker."""
    return _ADDRESS.sub("", message)


@dataclass(frozen=True)
class Failure:
    """A sample that was dropped, with a machine-readable ``reason`` and a human
    ``message``."""

    key: str
    reason: FailureReason
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", deterministic(self.message))

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Filtered:
    """A sample left out on purpose by ``rule`` (a metadata key of ``input.filters``, or
    ``max_aspect_ratio``): counted apart from failures, never a sign of a broken run."""

    key: str
    rule: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "reason": "filtered", "rule": self.rule, "message": self.message}


@dataclass(frozen=True)
class Preprocessed:
    """A sample ready for the encoder.

    pixels: (R, R, 3) uint8, RGB, resized and center-cropped; (V, R, R, 3) with several views.
    width, height: the original image size after EXIF orientation.
    views: where each view was cut from (``vqpipe.input.views.ViewCrop``); None for the plain center crop.
    """

    key: str
    pixels: np.ndarray
    width: int
    height: int
    caption: str | None
    metadata: str | None
    views: list | None = None


@dataclass(frozen=True)
class Deferred:
    """A JPEG whose decode waits for its batch on the worker's device (``preprocess.decoder: gpu``):
    the decode thread read its header only (:mod:`vqpipe.input.device_decode`).

    width, height: the original image size after EXIF orientation, as in :class:`Preprocessed`.
    orientation: the EXIF Orientation tag (None: shown as stored).
    sample: what the CPU path is given should the device decode fail.
    """

    sample: Sample
    data: bytes
    width: int
    height: int
    orientation: int | None
    caption: str | None
    metadata: str | None

    @property
    def key(self) -> str:
        return self.sample.key


class ShardError(Exception):
    """The shard as a whole could not be read; its partial output must be discarded."""

    def __init__(self, reason: ShardErrorReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):
        # Crosses process boundaries (Ray): rebuild from both fields, not from str(self).
        return (ShardError, (self.reason, self.message))


def sum_reasons(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Failures by reason added up over shards (results, markers), most frequent first: the one
    place such counts are summed, for the summary, the manifest, the guard and ``inspect``."""
    total: collections.Counter = collections.Counter()
    for c in counts:
        total.update({reason: int(n) for reason, n in c.items()})
    return dict(total.most_common())


def shard_failure(url: str, stem: str, attempts: int, error: str) -> dict:
    """The body of ``_vqpipe/failed/{stem}.json``: why a shard could not be written."""
    return {"source": url, "stem": stem, "attempts": attempts, "error": error,
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
