"""A task with its own loss and metric: a digit's value read as a number (0 to 9), with a smooth-L1 loss and the
mean absolute error as its metric (lower is better). `digits_value` is the embedded digits' two domains (clean and
shifted, each classified by its own head) with that third task on every image:

    python -m experiments.run exp=digits_mdl plugins=[examples/custom_task.py] data=digits_value
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError

from mtl_lightning import DATASETS, LabelledTensors, Task
from mtl_lightning.data.digits import DigitsConfig, DigitsDataModule
from mtl_lightning.tasks import LinearHead


class Number(Task):
    """A number per sample (-1: none): one linear output, smooth-L1 loss, mean absolute error."""

    kind = "number"
    metrics = {"mae": False}  # metric name -> higher is better; logged as <stage>/<task>/mae
    primary = "mae"

    def head(self, channels, spatial, reduction=1):  # called as head(z, size) on the pooled features (B, channels)
        return LinearHead(channels, 1, spatial)

    def loss(self, pred, target):  # (mean loss over the labelled samples, how many there were)
        mask = target >= 0
        n = mask.sum()
        return F.smooth_l1_loss(pred[mask, 0], target[mask].float(), reduction="sum") / n.clamp(min=1), n

    def make_metrics(self):
        return nn.ModuleDict({"mae": MeanAbsoluteError()})

    def update(self, metrics, pred, target):  # one evaluation batch
        mask = target >= 0
        if mask.any():
            metrics["mae"].update(pred[mask, 0], target[mask].float())


@dataclass
class ValueConfig(DigitsConfig):
    name: str = "digits_value"
    mode: str = "mdl"


@DATASETS.register("digits_value")
class DigitsValue(DigitsDataModule):
    Config = ValueConfig

    def describe(self):
        return [*super().describe(), Number("value")]

    def load(self):  # one more label column: the digit, whichever domain's head labels it (the other column is -1)
        out = super().load()
        return {
            k: LabelledTensors(s.images, torch.cat([s.labels, s.labels.amax(1, keepdim=True)], 1), s.domains)
            for k, s in out.items()
        }
