"""vqpipe: pre-tokenize a WebDataset image corpus into VQ codes and latents, written to Parquet.

ARCHITECTURE — data flows one way; each stage is a folder, each arrow a module in it:

    shard URL --input/urls--> tar members --input/shards--> samples --input/filters--> kept samples
      --input/images (+ input/views)--> pixels --input/prefetch--> batches
      --encode/encoder (VQModel.tokenize; encode/views for several per image)--> codes + scaled latents
      --output/sink (+ output/conditioning)--> {stem}.parquet + commit marker (names: output/layout)

``run/shard_job.process_shard`` runs that chain for one shard with no Ray in it; ``run/driver``
(the only Ray module) hands shard URLs from a queue to GPU-pinned actors that each hold one model;
``run/plan`` decides what is left to do, ``run/manifest`` what an output folder may hold,
``run/execute`` runs one plan start to end; ``cli`` validates the config (``config``) at the edge.

The encoder runs in ``model.precision`` (names and the ``auto`` rule: ``encode/precision``); before
its marker is written, every shard re-encodes a few images in fp32 (``encode/audit``) and records
how far its codes are from the model's exact ones.

Reading back (``read/``): ``tokens`` (Arrow / NumPy), ``dataset`` (a PyTorch ``IterableDataset``),
``inspect`` (``vqpipe inspect``), ``decode_job`` (``vqpipe decode``: tokens back to images, with
checks; ``views`` lays a multi-view output out one view per row for it). The model lives in
``model/`` (``loading`` resolves ``demo`` and ``hf://`` paths); ``bench/`` measures one worker
(``vqpipe bench``).

Sharing and other engines: ``publish/`` (``vqpipe publish``: a finished output and its dataset
``card`` to the Hugging Face Hub); ``ray_data`` (the same tokenizer as a Ray Data ``map_batches``
class, and outputs read back as Ray Data tensors; it imports Ray by design).
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
