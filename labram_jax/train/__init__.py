"""Training: configs, task heads and losses, the training loop, and evaluation metrics."""
