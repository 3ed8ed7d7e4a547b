"""Vector quantizer (van den Oord et al.) with diffusers' ``VectorQuantizer`` state and semantics,
plus the fast nearest-codeword search the pipeline runs."""

from __future__ import annotations

import torch
from torch import nn

# Rows of z per distance block: a (rows x codebook) fp32 block is at most 256 MiB for a
# 65 536-entry codebook, whatever the batch.
_MAX_BLOCK_ELEMENTS = 1 << 26


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword (Euclidean) for each row of ``z``.

    ``z``: ``(N, D)``, ``codebook``: ``(K, D)`` -> ``(N,)`` int64.

    ``argmin ||z - e||^2 = argmin (||e||^2 - 2 z.e)``: one matmul instead of ``cdist``'s
    ``(N, K, D)`` work. The search always runs in fp32, even under autocast: in bf16 the
    ``-2 z.e`` term loses the few low bits that separate neighbouring codewords and the codes
    flip. Rows are processed in blocks so a 65 536-entry codebook does not need an ``(N, K)``
    buffer for a whole batch.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        codebook = codebook.float()
        e_sq = (codebook * codebook).sum(dim=1)  # (K,)
        rows = max(1, _MAX_BLOCK_ELEMENTS // codebook.shape[0])
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for start in range(0, z.shape[0], rows):
            block = z[start:start + rows]
            # addmm fuses e_sq - 2 z.e^T into one kernel.
            dist = torch.addmm(e_sq.unsqueeze(0), block, codebook.t(), beta=1.0, alpha=-2.0)
            out[start:start + rows] = dist.argmin(dim=1)
        return out


class VectorQuantizer(nn.Module):
    """Codebook ``embedding.weight`` of shape ``(n_e, vq_embed_dim)``.

    :meth:`forward` follows diffusers exactly (including the "legacy" placement of ``beta`` in the
    commitment loss that the released checkpoints were trained with), so training or fine-tuning
    code written against diffusers behaves the same.
    """

    def __init__(self, n_e: int, vq_embed_dim: int, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.n_e = n_e
        self.vq_embed_dim = vq_embed_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_e, vq_embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """``z``: ``(B, D, h, w)`` -> codes ``(B, h, w)`` int64."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        return nearest_codes(flat, self.embedding.weight).view(b, h, w)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """``z``: ``(B, D, h, w)`` -> ``(z_q, loss, (None, None, indices (B*h*w, 1)))`` as in diffusers."""
        indices = self.codes(z).reshape(-1)
        z_hwc = z.permute(0, 2, 3, 1)
        z_q = self.embedding(indices).view(z_hwc.shape).to(z.dtype)
        if self.legacy:
            loss = torch.mean((z_q.detach() - z_hwc) ** 2) + self.beta * torch.mean((z_q - z_hwc.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - z_hwc) ** 2) + torch.mean((z_q - z_hwc.detach()) ** 2)
        z_q = z_hwc + (z_q - z_hwc).detach()  # straight-through estimator
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, (None, None, indices.unsqueeze(1))

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
        """Codewords for ``indices``; with ``shape = (B, h, w, D)`` returned as ``(B, D, h, w)``."""
        z_q = self.embedding(indices.reshape(-1) if shape is not None else indices)
        if shape is None:
            return z_q
        return z_q.view(shape).permute(0, 3, 1, 2).contiguous()
