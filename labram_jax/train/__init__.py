"""Training: typed configs, the three stages (losses, heads and rules), the training loop, and the metrics."""
