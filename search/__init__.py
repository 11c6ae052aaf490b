"""Supernet training and the Optuna search over pruning plans."""
