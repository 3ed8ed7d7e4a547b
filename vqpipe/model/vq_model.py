"""``VQModel``: the VQ-VAE of van den Oord et al. as shipped in diffusers, re-implemented.

Same constructor arguments and defaults, same state-dict keys, same ``encode`` / ``decode`` /
``forward`` semantics as ``diffusers.VQModel``; plus :meth:`VQModel.tokenize`, the inference fast
path the pipeline runs (codes and scaled latents in one call).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vqpipe.encode.precision import autocast_dtype, resolve_for
from vqpipe.model.blocks import Decoder, Encoder
from vqpipe.model.config import VQModelConfig
from vqpipe.model.quantizer import VectorQuantizer


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


class VQModel(nn.Module):
    r"""A VQ-VAE: ``Encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> Decoder``.

    Args mirror ``diffusers.VQModel`` (see :class:`VQModelConfig` for defaults). Shapes, with
    ``f = 2 ** (len(block_out_channels) - 1)`` and ``D = vq_embed_dim or latent_channels``:
    image ``(B, in_channels, H, W)`` -> latents ``(B, D, H/f, W/f)`` -> codes ``(B, H/f, W/f)``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        # The arguments are declared once, as VQModelConfig's fields (diffusers declares them once
        # too, with register_to_config); the signature below is generated from them for help().
        super().__init__()
        config = VQModelConfig(*args, **kwargs)
        config.validate()
        self.config = config
        # Set by from_pretrained: sha256 of the weights file, recorded with every output for lineage.
        self.weights_sha256: str | None = None
        embed_dim = config.embed_dim
        c = config
        self.encoder = Encoder(c.in_channels, c.latent_channels, c.down_block_types, c.block_out_channels,
                               c.layers_per_block, c.norm_num_groups, c.act_fn, c.mid_block_add_attention)
        self.quant_conv = nn.Conv2d(c.latent_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(c.num_vq_embeddings, embed_dim, beta=0.25)
        self.post_quant_conv = nn.Conv2d(embed_dim, c.latent_channels, 1)
        self.decoder = Decoder(c.latent_channels, c.out_channels, c.up_block_types, c.block_out_channels,
                               c.layers_per_block, c.norm_num_groups, c.act_fn, c.norm_type, c.mid_block_add_attention)

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
        """The autocast dtype for a requested precision on ``device``, or ``None`` for the fp32
        tensor modes: :func:`vqpipe.encode.precision.resolve` with this checkpoint's ``force_upcast``."""
        return autocast_dtype(resolve_for(precision, device, self.config.force_upcast))

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


def _signature() -> inspect.Signature:
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default, annotation=f.type)
               for f in dataclasses.fields(VQModelConfig)]
    return inspect.Signature(params)


VQModel.__init__.__signature__ = _signature()
