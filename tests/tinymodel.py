"""The small random VQModel the bookkeeping tests run (f2, 64 codes): fast on a CPU, and enough to
check the pipeline's arithmetic; quality checks use the shipped demo tokenizer."""

from __future__ import annotations

import torch

from vqpipe import VQModel

TINY = dict(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, num_vq_embeddings=64)


def tiny_model(seed: int = 0) -> VQModel:
    """The tiny model with weights drawn from its own seeded generator (global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return VQModel(**TINY).eval()
