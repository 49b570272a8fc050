"""Training: optimizer and schedule, checkpoints, metrics, data parallelism, the loop."""
