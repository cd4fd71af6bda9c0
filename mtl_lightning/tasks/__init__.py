"""Tasks: a head, a loss and metrics each. Datamodules describe their tasks with these classes."""

from .base import DenseHead, Task
from .binary import Binary
from .classification import Classification, LinearHead
from .delta_m import delta_m, read_base
from .dense import Depth, Normal, PixelRegression, Segmentation
from .regression import Regression
from .views import AUXILIARY, Exemplar, Rotation

__all__ = [
    "AUXILIARY",
    "Binary",
    "Classification",
    "DenseHead",
    "LinearHead",
    "Depth",
    "Exemplar",
    "Normal",
    "PixelRegression",
    "Regression",
    "Rotation",
    "Segmentation",
    "Task",
    "delta_m",
    "read_base",
]
