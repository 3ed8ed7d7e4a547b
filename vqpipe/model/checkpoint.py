"""diffusers-format checkpoints on any fsspec store: ``config.json`` + ``diffusion_pytorch_model.safetensors``."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import posixpath
import re
from typing import TYPE_CHECKING, Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vqpipe.model.config import VQModelConfig
from vqpipe.model.errors import CheckpointError
from vqpipe.output import storage

if TYPE_CHECKING:
    from vqpipe.model.vq_model import VQModel

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(VQModelConfig)}
# Old diffusers AttentionBlock names -> current Attention names (diffusers renames them on load too).
_ATTENTION_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def load_pretrained(cls: type["VQModel"], path: str, subfolder: str | None = None,
                    storage_options: dict | None = None, allow_pickle: bool = False) -> "VQModel":
    """Build ``cls`` from a diffusers-format folder at ``path`` (local path or fsspec URL).

    Pickle weights (``.bin``) run arbitrary code when loaded, so they are refused unless
    ``allow_pickle=True``.
    """
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if subfolder:
        root = posixpath.join(root, subfolder)
    config = read_config(fs, posixpath.join(root, CONFIG_NAME))
    weights_path, raw = _read_weights(fs, root, allow_pickle)
    state_dict = _parse_weights(weights_path, raw)
    model = cls.from_config(config)
    load_state_dict_strict(model, rename_legacy_keys(state_dict), source=weights_path)
    model.weights_sha256 = hashlib.sha256(raw).hexdigest()
    return model


def read_config(fs: fsspec.AbstractFileSystem, config_path: str) -> VQModelConfig:
    """Parse ``config.json``; unknown keys (other models' options) are ignored with a warning."""
    try:
        with fs.open(config_path, "rb") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: config file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    class_name = raw.get("_class_name", "VQModel")
    if class_name != "VQModel":
        raise CheckpointError(f"{config_path}: _class_name is {class_name!r}, not 'VQModel'")
    unknown = sorted(k for k in raw if k not in _CONFIG_FIELDS and not k.startswith("_"))
    if unknown:
        log.warning("%s: ignoring config keys VQModel does not take: %s", config_path, unknown)
    kwargs = {k: v for k, v in raw.items() if k in _CONFIG_FIELDS}
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    try:
        config = VQModelConfig(**kwargs)
        config.validate()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    return config


def _read_weights(fs: fsspec.AbstractFileSystem, root: str, allow_pickle: bool) -> tuple[str, bytes]:
    # storage.exists, not fs.exists: fsspec's answers False on any error, so a dropped connection
    # would read as "weights not found".
    weights_path = posixpath.join(root, WEIGHTS_NAME)
    if storage.exists(fs, weights_path):
        with fs.open(weights_path, "rb") as f:
            return weights_path, f.read()
    pickle_path = posixpath.join(root, PICKLE_WEIGHTS_NAME)
    if storage.exists(fs, pickle_path):
        if not allow_pickle:
            raise CheckpointError(
                f"{pickle_path}: refusing to load pickle weights (unpickling runs arbitrary code); convert the "
                "checkpoint to safetensors or pass allow_pickle=True if you trust its source"
            )
        with fs.open(pickle_path, "rb") as f:
            return pickle_path, f.read()
    raise CheckpointError(f"{weights_path}: weights file not found")


def _parse_weights(weights_path: str, raw: bytes) -> dict[str, torch.Tensor]:
    if weights_path.endswith(".bin"):
        # Only reached with allow_pickle=True; weights_only still blocks most gadgets.
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    try:
        return load_safetensors(raw)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({err})") from None


def rename_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``...attentions.N.query.weight`` -> ``...attentions.N.to_q.weight`` (and key/value/proj_attn)."""
    out = {}
    for key, value in state_dict.items():
        m = _OLD_ATTENTION_KEY.match(key)
        out[f"{m[1]}.{_ATTENTION_RENAMES[m[2]]}.{m[3]}" if m else key] = value
    return out


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load with every key accounted for and every shape matching; errors name the keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the config: missing keys {_abbrev(missing)}, "
            f"unexpected keys {_abbrev(unexpected)}"
        )
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if state_dict[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source}: weight shapes do not match the config: {_abbrev(wrong)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()})


def save_pretrained(model: "VQModel", path: str, storage_options: dict | None = None) -> None:
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    config: dict[str, Any] = {"_class_name": "VQModel", **model.config.to_dict()}
    fs.pipe_file(posixpath.join(root, CONFIG_NAME), (json.dumps(config, indent=2) + "\n").encode())
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fs.pipe_file(posixpath.join(root, WEIGHTS_NAME), save_safetensors(tensors, metadata={"format": "pt"}))


def _abbrev(items: list[str], limit: int = 8) -> str:
    if not items:
        return "[]"
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items) - limit} more)' if len(items) > limit else ''}]"
