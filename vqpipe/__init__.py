"""vqpipe: pre-tokenize a WebDataset image corpus into VQ codes and latents, written to Parquet.

ARCHITECTURE — data flows one way; each arrow is a module:

    shard URL --urls--> samples --shards--> preprocessed images --images--> batches (prefetch)
      --encode (VQModel.tokenize)--> codes + scaled latents --sink--> {stem}.parquet + commit marker

The encoder runs in ``model.precision`` (names and the ``auto`` rule: ``encode.precision``); before
its marker is written, every shard re-encodes a few images in fp32 (``encode.audit``) and records
how far its codes are from the model's exact ones.

``shard_job.process_shard`` runs that chain for one shard with no Ray in it; ``driver`` (the only
Ray module) hands shard URLs from a queue to GPU-pinned actors that each hold one model; ``plan``
decides what is left to do; ``cli`` validates the config (``config``) at the edge and starts it.

Reading back: ``io`` (Arrow / NumPy), ``dataset`` (a PyTorch ``IterableDataset``), ``stats``
(``vqpipe inspect``), ``verify`` (``vqpipe decode``: tokens back to images, with checks). The
model lives in ``vqpipe.model``; ``hub`` resolves ``hf://`` checkpoints.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["VQModel", "__version__"]


def __getattr__(name: str):
    # PEP 562: `import vqpipe` (and so `vqpipe --help`, the config, `inspect`) must not pay for torch.
    if name == "VQModel":
        from vqpipe.model.vq_model import VQModel

        return VQModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
