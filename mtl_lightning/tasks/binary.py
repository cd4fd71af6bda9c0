"""Binary prediction (click, conversion): one logit per sample, binary cross-entropy over the labelled samples, AUC
and log-loss, as multi-task recommendation reports them (MTReclib; Ma et al. 2018; Tang et al. 2020).

AUC is torchmetrics' `BinaryAUROC` with `thresholds=None`: exact (every prediction is kept until the epoch ends, 8
bytes a sample: 80 MB for ten million test rows, on the metric's device), where binned thresholds would be an
approximation. Log-loss is the mean binary cross-entropy of the predicted probabilities.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC

from .base import Task


class Binary(Task):
    """Labels 0/1 per sample, -1 where the sample has none. Logged as `<stage>/<task>/auc` and `.../logloss`, with
    `<stage>/auc_mean` over the binary tasks."""

    kind = "binary"
    metrics = {"auc": True, "logloss": False}
    primary = "auc"

    def head(self, channels: int, spatial: bool, reduction: int = 1) -> nn.Module:
        from .classification import LinearHead

        return LinearHead(channels, 1, spatial)

    def loss(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        mask = target >= 0
        bce = F.binary_cross_entropy_with_logits(pred.squeeze(-1), target.clamp(min=0).to(pred.dtype), reduction="none")
        count = mask.sum()
        return (bce * mask).sum() / count.clamp(min=1), count

    def predict(self, pred: Tensor) -> Tensor:  # the probability of 1
        return pred.squeeze(-1).sigmoid()

    def make_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict({"auc": BinaryAUROC(thresholds=None), "logloss": MeanMetric()})

    def update(self, metrics: nn.ModuleDict, pred: Tensor, target: Tensor) -> None:
        mask = target >= 0
        if mask.any():
            logit, y = pred.squeeze(-1)[mask].float(), target[mask]
            metrics["auc"].update(logit.sigmoid(), y)
            metrics["logloss"].update(F.binary_cross_entropy_with_logits(logit, y.float(), reduction="none"))

    def __repr__(self) -> str:
        return f"Binary({self.name!r})"
