"""``preprocess.decoder: gpu``: JPEG bytes -> (R, R) center crops on the worker's torch device, a batch at a time.

On the decode threads, :meth:`DeviceDecoder.defer` reads only the header of a JPEG the CPU fast
path would take (``jpeg_decode.read_header``: RGB or grayscale, within the limits, any EXIF
orientation) and returns a :class:`~vqpipe.records.Deferred`; everything else (PNG, WebP, CMYK,
a header over a limit, a JPEG cut before its end marker) goes through the CPU path right there.

On the main thread, :meth:`DeviceDecoder.model_input` decodes a batch's deferred JPEGs in one
call (nvJPEG through ``torchvision.io.decode_jpeg``; on a CPU device without torchvision, a
stand-in with nvJPEG's contract: libjpeg-turbo at full size, an error on damaged data), flips
each as its EXIF orientation says, and resizes its crop box with the antialiased bicubic filter
at the CPU path's geometry (``jpeg_decode.resize_box``, in float: CUDA has no uint8 kernel).
A batch call that raises is redone one image at a time (one bad image spoils the call); an image
that still fails, or decodes to a size its header did not promise, takes the CPU path
(``images.preprocess``), so it gets that path's pixels, or its Failure with the same reason and
message. Pixels come out as one (B, R, R, 3) uint8 tensor on the device, in batch order, the
CPU-path images uploaded into their rows.

nvJPEG decodes at full size (no DCT scaling), so large photos differ from the CPU path's pixels by
the resample's rounding only (README, Performance: the measured agreement).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch

from vqpipe.config import ConfigError, PreprocessConfig
from vqpipe.input.images import caption_text, image_field, metadata_text, preprocess
from vqpipe.input.jpeg_decode import EXIF_FLIPS, read_header, resize_box
from vqpipe.records import Deferred, Failure, Preprocessed, Sample

log = logging.getLogger(__name__)

# JPEG bytes -> (3, H, W) uint8 tensors on the device, at full size; raises on any image it cannot decode.
Backend = Callable[[list[bytes]], list[torch.Tensor]]

# What nvJPEG (through torchvision) and the stand-in's libjpeg-turbo raise on bytes they cannot
# decode, out-of-memory included (a RuntimeError): one by one, or on the CPU path, it may fit.
_DECODE_ERRORS = (RuntimeError, ValueError, OSError)

# Larger JPEGs take the CPU path: there DCT scaling decodes them at 1/8 the pixels, and the device
# decodes a batch at full size at once (64 images of this size are 3 GiB of RGB).
DEVICE_MAX_PIXELS = 4096 * 4096

_EOI, _SOS = b"\xff\xd9", b"\xff\xda"
_AS_STORED = (False, False, False)


@dataclass(frozen=True)
class DecodeCounts:
    """Images the device decoded, and deferred images that took the CPU path after all."""

    device: int = 0
    cpu_path: int = 0


class DeviceDecoder:
    """Deferred JPEGs of a batch -> one uint8 tensor on ``device`` (see the module's docstring).

    ``backend``: None picks ``torchvision.io.decode_jpeg``, or the stand-in on a CPU device where
    torchvision does not import; on any other device that is a ConfigError, at the worker's start.
    """

    def __init__(self, cfg: PreprocessConfig, image_keys: Sequence[str], device: torch.device,
                 backend: Backend | None = None, backend_name: str = "given"):
        self.cfg, self.image_keys, self.device = cfg, tuple(image_keys), device
        self.backend, self.backend_name = (backend, backend_name) if backend else pick_backend(device)
        self.counts = DecodeCounts()  # over the worker's life; a shard's are a difference
        self._announced = False

    # -- on the decode threads ------------------------------------------------------------------------

    def defer(self, sample: Sample) -> Deferred | None:
        """``sample`` as a :class:`Deferred` when its image is a JPEG this decoder takes, else None
        (the caller runs the CPU path)."""
        field = image_field(sample, self.image_keys)
        data = sample.fields[field] if field else b""
        header = read_header(data, self.cfg.min_size, self.cfg.max_pixels) if data else None
        if header is None or header[0] * header[1] > DEVICE_MAX_PIXELS or not _ends(data):
            return None
        width, height, orientation = header
        if EXIF_FLIPS.get(orientation, _AS_STORED)[2]:
            width, height = height, width
        return Deferred(sample, data, width, height, orientation, caption_text(sample), metadata_text(sample))

    # -- on the main thread ---------------------------------------------------------------------------

    def model_input(self, batch: Sequence[Preprocessed | Deferred]) -> tuple[ModelInput, list[Failure]]:
        """The batch's pixels on the device, the samples they belong to, and the deferred samples
        that failed on the CPU path too (left out of the batch)."""
        at = [i for i, item in enumerate(batch) if isinstance(item, Deferred)]
        if not at:
            return host_input(batch), []
        self._announce()
        crops = dict(zip(at, self._decode_all([batch[i] for i in at])))
        kept: list[Preprocessed | Deferred] = []
        rows: list[torch.Tensor | np.ndarray] = []
        failures: list[Failure] = []
        for i, item in enumerate(batch):
            crop = crops[i] if isinstance(item, Deferred) else item.pixels
            if crop is None:  # the device could not: the CPU path decides, as it would have on the decode thread
                item = self._cpu_path(item.sample)
                if isinstance(item, Failure):
                    failures.append(item)
                    continue
                crop = item.pixels
            kept.append(item)
            rows.append(crop)
        on_device = sum(isinstance(item, Deferred) for item in kept)
        self.counts = DecodeCounts(self.counts.device + on_device, self.counts.cpu_path + len(at) - on_device)
        return ModelInput(kept, self._stack(rows)), failures

    def _decode_all(self, deferred: list[Deferred]) -> list[torch.Tensor | None]:
        """(3, R, R) uint8 crops on the device, None where the CPU path should decide."""
        try:
            images = self.backend([d.data for d in deferred])
        except _DECODE_ERRORS:
            images = [self._decode_one(d.data) for d in deferred]
        return [None if image is None else self._crop(d, image) for d, image in zip(deferred, images)]

    def _decode_one(self, data: bytes) -> torch.Tensor | None:
        try:
            return self.backend([data])[0]
        except _DECODE_ERRORS as err:
            log.debug("device decode failed (%s): the CPU path decides", err)
            return None

    def _crop(self, item: Deferred, image: torch.Tensor) -> torch.Tensor | None:
        swap = EXIF_FLIPS.get(item.orientation, _AS_STORED)[2]
        stored = (item.width, item.height) if swap else (item.height, item.width)
        if tuple(image.shape) != (3, *stored):
            return None  # not the size the header promised: the geometry would be off
        return center_crop(orient(image, item.orientation), self.cfg.resolution, (item.width, item.height))

    def _cpu_path(self, sample: Sample) -> Preprocessed | Failure:
        cfg = self.cfg
        return preprocess(sample, self.image_keys, cfg.resolution, cfg.min_size, max_pixels=cfg.max_pixels,
                          fast=cfg.fast_jpeg)

    def _stack(self, rows: list[torch.Tensor | np.ndarray]) -> torch.Tensor:
        r = self.cfg.resolution
        out = torch.empty((len(rows), r, r, 3), dtype=torch.uint8, device=self.device)
        for i, row in enumerate(rows):
            # (A copy of a read-only array, as Pillow's are: torch warns on those even to read them.)
            out[i].copy_(row.permute(1, 2, 0) if isinstance(row, torch.Tensor)
                         else torch.from_numpy(np.require(row, requirements=("C", "W"))))
        return out

    def _announce(self) -> None:
        if not self._announced:
            self._announced = True
            log.info("preprocess.decoder: gpu on %s: JPEGs decoded by %s", self.device, self.backend_name)



def shard_record(decoder: DeviceDecoder | None, since: DecodeCounts | None) -> dict:
    """A shard marker's ``decoder``: which decoder made its pixels and, for ``gpu``, how many deferred
    JPEGs the device decoded (``device_decoded``) and how many took the CPU path after all
    (``cpu_path``) since the counts ``since``."""
    if decoder is None or since is None:
        return {"name": "cpu"}
    return {"name": "gpu", "backend": decoder.backend_name, "device_decoded": decoder.counts.device - since.device,
            "cpu_path": decoder.counts.cpu_path - since.cpu_path}


@dataclass
class ModelInput:
    """A batch ready for the encoder: the samples kept, in batch order, and their pixels stacked.

    pixels: (B, R, R, 3) uint8, a host array ((B, V, R, R, 3) with several views) or a tensor on the
    device (``preprocess.decoder: gpu``)."""

    samples: list[Preprocessed | Deferred]
    pixels: np.ndarray | torch.Tensor
    host: Sequence[np.ndarray] | None = None  # each sample's own pixels, where they are on the host

    def host_pixels(self, rows: Sequence[int]) -> Sequence[np.ndarray]:
        """The pixels of ``rows`` as host arrays that outlive the batch (``pixels`` may be a staging
        buffer the next batch reuses), each copied back from the device only when read: the
        fidelity audit keeps a few images per shard."""
        if self.host is not None:
            return [self.host[r] for r in rows]
        return _HostRows(self.pixels, list(rows))


def host_input(batch: Sequence[Preprocessed], stack: Callable[[list[np.ndarray]], np.ndarray] = np.stack) -> ModelInput:
    """A batch decoded on the CPU: its pixels stacked on the host by ``stack`` (the encoder's
    ``stage``: a reused, page-locked buffer) for the encoder to upload."""
    images = [p.pixels for p in batch]
    return ModelInput(list(batch), stack(images), images)


class _HostRows(Sequence):
    def __init__(self, pixels: np.ndarray | torch.Tensor, rows: list[int]):
        self.pixels, self.rows = pixels, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        row = self.pixels[self.rows[i]]
        return row.cpu().numpy() if isinstance(row, torch.Tensor) else row


def orient(image: torch.Tensor, orientation: int | None) -> torch.Tensor:
    """A (C, H, W) tensor as EXIF ``orientation`` says it is shown (``jpeg_decode.orient`` for tensors)."""
    rows, columns, swap = EXIF_FLIPS.get(orientation, _AS_STORED)
    flips = [d for d, flip in ((-2, rows), (-1, columns)) if flip]
    image = image.flip(flips) if flips else image
    return image.transpose(-2, -1) if swap else image


def center_crop(image: torch.Tensor, resolution: int, source_size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8 at full size -> the (3, R, R) uint8 crop of ``images.resize_center_crop``."""
    if tuple(image.shape[-2:]) == (resolution, resolution):
        return image
    crop = resize_box(image.unsqueeze(0).float(), resolution, source_size, 1)[0]
    # Bicubic overshoots at edges: clamp before the cast, which would wrap.
    return crop.round().clamp_(0, 255).to(torch.uint8)


def _ends(data: bytes) -> bool:
    """An end-of-image marker after the last scan's start: the JPEG was not cut short. (Entropy-coded
    data stuffs every 0xFF, so neither marker occurs inside it; an EXIF thumbnail's come before.)
    nvJPEG may decode a cut file without an error; the CPU path reports it as before."""
    return data.rfind(_EOI) > data.rfind(_SOS) >= 0


def pick_backend(device: torch.device) -> tuple[Backend, str]:
    """torchvision's ``decode_jpeg`` on ``device`` (nvJPEG on CUDA), or the stand-in on a CPU device."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, RuntimeError, OSError) as err:  # absent, or built for another torch
        if device.type != "cpu":
            raise ConfigError(f"preprocess.decoder: gpu needs torchvision: pip install torchvision matching your "
                              f"torch {torch.__version__} (importing it failed: {err})") from err
        return _stand_in, "a CPU stand-in for nvJPEG (simplejpeg at full size; torchvision is not installed)"
    on = device if device.type == "cuda" else torch.device("cpu")

    def torchvision_decode(jpegs: list[bytes]) -> list[torch.Tensor]:
        # frombuffer over a copy: torch warns on (and must not write to) read-only bytes.
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        return [image.to(device) for image in decode_jpeg(tensors, mode=ImageReadMode.RGB, device=on)]

    return torchvision_decode, "nvJPEG (torchvision.io.decode_jpeg)" if on.type == "cuda" else \
        "torchvision.io.decode_jpeg on the CPU"


def _stand_in(jpegs: list[bytes]) -> list[torch.Tensor]:
    # strict: a libjpeg warning (premature end, corrupt data) raises, as a failed nvJPEG decode does.
    return [torch.from_numpy(simplejpeg.decode_jpeg(data, "RGB", strict=True)).permute(2, 0, 1) for data in jpegs]
