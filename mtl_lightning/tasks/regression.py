"""Scalar regression, for any mixture (graphs, tabular, images): one linear output per sample, the mean squared
error on the target as the data gives it (QM9's targets standardised, as the references train them), and the mean
absolute error in the units a table reports (`scale`: the standard deviation to undo the standardisation, times
1000 for QM9's energies in meV). NaN marks a sample without a target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError

from .base import Task


class Regression(Task):
    kind = "regression"
    target_dtype = "float"  # NaN = none; refused as integers, where -1 would be read as a target
    metrics = {"mae": False}
    primary = "mae"

    def __init__(self, name: str, scale: float = 1.0):
        super().__init__(name)
        self.scale = scale  # reported units per unit of the target (the datamodule sets it once it read the data)

    def head(self, channels: int, spatial: bool, reduction: int = 1) -> nn.Module:
        from .classification import LinearHead

        return LinearHead(channels, 1, spatial)

    def loss(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        mask = ~torch.isnan(target)
        n = mask.sum()
        return F.mse_loss(pred[mask, 0], target[mask].to(pred.dtype), reduction="sum") / n.clamp(min=1), n

    def predict(self, pred: Tensor) -> Tensor:  # in the reported units, about the standardised mean
        return pred[:, 0] * self.scale

    def make_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict({"mae": MeanAbsoluteError()})

    def update(self, metrics: nn.ModuleDict, pred: Tensor, target: Tensor) -> None:
        mask = ~torch.isnan(target)
        if mask.any():
            metrics["mae"].update(pred[mask, 0].float() * self.scale, target[mask].float() * self.scale)

    def __repr__(self) -> str:
        return f"Regression({self.name!r}, scale={self.scale:g})"
