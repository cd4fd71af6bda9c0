"""mtl_lightning: multi-task and multi-domain learning research on PyTorch Lightning."""

from .config import Config, compose, list_experiments
from .data import DATASETS, MixtureDataModule, create_datamodule
from .errors import MTLError, NonFiniteLossError
from .model import TaskModel, create_backbone
from .multitask import MultiTaskModule
from .weighting import WEIGHTINGS, Weighting, create_weighting

__version__ = "0.1.0"
__all__ = [
    "DATASETS",
    "WEIGHTINGS",
    "Config",
    "MTLError",
    "MixtureDataModule",
    "MultiTaskModule",
    "NonFiniteLossError",
    "TaskModel",
    "Weighting",
    "compose",
    "create_backbone",
    "create_datamodule",
    "create_weighting",
    "list_experiments",
]
