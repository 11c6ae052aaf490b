"""Training (above ``pruner``): data, the training loop, distillation, BN re-estimation, progressive training."""
