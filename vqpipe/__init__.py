"""vqpipe: pre-tokenize a WebDataset image corpus into VQ codes and latents, written to Parquet.

ARCHITECTURE — data flows one way; each arrow is a module:

    shard URL --urls--> samples --shards--> preprocessed images --images--> batches (prefetch)
      --encode (VQModel.tokenize)--> codes + scaled latents --sink--> {stem}.parquet + commit marker

``shard_job.process_shard`` runs that chain for one shard with no Ray in it; ``driver`` (the only
Ray module) hands shard URLs from a queue to GPU-pinned actors that each hold one model; ``plan``
decides what is left to do; ``cli`` validates the config (``config``) at the edge and starts it.

Reading back: ``io`` (Arrow / NumPy), ``dataset`` (a PyTorch ``IterableDataset``), ``stats``
(``vqpipe inspect``), ``verify`` (``vqpipe decode``: tokens back to images, with checks). The
model lives in ``vqpipe.model``; ``hub`` resolves ``hf://`` checkpoints.

Sharing and other engines: ``publish`` (``vqpipe publish``: a finished output and its
``dataset_card`` to the Hugging Face Hub); ``ray_data`` (the same tokenizer as a Ray Data
``map_batches`` class, and outputs read back as Ray Data tensors; it imports Ray by design).
"""

from vqpipe.model import VQModel

__version__ = "0.1.0"
__all__ = ["VQModel", "__version__"]
