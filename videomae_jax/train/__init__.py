"""Pre-training system: config, optimizer, sharding, train step, checkpoints, metrics."""
