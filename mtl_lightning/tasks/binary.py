"""Binary prediction (click, conversion): one logit per sample, binary cross-entropy over the labelled samples, AUC
and log-loss, as multi-task recommendation reports them (MTReclib; Ma et al. 2018; Tang et al. 2020).

AUC is torchmetrics' `BinaryAUROC` with `thresholds=None`: exact (every prediction is kept until the epoch ends, 8
bytes a sample: 80 MB for ten million test rows, on the metric's device), where binned thresholds would be an
approximation. Log-loss is the mean binary cross-entropy of the predicted probabilities. `metrics=("f1",)` makes
it CelebA's task as FAMO evaluates it: the F1 score at threshold 0.5 from the split's counts (torchmetrics'
`BinaryF1Score`), averaged over the binary tasks as `<stage>/f1_mean`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC, BinaryF1Score

from .base import Task

METRICS = {"auc": True, "logloss": False, "f1": True}  # every metric a binary task can log -> higher is better


class Binary(Task):
    """Labels 0/1 per sample, -1 where the sample has none. Logged as `<stage>/<task>/auc` and `.../logloss` (or the
    `metrics` chosen), with `<stage>/auc_mean` (`f1_mean`) over the binary tasks."""

    kind = "binary"
    metrics = {"auc": True, "logloss": False}
    primary = "auc"

    def __init__(self, name: str, metrics=("auc", "logloss")):
        super().__init__(name)
        self.metrics = {m: METRICS[m] for m in metrics}
        self.primary = metrics[0]

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
        make = {"auc": lambda: BinaryAUROC(thresholds=None), "logloss": MeanMetric, "f1": lambda: BinaryF1Score(0.5)}
        return nn.ModuleDict({m: make[m]() for m in self.metrics})

    def update(self, metrics: nn.ModuleDict, pred: Tensor, target: Tensor) -> None:
        mask = target >= 0
        if mask.any():
            logit, y = pred.squeeze(-1)[mask].float(), target[mask]
            for name in ("auc", "f1"):
                if name in metrics:
                    metrics[name].update(logit.sigmoid(), y)
            if "logloss" in metrics:
                metrics["logloss"].update(F.binary_cross_entropy_with_logits(logit, y.float(), reduction="none"))

    def __repr__(self) -> str:
        return f"Binary({self.name!r})"
