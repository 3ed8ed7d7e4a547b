"""Batches of uint8 pixels -> VQ codes and scaled latents, on the worker's device.

The GPU stage of the pipeline: holds the model (loaded and compiled once per worker) and runs
:meth:`vqpipe.VQModel.tokenize` under the configured precision, with the guards a multi-day run
needs (non-finite latents under AMP, CUDA out-of-memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from vqpipe import faults
from vqpipe.config import RunConfig
from vqpipe.encode import precision as precisions
from vqpipe.encode.cpu_passes import Streams, cache_per_stream, cpu_micro_batch, last_level_cache, start_streams
from vqpipe.model.vq_model import VQModel

log = logging.getLogger(__name__)


@dataclass
class EncodedBatch:
    codes: np.ndarray  # (B, h, w) int64
    latents: np.ndarray  # (B, D, h, w) float32, already multiplied by scaling_factor
    finite: np.ndarray  # (B,) bool: False where latents stayed non-finite even in fp32
    amp_fallback: bool  # the batch was re-encoded in fp32 because AMP produced NaN/Inf
    precision: str = "fp32"  # what these codes were computed in (fp32 after an AMP fallback)


class TokenEncoder:
    """``(B, R, R, 3)`` uint8 pixels -> :class:`EncodedBatch`: a host array (uploaded as uint8), or a
    tensor already on the device (``preprocess.decoder: gpu``: :mod:`vqpipe.input.device_decode`).

    ``compile`` wraps the encoder in ``torch.compile`` with static shapes; partial batches are
    padded up to the forward-pass size so the last batch of every shard does not trigger a
    recompile. ``micro_batch`` is that size: ``auto`` = the whole batch on a GPU, on a CPU as many
    images as keep the first stage's activations in cache. On a CPU the passes run on ``streams``
    single-threaded streams at once (``auto`` = the caller's torch thread count; an uncompiled
    encoder only): see :mod:`vqpipe.encode.cpu_passes`.

    ``precision`` is resolved once (:mod:`vqpipe.encode.precision`). An AMP batch whose latents
    come out non-finite is re-encoded in fp32; after ``fallback_after`` such batches in a row the
    encoder moves to the next safer precision for good (``switches`` records each move).
    """

    def __init__(self, model: VQModel, device: torch.device, precision: str, compile: bool | str,
                 batch_size: int, value_range: tuple[float, float], micro_batch: int | str = "auto",
                 streams: int | str = "auto", fallback_after: int = 3, compile_backend: str = "inductor"):
        self.device = device
        self.model = model.to(device)
        self.precision = precisions.resolve_for(precision, device, model.config.force_upcast)
        self.fallback_after = fallback_after
        self.switches: list[dict] = []  # {"from", "to", "after_non_finite_batches"}, in order
        self._non_finite_in_a_row = 0
        self.compiled = compile is True or (compile == "auto" and device.type == "cuda")
        self.batch_size = batch_size
        self.micro_batch = micro_batch
        self.value_range = value_range
        low, high = value_range
        self._scale, self._offset = (high - low) / 255.0, low
        # channels_last on every device: cuDNN convolutions are fastest in it, NHWC pixels permuted to
        # NCHW already are, and on CPU (oneDNN) it took 8-25% less CPU time per image than the
        # default layout for the demo, tiny and LDM-f4 encoders (one thread, time.thread_time).
        # One fixed layout also keeps torch.compile from specialising on strides (a batch of 1 is
        # both layouts at once).
        self.memory_format = torch.channels_last
        self.model.to(memory_format=self.memory_format)
        self._tokenize: Callable = model.tokenize
        if self.compiled:
            # On CPU, freezing lets inductor treat the weights as constants and pre-pack them for
            # oneDNN: the demo encoder ran 31 img/s frozen vs 28 compiled unfrozen vs 26 eager
            # (tests/benchmarks/bench_model.py, 2 threads, 128 px, batch 16), codes identical.
            # Inference only, which is all this class does.
            # (Other backends, e.g. "eager" in tests of the padding, take no inductor options.)
            options = {"freezing": True} if device.type == "cpu" and compile_backend == "inductor" else None
            self._tokenize = torch.compile(model.tokenize, dynamic=False, backend=compile_backend, options=options)
        self.amp_fallback_batches = 0  # batches redone in fp32, over the encoder's life
        self._fixed_streams = None if streams == "auto" else int(streams)
        self._streams: Streams | None = None
        # The stream count _streams was made for; _streams stays None for 1, or if torch refused.
        self._streams_for = 1
        self._cache = last_level_cache() if device.type == "cpu" else None
        self._staging: np.ndarray | None = None  # stage()'s batch buffer, page-locked on CUDA

    @classmethod
    def from_config(cls, model: VQModel, device: torch.device, config: RunConfig) -> "TokenEncoder":
        """The encoder a worker runs for ``config`` (the driver's actors and ``vqpipe bench`` alike)."""
        return cls(model, device, config.model.precision, config.model.compile, config.model.batch_size,
                   config.preprocess.value_range, config.model.micro_batch,
                   fallback_after=config.model.fallback_after)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return precisions.autocast_dtype(self.precision)

    def _current_streams(self) -> Streams | None:
        """The streams for this call: ``auto`` follows the caller's torch thread count, so a Ray
        actor with N CPUs (torch on N threads) runs N streams. None on a GPU, and for a compiled
        encoder: dynamo's guards and caches are not documented as safe to call from several
        threads at once."""
        if self.device.type != "cpu" or self.compiled:
            return None
        want = self._fixed_streams or torch.get_num_threads()
        if want != self._streams_for:
            if self._streams:
                self._streams.close()
            self._streams, self._streams_for = start_streams(want), want
        return self._streams

    @property
    def streams(self) -> int:
        """How many passes run at once (on a CPU; 1 elsewhere)."""
        current = self._current_streams()
        return current.streams if current else 1

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray | torch.Tensor) -> EncodedBatch:
        uint8 = pixels.dtype == (torch.uint8 if isinstance(pixels, torch.Tensor) else np.uint8)
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or not uint8:
            raise ValueError(f"expected (B, R, R, 3) uint8 pixels, got {pixels.dtype} {tuple(pixels.shape)}")
        x = self._to_device(pixels)
        used = self.precision
        codes, latents = self.encode_tensor(x, used)
        latents = faults.poison_latents(latents, used)
        finite = amp_finite = _finite_rows(latents)
        amp_fallback = used in precisions.AMP and not bool(finite.all())
        if amp_fallback:
            # fp16 overflow is a known failure of some VQ checkpoints: redo the batch in fp32, in the
            # same passes (and under the same out-of-memory guard) as any batch.
            self.amp_fallback_batches += 1
            codes, latents = self.encode_tensor(x, "fp32")
            finite = _finite_rows(latents)
        # AMP is to blame only where fp32 succeeded: an image that is NaN/Inf in fp32 too is not its fault.
        self._count_non_finite(used, amp_fallback and bool((finite & ~amp_finite).any()))
        return EncodedBatch(codes.cpu().numpy(), latents.cpu().numpy(), finite.cpu().numpy(), amp_fallback,
                            "fp32" if amp_fallback else used)

    def _count_non_finite(self, used: str, non_finite: bool) -> None:
        """Learn from repeated overflow: ``fallback_after`` non-finite AMP batches in a row move
        this encoder to the next safer precision for the rest of the worker's life."""
        if used not in precisions.AMP:
            return
        self._non_finite_in_a_row = self._non_finite_in_a_row + 1 if non_finite else 0
        if not self.fallback_after or self._non_finite_in_a_row < self.fallback_after:
            return
        safer = precisions.resolve_for(precisions.safer(used), self.device, force_upcast=False)
        self.switches.append({"from": used, "to": safer, "after_non_finite_batches": self._non_finite_in_a_row})
        log.warning("%d %s batches in a row came out NaN/Inf (each redone in fp32): encoding in %s for the rest "
                    "of this worker's life", self._non_finite_in_a_row, used, safer)
        self.precision, self._non_finite_in_a_row = safer, 0

    def stage(self, images: list[np.ndarray]) -> np.ndarray:
        """Stack same-shaped uint8 images into a batch for ``__call__``, in a buffer reused from
        batch to batch: page-locked on CUDA, so the upload is one DMA with no ``pin_memory()``
        (a fresh page-locked allocation and a second copy per batch). The result is valid until
        the next call."""
        shape = (len(images), *images[0].shape)
        size = int(np.prod(shape))
        if self._staging is None or self._staging.size < size:
            buffer = torch.empty(max(size, self.batch_size * size // len(images)), dtype=torch.uint8)
            self._staging = (buffer.pin_memory() if self.device.type == "cuda" else buffer).numpy()
        out = self._staging[:size].reshape(shape)
        return np.stack(images, out=out)

    def _to_device(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        # Upload uint8 (4x fewer bytes than fp32) and scale on the device; a tensor there already
        # stays. Pixels from stage() are page-locked on CUDA already, so the upload is one DMA.
        if isinstance(pixels, torch.Tensor):
            tensor = pixels.to(self.device)
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
        tensor = tensor.permute(0, 3, 1, 2)
        return tensor.float().mul_(self._scale).add_(self._offset).contiguous(memory_format=self.memory_format)

    def pass_size(self, height: int, width: int) -> int:
        """Images per forward pass for inputs of this size."""
        return self._plan(height, width)[0]

    def _plan(self, height: int, width: int) -> tuple[int, Streams | None]:
        """Pass size and streams for this caller (on its thread: a stream thread has one torch
        thread of its own and would see a different machine)."""
        streams = self._current_streams()
        if isinstance(self.micro_batch, int):
            return min(self.micro_batch, self.batch_size), streams
        if self.device.type != "cpu":
            return self.batch_size, streams
        cache = cache_per_stream(streams.streams if streams else 1, self._cache)
        return cpu_micro_batch(self.batch_size, self.model.config.block_out_channels[0], height, width, cache), streams

    def describe(self, resolution: int) -> str:
        """How a batch of ``resolution`` px images runs, for logs: ``batch 16 in passes of 2 on 2
        streams`` on a CPU."""
        pass_size, streams = self._plan(resolution, resolution)
        if pass_size >= self.batch_size:
            return f"batch {self.batch_size} in one pass"
        on = f" on {streams.streams} single-threaded streams" if streams else ""
        return f"batch {self.batch_size} in passes of {pass_size}{on}"

    def encode_tensor(self, x: torch.Tensor, precision: str | None = None,
                      eager: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled images already on the device -> ``(codes, latents)``, as a batch is run: in
        passes, on streams, with the out-of-memory guard (no NaN check). ``precision`` defaults to
        the encoder's; ``eager`` skips the compiled graph (and its padding): the fidelity audit's
        reference is the model itself in fp32."""
        precision = precision or self.precision
        pass_size, streams = self._plan(*x.shape[-2:])
        if x.shape[0] <= pass_size:
            return self._encode_pass(x, pass_size, precision, eager)
        run = streams.map if streams else lambda fn, items: [fn(item) for item in items]
        parts = run(lambda part: self._encode_pass(part, pass_size, precision, eager), x.split(pass_size))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _encode_pass(self, x: torch.Tensor, pass_size: int, precision: str,
                     eager: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            with precisions.compute(precision, self.device.type):
                return self._encode_padded(x, pass_size, precisions.autocast_dtype(precision), eager)
        except torch.OutOfMemoryError:
            if x.shape[0] == 1:
                raise
            torch.cuda.empty_cache()
            self.batch_size = max(1, x.shape[0] // 2)
            log.warning("CUDA out of memory at batch %d: halving the batch size to %d", x.shape[0], self.batch_size)
            return self.encode_tensor(x, precision, eager)

    def _encode_padded(self, x: torch.Tensor, pass_size: int, dtype: torch.dtype | None,
                       eager: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        if eager:
            return self.model.tokenize(x, autocast_dtype=dtype)
        if not self.compiled or n >= pass_size:
            return self._tokenize(x, autocast_dtype=dtype)
        pad = x[-1:].expand(pass_size - n, *x.shape[1:])
        padded = torch.cat([x, pad]).contiguous(memory_format=self.memory_format)
        codes, latents = self._tokenize(padded, autocast_dtype=dtype)
        return codes[:n], latents[:n]

    @torch.inference_mode()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` on the device -> images ``(B, 3, H, W)`` in the model's value range,
        decoded eagerly in fp32 (TF32 off on CUDA)."""
        with precisions.compute("fp32", self.device.type):
            return self.model.decode_codes(codes)

    def to_model_input(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, R, R, 3)`` pixels (host or device) -> the scaled tensor the model sees, on the device."""
        return self._to_device(pixels)


def _finite_rows(latents: torch.Tensor) -> torch.Tensor:
    """(B,) bool: which rows hold only finite values. A row's float32 sum is non-finite whenever
    the row holds a NaN or an Inf, so only rows whose sum is non-finite (or overflowed) get the
    elementwise check: one reduction instead of a full-size boolean tensor for every batch."""
    rows = latents.flatten(1)
    finite = torch.isfinite(rows.sum(dim=1, dtype=torch.float32))
    if not bool(finite.all()):
        suspect = (~finite).nonzero().flatten()
        finite[suspect] = torch.isfinite(rows[suspect]).all(dim=1)
    return finite
