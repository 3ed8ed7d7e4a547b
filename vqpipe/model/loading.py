"""Model path -> a loaded, frozen :class:`~vqpipe.model.VQModel`, and the device it runs on.

``demo`` names the tokenizer shipped inside the package, ``hf://`` a Hugging Face Hub repo in the
local cache (:mod:`vqpipe.model.hub`), anything else a path or fsspec URL.
"""

from __future__ import annotations

import dataclasses
from importlib import resources

import torch

from vqpipe.config import ModelConfig
from vqpipe.model import hub
from vqpipe.model.vq_model import VQModel

DEMO_MODEL = "demo"


def resolve_model_path(path: str, subfolder: str | None = None) -> str:
    """``demo`` names the tokenizer shipped inside the package; ``hf://ORG/REPO[@REV][/SUBFOLDER]`` a
    Hugging Face Hub repo, fetched into the local Hub cache (:mod:`vqpipe.model.hub`; ``subfolder`` says
    which part of the repo to fetch); anything else is a path or fsspec URL."""
    if path == DEMO_MODEL:
        return str(resources.files("vqpipe") / "assets" / "demo-vq")
    if hub.is_hub_path(path):
        return hub.resolve(path, subfolder)
    return path


def load_model(config: ModelConfig) -> VQModel:
    model = VQModel.from_pretrained(resolve_model_path(config.path, config.subfolder), subfolder=config.subfolder,
                                    storage_options=config.storage_options)
    if config.scaling_factor is not None:
        model.config = dataclasses.replace(model.config, scaling_factor=config.scaling_factor)
    return model.eval().requires_grad_(False)


def pick_device() -> torch.device:
    # Inside a Ray actor CUDA_VISIBLE_DEVICES holds only the GPU(s) Ray assigned, so cuda:0 is ours.
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
