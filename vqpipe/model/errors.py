"""Checkpoint errors, importable without torch (the command line maps them to exit status 2)."""


class CheckpointError(ValueError):
    """A checkpoint file is missing or malformed; the message names the file and the problem."""
