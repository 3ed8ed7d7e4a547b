"""``VQModel``: the VQ-VAE of van den Oord et al. as shipped in diffusers, re-implemented.

Same constructor arguments and defaults, same state-dict keys, same ``encode`` / ``decode`` /
``forward`` semantics as ``diffusers.VQModel``; plus :meth:`VQModel.tokenize`, the inference fast
path the pipeline runs (codes and scaled latents in one call).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vqpipe.model.blocks import ACTIVATIONS, DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, Decoder, Encoder
from vqpipe.model.quantizer import VectorQuantizer

NORM_TYPES = ("group", "spatial")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _TupleOutput:
    """diffusers' outputs also index like tuples (``out[0]``); keep that for drop-in use."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def __getitem__(self, index: int):
        return self.to_tuple()[index]


@dataclass
class VQEncoderOutput(_TupleOutput):
    """``latents``: ``(B, vq_embed_dim, h, w)``, after ``quant_conv``, unquantized and unscaled."""

    latents: torch.Tensor


@dataclass
class DecoderOutput(_TupleOutput):
    """``sample``: ``(B, out_channels, H, W)``; ``commit_loss``: scalar (or ``(B,)`` zeros when not quantized)."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None


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


class VQModel(nn.Module):
    r"""A VQ-VAE: ``Encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> Decoder``.

    Args mirror ``diffusers.VQModel`` (see :class:`VQModelConfig` for defaults). Shapes, with
    ``f = 2 ** (len(block_out_channels) - 1)`` and ``D = vq_embed_dim or latent_channels``:
    image ``(B, in_channels, H, W)`` -> latents ``(B, D, H/f, W/f)`` -> codes ``(B, H/f, W/f)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 3,
        sample_size: int = 32,
        num_vq_embeddings: int = 256,
        norm_num_groups: int = 32,
        vq_embed_dim: int | None = None,
        scaling_factor: float = 0.18215,
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
        lookup_from_codebook: bool = False,
        force_upcast: bool = False,
    ):
        super().__init__()
        config = VQModelConfig(
            in_channels, out_channels, tuple(down_block_types), tuple(up_block_types), tuple(block_out_channels),
            layers_per_block, act_fn, latent_channels, sample_size, num_vq_embeddings, norm_num_groups,
            vq_embed_dim, float(scaling_factor), norm_type, bool(mid_block_add_attention),
            bool(lookup_from_codebook), bool(force_upcast),
        )
        config.validate()
        self.config = config
        # Set by from_pretrained: sha256 of the weights file, recorded with every output for lineage.
        self.weights_sha256: str | None = None
        embed_dim = config.embed_dim
        self.encoder = Encoder(in_channels, latent_channels, config.down_block_types, config.block_out_channels,
                               layers_per_block, norm_num_groups, act_fn, mid_block_add_attention)
        self.quant_conv = nn.Conv2d(latent_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(num_vq_embeddings, embed_dim, beta=0.25)
        self.post_quant_conv = nn.Conv2d(embed_dim, latent_channels, 1)
        self.decoder = Decoder(latent_channels, out_channels, config.up_block_types, config.block_out_channels,
                               layers_per_block, norm_num_groups, act_fn, norm_type, mid_block_add_attention)

    # -- diffusers API ---------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[torch.Tensor]:
        """Image ``(B, in_channels, H, W)`` -> ``VQEncoderOutput(latents=h)``, ``h`` after ``quant_conv``."""
        self._check_image(x)
        h = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents=h) if return_dict else (h,)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True,
               shape: tuple[int, ...] | None = None) -> DecoderOutput | tuple[torch.Tensor, torch.Tensor]:
        """Latents -> image, quantizing first unless ``force_not_quantize``.

        With ``force_not_quantize=True`` and ``lookup_from_codebook`` in the config, ``h`` holds code
        indices and ``shape`` is ``(B, h, w, D)``: the codewords are looked up (diffusers' semantics).
        """
        if not force_not_quantize:
            quant, commit_loss, _ = self.quantize(h)
        else:
            if self.config.lookup_from_codebook:
                quant = self.quantize.get_codebook_entry(h, shape)
            else:
                quant = h
            commit_loss = torch.zeros(h.shape[0], device=h.device, dtype=quant.dtype)
        sample = self.decoder(self.post_quant_conv(quant), quant if self.config.norm_type == "spatial" else None)
        return DecoderOutput(sample=sample, commit_loss=commit_loss) if return_dict else (sample, commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor, ...]:
        """Encode then decode. Returns the *decoded* ``DecoderOutput(sample, commit_loss)``, as diffusers'
        code does (its docs say ``VQEncoderOutput``; the code is what checkpoints were used with)."""
        dec = self.decode(self.encode(sample).latents)
        return dec if return_dict else (dec.sample, dec.commit_loss)

    # -- inference fast path ---------------------------------------------------------------------

    def tokenize(self, x: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``(B, in_channels, H, W)`` -> ``(codes (B, h, w) int64, latents (B, D, h, w) fp32)``.

        ``latents`` are ``h * scaling_factor`` with ``h`` the pre-quantization output of ``quant_conv``.
        The convolutions run under ``autocast_dtype`` when given; the codebook search always runs in
        fp32 (see :func:`vqpipe.model.quantizer.nearest_codes`).
        """
        self._check_image(x)
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            h = self.quant_conv(self.encoder(x))
        h = h.float()
        return self.quantize.codes(h), h * self.config.scaling_factor

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` -> image ``(B, out_channels, h*f, w*f)`` (codebook lookup, no re-quantization)."""
        quant = self.quantize.get_codebook_entry(codes.long(), (*codes.shape, self.config.embed_dim))
        return self.decoder(self.post_quant_conv(quant), quant if self.config.norm_type == "spatial" else None)

    def autocast_dtype(self, precision: str, device: torch.device | str) -> torch.dtype | None:
        """The autocast dtype for a requested precision (``auto``/``fp32``/``bf16``/``fp16``), or ``None``
        for plain fp32. ``auto`` is bf16 on CUDA, fp32 elsewhere. ``force_upcast`` in the config is the
        checkpoint's way of saying fp16 overflows: fp16 then falls back to bf16 (fp32 where bf16 is
        unsupported), with a warning."""
        device = torch.device(device)
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; choose one of ['auto', {', '.join(map(repr, PRECISIONS))}]")
        if precision == "fp16" and self.config.force_upcast:
            bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
            precision = "bf16" if bf16_ok else "fp32"
            warnings.warn(f"the checkpoint sets force_upcast (fp16 overflows in this model): using {precision} "
                          "instead of fp16", stacklevel=2)
        return None if precision == "fp32" else PRECISIONS[precision]

    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got a {x.ndim}-D tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected {self.config.in_channels} input channels, got {x.shape[1]} "
                             f"(shape {tuple(x.shape)})")

    # -- checkpoints (diffusers layout) ----------------------------------------------------------

    @classmethod
    def from_config(cls, config: VQModelConfig | dict[str, Any]) -> "VQModel":
        if isinstance(config, dict):
            config = VQModelConfig(**config)
        return cls(**dataclasses.asdict(config))

    @classmethod
    def from_pretrained(cls, path: str, subfolder: str | None = None, storage_options: dict | None = None,
                        allow_pickle: bool = False) -> "VQModel":
        """Load a diffusers-format folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
        from a local path or any fsspec URL. See :func:`vqpipe.model.checkpoint.load_pretrained`."""
        from vqpipe.model.checkpoint import load_pretrained

        return load_pretrained(cls, path, subfolder=subfolder, storage_options=storage_options,
                               allow_pickle=allow_pickle)

    def save_pretrained(self, path: str, storage_options: dict | None = None) -> None:
        """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (loadable by diffusers)."""
        from vqpipe.model.checkpoint import save_pretrained

        save_pretrained(self, path, storage_options=storage_options)

