"""Task/domain mixtures, selected by name: `data=NAME` on the command line."""

from __future__ import annotations

from . import (  # noqa: F401  (registers the mixtures)
    aliexpress,
    celeba,
    classic,
    digits,
    domainnet,
    graphs,
    nyuv2,
    office,
    shapes,
    synthetic,
    synthetic_recsys,
    taskonomy,
)
from .base import DATASETS, DataConfig, LabelledTensors, MixtureDataModule, MixtureSampler, Task


def create_datamodule(cfg, seed: int = 0) -> MixtureDataModule:
    """Build the mixture named `cfg.name`; unknown names raise with the valid choices."""
    return DATASETS.get(cfg.name)(cfg, seed)


__all__ = [
    "DATASETS",
    "DataConfig",
    "LabelledTensors",
    "MixtureDataModule",
    "MixtureSampler",
    "Task",
    "create_datamodule",
]
