"""Training: the DeepSpeed engine, the loop, checkpoints, EMA, guards."""
