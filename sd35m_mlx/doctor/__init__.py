"""`sd35m-mlx doctor`: what this machine is (environment.py) and whether MLX runs our pipeline on it (selftest.py).

Every check returns a `Check` (name, ok, detail) instead of printing, so the CLI prints and a bug report
quotes the same lines.
"""

from .environment import Check, cached_models, environment, recommendations
from .selftest import self_test

__all__ = ["Check", "cached_models", "environment", "recommendations", "self_test"]
