"""Several views per sample through one :class:`~vqpipe.encode.encoder.TokenEncoder` call: the
views of a batch are encoded together, so V views cost V images of model time and one decode."""

from __future__ import annotations

import numpy as np

from vqpipe.encode.encoder import EncodedBatch, TokenEncoder


def encode_views(encoder: TokenEncoder, pixels: np.ndarray) -> EncodedBatch:
    """``(B, R, R, 3)`` -> codes ``(B, h, w)``; ``(B, V, R, R, 3)`` -> codes ``(B, V, h, w)`` and
    latents ``(B, V, C, h, w)``, a sample non-finite if any of its views is."""
    if pixels.ndim == 4:
        return encoder(pixels)
    b, v = pixels.shape[:2]
    flat = encoder(pixels.reshape(b * v, *pixels.shape[2:]))
    return EncodedBatch(flat.codes.reshape(b, v, *flat.codes.shape[1:]),
                        flat.latents.reshape(b, v, *flat.latents.shape[1:]),
                        flat.finite.reshape(b, v).all(axis=1), flat.amp_fallback)
