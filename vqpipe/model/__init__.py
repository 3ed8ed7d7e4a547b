"""The VQ-VAE: building blocks, quantizer, the model and its diffusers-format checkpoints.

Names resolve lazily (PEP 562): ``from vqpipe.model import CheckpointError`` needs no torch.
"""

from __future__ import annotations

import importlib

from vqpipe.model.errors import CheckpointError

_LAZY = {"VQModel": "vqpipe.model.vq_model", "DecoderOutput": "vqpipe.model.vq_model",
         "VQEncoderOutput": "vqpipe.model.vq_model", "VQModelConfig": "vqpipe.model.config"}

__all__ = ["CheckpointError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
