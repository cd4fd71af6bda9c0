"""Image-level classification: a linear head, cross-entropy over the labelled samples, accuracy."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from .base import Task


class LinearHead(nn.Linear):
    """A linear layer on the pooled features; on a spatial map (a mixture with dense tasks) it pools the map first.

    A subclass of `nn.Linear`, so a head's parameters keep the names (`heads.k.weight`) of earlier checkpoints.
    """

    def __init__(self, channels: int, num_classes: int, spatial: bool):
        super().__init__(channels, num_classes)
        self.spatial = spatial

    def forward(self, z: Tensor, size=None) -> Tensor:
        return super().forward(z.mean((2, 3)) if self.spatial else z)


class Classification(Task):
    """One label per sample, -1 where the sample has none (an MDL sample of another domain).

    Logged as `<stage>/acc/<task>` (and `<stage>/acc_mean` over the classification tasks), the names every
    classification experiment, search and dashboard used before tasks had other kinds.
    """

    kind = "classification"
    metrics = {"acc": True}
    primary = "acc"

    def __init__(self, name: str, num_classes: int):
        super().__init__(name)
        self.num_classes = num_classes

    def head(self, channels: int, spatial: bool, reduction: int = 1) -> nn.Module:
        return LinearHead(channels, self.num_classes, spatial)

    def loss(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        count = (target >= 0).sum()
        return F.cross_entropy(pred, target, ignore_index=-1, reduction="sum") / count.clamp(min=1), count

    def make_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict({"acc": MulticlassAccuracy(self.num_classes, average="micro")})

    def update(self, metrics: nn.ModuleDict, pred: Tensor, target: Tensor) -> None:
        mask = target >= 0
        if mask.any():  # an MDL batch may hold no sample of this domain
            metrics["acc"].update(pred[mask], target[mask])

    def predict(self, pred: Tensor) -> Tensor:  # the class id
        return pred.argmax(1)

    def metric_name(self, metric: str) -> str:
        return f"{metric}/{self.name}"

    def __repr__(self) -> str:
        return f"Classification({self.name!r}, {self.num_classes})"
