"""Encode stage: batches of pixels -> VQ codes and scaled latents on the worker's device."""
