"""``VQModelConfig``: ``VQModel``'s constructor arguments, declared once, stored verbatim as ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vqpipe.model.blocks import ACTIVATIONS, DOWN_BLOCK_TYPES, UP_BLOCK_TYPES

NORM_TYPES = ("group", "spatial")


@dataclass(frozen=True)
class VQModelConfig:
    """The constructor's arguments, stored verbatim and written as ``config.json``."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 3
    sample_size: int = 32
    num_vq_embeddings: int = 256
    norm_num_groups: int = 32
    vq_embed_dim: int | None = None
    scaling_factor: float = 0.18215
    norm_type: str = "group"
    mid_block_add_attention: bool = True
    lookup_from_codebook: bool = False
    force_upcast: bool = False

    def __post_init__(self) -> None:
        # JSON and YAML give lists and ints; the config is hashable and compares equal either way.
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        object.__setattr__(self, "scaling_factor", float(self.scaling_factor))
        for key in ("mid_block_add_attention", "lookup_from_codebook", "force_upcast"):
            object.__setattr__(self, key, bool(getattr(self, key)))

    @property
    def embed_dim(self) -> int:
        return self.vq_embed_dim if self.vq_embed_dim is not None else self.latent_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            out[key] = list(out[key])
        return out

    def validate(self) -> None:
        """Refuse configs that diffusers accepts but cannot run, saying why."""
        n = len(self.block_out_channels)
        if n == 0 or len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) and "
                f"block_out_channels ({n}) must have the same, non-zero length: one entry per resolution level"
            )
        for name, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                     ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"{name} has {bad}; a VQModel supports {list(allowed)}")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type={self.norm_type!r}; choose one of {list(NORM_TYPES)}")
        for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "num_vq_embeddings",
                    "norm_num_groups"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.vq_embed_dim is not None and self.vq_embed_dim < 1:
            raise ValueError(f"vq_embed_dim must be >= 1 or None, got {self.vq_embed_dim}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        if self.norm_type == "spatial":
            self._validate_spatial()

    def _validate_spatial(self) -> None:
        if self.embed_dim != self.latent_channels:
            raise ValueError(
                f"norm_type='spatial' needs vq_embed_dim == latent_channels (got {self.vq_embed_dim} and "
                f"{self.latent_channels}): the MoVQ decoder conditions its norms on the quantized latents "
                "through convolutions built for latent_channels inputs, so diffusers crashes inside the decoder"
            )
        bad = [c for c in self.block_out_channels if c % 32]
        if bad:
            raise ValueError(
                f"norm_type='spatial' needs block_out_channels divisible by 32 (SpatialNorm uses 32 groups); got {bad}"
            )
