"""Training on Ray Train: the per-worker loop, DeepSpeed/DDP strategies, checkpoints and the launcher."""
