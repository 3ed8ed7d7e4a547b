"""Reading back: token arrays, a PyTorch dataset, ``vqpipe inspect`` and ``vqpipe decode``."""
