"""Architectures: what sits between the backbone's features and the task heads, selected by name
(`model.architecture=NAME`), independent of the weighting and of the data, as LibMTL separates them."""

from __future__ import annotations

from . import cgc, hps, mmoe, ple, segnet  # noqa: F401  (registers the architectures)
from .base import ARCHITECTURES, Architecture


def create_architecture(cfg, in_dim: int, num_tasks: int, spatial: bool) -> Architecture:
    """Build `cfg.architecture` over `in_dim` features for `num_tasks` tasks; unknown names list the valid ones."""
    return ARCHITECTURES.get(cfg.architecture)(in_dim, num_tasks, cfg, spatial)


__all__ = ["ARCHITECTURES", "Architecture", "create_architecture"]
