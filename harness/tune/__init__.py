"""Sweeps: a method's published search space, run as Ray Tune trials (Optuna search, ASHA) of the training path."""
