"""The fidelity audit: a few of a shard's images re-encoded in fp32, so every shard says how far
its stored codes are from the model's exact ones.

:class:`AuditSampler` keeps a seeded reservoir sample of the images a shard writes (the same
keys on every attempt of a shard); :func:`run_audit` re-encodes them with the model itself in
fp32 on the same device (eager, TF32 off), compares codes and latents with what was stored,
and decodes the stored codes to measure reconstruction. The record it returns is the marker's
``audit``; :mod:`vqpipe.encode.fidelity` sums records over shards.
"""

from __future__ import annotations

import collections
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from vqpipe.encode.encoder import TokenEncoder

# A position whose fp32 latent vector is this close to zero counts its error against this norm.
_MIN_NORM = 1e-8


@dataclass
class AuditSample:
    index: int  # position among the shard's written images
    key: str
    pixels: np.ndarray  # (R, R, 3) uint8, what the model was given
    codes: np.ndarray  # (h, w), as written
    latents: np.ndarray  # (D, h, w) float32, scaled, before the storage dtype
    precision: str  # what the codes were computed in


class AuditSampler:
    """A uniform sample of ``size`` written images (reservoir sampling, Algorithm R), seeded by the
    shard's stem: a shard's size is not known until its tar ends."""

    def __init__(self, size: int, stem: str):
        self.size, self.seen = size, 0
        self.picked: list[AuditSample] = []
        self._rng = np.random.default_rng(zlib.crc32(stem.encode()))

    def offer(self, keys: list[str], pixels: list[np.ndarray], codes: np.ndarray, latents: np.ndarray,
              precision: str) -> None:
        """Consider a batch of written images (copies are kept: the batch arrays are freed)."""
        if not self.size:
            self.seen += len(keys)
            return
        for i, key in enumerate(keys):
            slot = len(self.picked) if len(self.picked) < self.size else int(self._rng.integers(self.seen + 1))
            if slot < self.size:
                sample = AuditSample(self.seen, key, pixels[i].copy(), codes[i].copy(), latents[i].copy(), precision)
                self.picked[slot:slot + 1] = [sample]
            self.seen += 1

    def samples(self) -> list[AuditSample]:
        return sorted(self.picked, key=lambda s: s.index)


def skipped(reason: str, precision: str | None = None) -> dict:
    """The marker's ``audit`` when nothing was audited, saying why."""
    return {"precision": precision, "samples": 0, "skipped": reason}


@torch.inference_mode()
def run_audit(encoder: TokenEncoder, samples: list[AuditSample], store_float16: bool) -> dict:
    """Re-encode ``samples`` in fp32 and compare: the marker's ``audit`` record.

    ``store_float16``: the latents were stored as float16, so their re-quantized codes are checked
    against the fp32 codes too (``stored_code_agreement``).
    """
    if not samples:
        return skipped("no images written")
    x = encoder.to_model_input(np.stack([s.pixels for s in samples]))
    codes32, latents32 = encoder.encode_tensor(x, "fp32", eager=True)
    stored = torch.from_numpy(np.stack([s.codes for s in samples])).to(encoder.device).long()
    latents = torch.from_numpy(np.stack([s.latents for s in samples])).to(encoder.device)
    rel = _relative_errors(latents, latents32)
    record = {
        "precision": _precision(samples), "samples": len(samples), "keys": [s.key for s in samples],
        "code_agreement": _share(stored == codes32),
        "latent_max_rel_err": _round(rel.max()), "latent_mean_rel_err": _round(rel.mean()),
    }
    if store_float16:
        requantized = encoder.model.quantize.codes(latents.half().float() / encoder.model.config.scaling_factor)
        record["stored_code_agreement"] = _share(requantized == codes32)
    psnr = _psnr(encoder.decode_codes(stored), x, encoder.value_range)
    record["psnr_db"] = {"mean": _round(psnr.mean(), 3), "min": _round(psnr.min(), 3)}
    return record


def _relative_errors(latents: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per code position: |h - h_fp32| / |h_fp32| over the latent channels, the quantity that
    decides whether a position's nearest codeword moves."""
    error = (latents.float() - reference.float()).norm(dim=1)
    return error / reference.float().norm(dim=1).clamp_min(_MIN_NORM)


def _psnr(reconstruction: torch.Tensor, target: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Per-image PSNR in dB, the peak being the full value range (as 255 is for uint8 pixels)."""
    low, high = value_range
    rec = reconstruction.float().clamp(low, high)
    mse = ((rec - target.float()) / (high - low)).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _precision(samples: list[AuditSample]) -> str:
    """The precision most of the audited codes came from (fp32 for a batch redone after overflow)."""
    return collections.Counter(s.precision for s in samples).most_common(1)[0][0]


def _share(equal: torch.Tensor) -> float:
    return _round(equal.float().mean())


def _round(value: torch.Tensor, digits: int = 6) -> float:
    return round(float(value), digits)
