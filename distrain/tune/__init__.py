"""Hyperparameter sweeps with Ray Tune over the config tree: `run_sweep(cfg)`; the search space in `space.py`."""

from distrain.tune.space import Dist, SpaceError, parse_dist, parse_space
from distrain.tune.sweep import Sweep, SweepError, SweepInterrupted, run_sweep

__all__ = ["Dist", "SpaceError", "Sweep", "SweepError", "SweepInterrupted", "parse_dist", "parse_space", "run_sweep"]
