"""The training loop every training stage uses, and evaluation."""
