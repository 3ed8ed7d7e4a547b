"""Precision names, the ``auto`` rule, and what each name means to torch: the one place they live.

Names (``model.precision``, the Parquet metadata, commit markers, ``vqpipe bench``) are these
strings; torch is imported only when a name is turned into a dtype or a compute context, so the
config and the command line's face can use the names without paying for torch.

- ``fp32``: plain fp32, with TF32 off on CUDA (the model's exact codes; the audit's reference).
- ``tf32``: fp32 tensors, TF32 matmuls and convolutions (CUDA; on a CPU it is ``fp32``).
- ``fp16`` / ``bf16``: autocast to that dtype; the codebook search stays fp32.
- ``auto``: fp16 on CUDA, or bf16 when the checkpoint sets ``force_upcast`` (diffusers' flag for
  "overflows in fp16"); fp32 on a CPU, where AMP is slower and buys nothing.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Precision = Literal["auto", "fp32", "tf32", "fp16", "bf16"]
NAMES = ("fp32", "tf32", "fp16", "bf16")
AMP = ("fp16", "bf16")  # names that run under autocast (and can overflow)
# The next safer precision when a name keeps producing non-finite latents: bf16 keeps fp32's range.
SAFER = {"fp16": "bf16", "bf16": "fp32", "tf32": "fp32"}


def resolve(requested: str, device_type: str, force_upcast: bool, bf16_supported: bool = True) -> str:
    """The precision that runs for ``requested`` on a device of ``device_type`` (``cuda``, ``cpu``...).

    ``force_upcast`` is the checkpoint's word that fp16 overflows: fp16 (asked for or by ``auto``)
    becomes bf16, or fp32 where the device has no bf16; an explicit fp16 says so in a warning.
    """
    if requested not in ("auto", *NAMES):
        raise ValueError(f"precision={requested!r}; choose one of {['auto', *NAMES]}")
    cuda = device_type == "cuda"
    name = ("fp16" if cuda else "fp32") if requested == "auto" else requested
    if name == "tf32" and not cuda:
        name = "fp32"  # TF32 is a CUDA tensor-core mode; a CPU has only fp32
    if name == "fp16" and force_upcast:
        name = "bf16" if bf16_supported else "fp32"
        if requested == "fp16":
            warnings.warn(f"the checkpoint sets force_upcast (fp16 overflows in this model): using {name} "
                          "instead of fp16", stacklevel=3)
    if name == "bf16" and not bf16_supported:
        name = "fp32"
    return name


def resolve_for(requested: str, device: "torch.device | str", force_upcast: bool) -> str:
    """:func:`resolve` for a real device, asking torch whether it has bf16."""
    import torch

    device = torch.device(device)
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    return resolve(requested, device.type, force_upcast, bf16)


def safer(name: str) -> str | None:
    """The precision to fall back to when ``name`` keeps overflowing; None for fp32."""
    return SAFER.get(name)


def autocast_dtype(name: str) -> "torch.dtype | None":
    """The autocast dtype of a resolved name; None for the fp32 tensor modes (fp32, tf32)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(_known(name))


def compute(name: str, device_type: str) -> contextlib.AbstractContextManager:
    """The TF32 switches for ``name`` on CUDA (on for tf32, off for the others, restored after);
    a no-op elsewhere. Autocast itself is applied by :meth:`vqpipe.VQModel.tokenize`."""
    _known(name)
    if device_type != "cuda":
        return contextlib.nullcontext()
    return _tf32(name == "tf32")


@contextlib.contextmanager
def _tf32(enabled: bool):
    import torch

    # cuDNN runs fp32 convolutions in TF32 by default: fp32 here means IEEE fp32. (cudnn.flags()
    # would also reset benchmark and deterministic, so the two switches are set by hand.)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def _known(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"precision {name!r} is not resolved; expected one of {list(NAMES)}")
    return name
