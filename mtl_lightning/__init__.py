"""mtl_lightning: multi-task and multi-domain learning research on PyTorch Lightning.

What a plugin subclasses and registers (docs/guide/extending.md; examples/ has one complete plugin of each kind):
- a loss weighting: `Weighting`, registered in `WEIGHTINGS`; a gradient aggregator: `GradientWeighting`, too;
- a dataset: `MixtureDataModule` with its `DataConfig`, registered in `DATASETS` (splits as `LabelledTensors`);
- a task: `Task` (a head, a loss, metrics), declared by a dataset's `describe()`;
- an architecture between the backbone and the heads: `Architecture`, registered in `ARCHITECTURES`;
- a backbone: timm's `register_model` (`model.backbone=NAME`).
"""

from .architectures import ARCHITECTURES, Architecture
from .config import Config, compose, list_experiments
from .data import DATASETS, DataConfig, LabelledTensors, MixtureDataModule, create_datamodule
from .errors import MTLError, NonFiniteLossError
from .model import TaskModel
from .multitask import MultiTaskModule
from .network import create_backbone
from .tasks import Classification, Regression, Task
from .weighting import WEIGHTINGS, Weighting, create_weighting
from .weighting.gradient import GradientWeighting

__version__ = "0.1.0"
__all__ = [
    "ARCHITECTURES",
    "DATASETS",
    "WEIGHTINGS",
    "Architecture",
    "Classification",
    "Config",
    "DataConfig",
    "GradientWeighting",
    "LabelledTensors",
    "MTLError",
    "MixtureDataModule",
    "MultiTaskModule",
    "NonFiniteLossError",
    "Regression",
    "Task",
    "TaskModel",
    "Weighting",
    "compose",
    "create_backbone",
    "create_datamodule",
    "create_weighting",
    "list_experiments",
]
