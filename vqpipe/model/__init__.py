"""The VQ-VAE: building blocks, quantizer, the model and its diffusers-format checkpoints."""

from vqpipe.model.checkpoint import CheckpointError
from vqpipe.model.vq_model import DecoderOutput, VQEncoderOutput, VQModel, VQModelConfig

__all__ = ["CheckpointError", "DecoderOutput", "VQEncoderOutput", "VQModel", "VQModelConfig"]
