"""vqpipe: pre-tokenize a WebDataset image corpus into VQ codes and latents, written to Parquet.

ARCHITECTURE — data flows one way; each arrow is a module:

    shard URL --urls--> samples --shards--> preprocessed images --images--> batches
      --encode (VQModel.tokenize)--> codes + scaled latents --sink--> {stem}.parquet + commit marker

``shard_job.process_shard`` runs that chain for one shard with no Ray in it; ``driver`` hands
shard URLs to GPU-pinned Ray actors that each hold one model; ``cli`` validates the config
(``config``) at the edge and starts the driver. The model lives in ``vqpipe.model``.
"""

from vqpipe.model import VQModel

__version__ = "0.1.0"
__all__ = ["VQModel", "__version__"]
