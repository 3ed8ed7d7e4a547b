"""Encoder and decoder building blocks of the VQ-VAE, with diffusers' module names.

The attribute names (``resnets``, ``downsamplers.0.conv``, ``to_q``, ``spatial_norm.conv_y`` ...)
are the state-dict contract with diffusers checkpoints: rename nothing here.

Tensors are ``(B, C, H, W)`` unless said otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# diffusers' VAE blocks use this epsilon everywhere, whatever the checkpoint says.
EPS = 1e-6

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}
DOWN_BLOCK_TYPES = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
UP_BLOCK_TYPES = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"act_fn={name!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class SpatialNorm(nn.Module):
    """MoVQ's spatially conditioned GroupNorm: ``norm(f) * conv_y(zq) + conv_b(zq)``.

    ``f``: ``(B, F, H, W)``; ``zq``: quantized latents ``(B, Z, h, w)``, nearest-upsampled to ``(H, W)``.
    """

    def __init__(self, f_channels: int, zq_channels: int):
        super().__init__()
        # 32 groups is hard-coded in diffusers (and MoVQ), independent of norm_num_groups.
        self.norm_layer = nn.GroupNorm(num_channels=f_channels, num_groups=32, eps=EPS, affine=True)
        self.conv_y = nn.Conv2d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = nn.Conv2d(zq_channels, f_channels, kernel_size=1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block. ``zq_channels`` switches both norms to :class:`SpatialNorm`."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str, zq_channels: int | None = None):
        super().__init__()
        self.spatial = zq_channels is not None
        self.norm1 = self._norm(in_channels, groups, zq_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = self._norm(out_channels, groups, zq_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    @staticmethod
    def _norm(channels: int, groups: int, zq_channels: int | None) -> nn.Module:
        if zq_channels is None:
            return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=EPS, affine=True)
        return SpatialNorm(channels, zq_channels)

    def _apply_norm(self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
        return norm(x, zq) if self.spatial else norm(x)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.nonlinearity(self._apply_norm(self.norm1, x, zq))
        h = self.conv1(h)
        h = self.nonlinearity(self._apply_norm(self.norm2, h, zq))
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over the ``H*W`` positions, with a residual connection.

    Normalised by GroupNorm (``group_norm``) or, in the MoVQ decoder, by :class:`SpatialNorm`
    (``spatial_norm``). Older checkpoints call the projections ``query/key/value/proj_attn``;
    :mod:`vqpipe.model.checkpoint` renames them on load, as diffusers does.
    """

    def __init__(self, channels: int, groups: int | None, zq_channels: int | None = None):
        super().__init__()
        self.group_norm = None if groups is None else nn.GroupNorm(groups, channels, eps=EPS, affine=True)
        self.spatial_norm = None if zq_channels is None else SpatialNorm(channels, zq_channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # Index 1 is diffusers' (parameter-free) dropout; keeping the ModuleList keeps the key `to_out.0`.
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        residual = x
        if self.spatial_norm is not None:
            x = self.spatial_norm(x, zq)
        b, c, h, w = x.shape
        if self.group_norm is not None:
            x = self.group_norm(x)
        tokens = x.reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[0](out)
        return out.transpose(1, 2).reshape(b, c, h, w) + residual


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv with the asymmetric (0, 1, 0, 1) padding of the original VQGAN."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderBlock(nn.Module):
    """``DownEncoderBlock2D`` / ``AttnDownEncoderBlock2D``: resnets (each followed by attention
    when ``attention``), then an optional downsample."""

    def __init__(self, in_channels, out_channels, num_layers, groups, act_fn, attention: bool, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )
        if attention:
            self.attentions = nn.ModuleList(Attention(out_channels, groups) for _ in range(num_layers))
        else:
            self.attentions = None
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class DecoderBlock(nn.Module):
    """``UpDecoderBlock2D`` / ``AttnUpDecoderBlock2D``, optionally spatially conditioned on ``zq``."""

    def __init__(self, in_channels, out_channels, num_layers, groups, act_fn, attention: bool, upsample: bool, zq_channels):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn, zq_channels)
            for i in range(num_layers)
        )
        if attention:
            attn_groups = None if zq_channels is not None else groups
            self.attentions = nn.ModuleList(
                Attention(out_channels, attn_groups, zq_channels) for _ in range(num_layers)
            )
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, zq)
            if self.attentions is not None:
                x = self.attentions[i](x, zq)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """``UNetMidBlock2D``: resnet, (attention), resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool, zq_channels: int | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, groups, act_fn, zq_channels) for _ in range(2))
        attn_groups = None if zq_channels is not None else groups
        # diffusers keeps a `None` placeholder when attention is off; nn.ModuleList cannot hold
        # None, and an empty list yields the same (empty) state dict.
        self.attentions = nn.ModuleList([Attention(channels, attn_groups, zq_channels)] if add_attention else [])

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        x = self.resnets[0](x, zq)
        if len(self.attentions):
            x = self.attentions[0](x, zq)
        return self.resnets[1](x, zq)


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` -> latents ``(B, out_channels, H/f, W/f)``,
    ``f = 2 ** (len(block_out_channels) - 1)``."""

    def __init__(self, in_channels, out_channels, down_block_types, block_out_channels, layers_per_block,
                 norm_num_groups, act_fn, mid_block_add_attention):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        blocks, channels = [], block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            blocks.append(EncoderBlock(
                channels, block_out_channels[i], layers_per_block, norm_num_groups, act_fn,
                attention=block_type == "AttnDownEncoderBlock2D",
                downsample=i < len(block_out_channels) - 1,
            ))
            channels = block_out_channels[i]
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(block_out_channels[-1], norm_num_groups, act_fn, mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[-1], num_groups=norm_num_groups, eps=EPS)
        self.conv_act = activation("silu")  # diffusers hard-codes SiLU here, whatever act_fn says
        self.conv_out = nn.Conv2d(block_out_channels[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents ``(B, in_channels, h, w)`` -> image ``(B, out_channels, h*f, w*f)``.

    With ``norm_type="spatial"`` every norm is conditioned on the quantized latents ``zq``
    (``(B, in_channels, h, w)``), which must then be passed to :meth:`forward`.
    """

    def __init__(self, in_channels, out_channels, up_block_types, block_out_channels, layers_per_block,
                 norm_num_groups, act_fn, norm_type, mid_block_add_attention):
        super().__init__()
        zq_channels = in_channels if norm_type == "spatial" else None
        reversed_channels = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(in_channels, reversed_channels[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(reversed_channels[0], norm_num_groups, act_fn, mid_block_add_attention, zq_channels)
        blocks, channels = [], reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            blocks.append(DecoderBlock(
                channels, reversed_channels[i], layers_per_block + 1, norm_num_groups, act_fn,
                attention=block_type == "AttnUpDecoderBlock2D",
                upsample=i < len(block_out_channels) - 1,
                zq_channels=zq_channels,
            ))
            channels = reversed_channels[i]
        self.up_blocks = nn.ModuleList(blocks)
        if zq_channels is None:
            self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=EPS)
        else:
            self.conv_norm_out = SpatialNorm(block_out_channels[0], zq_channels)
        self.conv_act = activation("silu")
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv_in(x)
        x = self.mid_block(x, zq)
        for block in self.up_blocks:
            x = block(x, zq)
        x = self.conv_norm_out(x, zq) if zq is not None else self.conv_norm_out(x)
        return self.conv_out(self.conv_act(x))
