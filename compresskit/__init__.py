"""compresskit: distil, prune, factorize and quantize a PyTorch model, export it, measure it."""

__version__ = "0.1.0"
