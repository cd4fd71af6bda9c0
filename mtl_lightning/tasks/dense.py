"""Per-pixel tasks: semantic segmentation, depth, surface normals, and pixel-wise regression (Taskonomy's
keypoints and edges). Losses and metrics as MTAN, LibMTL and ForkMerge compute them on NYUv2:

- segmentation: cross-entropy ignoring -1; mIoU (over the classes present in predictions or labels) and pixel
  accuracy over the labelled pixels;
- depth: L1 on the valid pixels (depth 0 = no measurement); absolute and relative error (|d - d*| / d*), both
  means over every valid pixel of the split (LibMTL averages per-batch means weighted by batch size instead);
- normals: 1 - cosine on the valid pixels (zero vector = no normal); the angle error's mean, median and share of
  pixels within 11.25, 22.5 and 30 degrees;
- pixel regression: L1 on the valid pixels (all, unless the dataset gives a mask as NaN); mean absolute error.

`average="batches"` (`data.metric_average=batches`) computes the depth and normal metrics as Nash-MTL and FAMO
publish them: each evaluation batch's value (the median too), averaged over the batches, equally weighted, so they
depend on the evaluation batch size (theirs: NYUv2 2, Cityscapes 8). mIoU and pixel accuracy come from the
confusion over the whole split either way, as theirs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanAbsolutePercentageError, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from ..errors import MTLError
from .base import DenseHead, Task, masked_mean
from .metrics import NormalAngleError, batch_angle_metrics

AVERAGES = ("pixels", "batches")


class PerPixel(Task):
    """A dense task whose metrics are means over the split's pixels, or (`average="batches"`) of per-batch values."""

    def __init__(self, name: str, average: str = "pixels"):
        super().__init__(name)
        if average not in AVERAGES:
            raise MTLError(f"Unknown data.metric_average={average!r}. Valid choices: {', '.join(AVERAGES)}.")
        self.average = average

    def batch_means(self) -> nn.ModuleDict:
        return nn.ModuleDict({m: MeanMetric() for m in self.metrics})


class Segmentation(PerPixel):
    """Labels (B, H, W) long in [-1, num_classes), -1 = unlabelled."""

    kind = "segmentation"
    dense = True
    metrics = {"miou": True, "pix_acc": True}
    primary = "miou"

    def __init__(self, name: str, num_classes: int, average: str = "pixels"):
        super().__init__(name, average)  # (mIoU and accuracy: over the split's confusion either way)
        self.num_classes = num_classes

    @property
    def out_channels(self) -> int:
        return self.num_classes

    def head(self, channels: int, spatial: bool, reduction: int) -> nn.Module:
        return DenseHead(channels, self.out_channels, reduction)

    def loss(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        mask = target >= 0
        ce = F.cross_entropy(pred, target, ignore_index=-1, reduction="sum")
        return ce / mask.sum().clamp(min=1), mask.flatten(1).any(1).sum()

    def predict(self, pred: Tensor) -> Tensor:  # the class map
        return pred.argmax(1)

    def make_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                "miou": MulticlassJaccardIndex(self.num_classes, ignore_index=-1, validate_args=False),
                "pix_acc": MulticlassAccuracy(self.num_classes, average="micro", ignore_index=-1, validate_args=False),
            }
        )

    def update(self, metrics, pred, target) -> None:
        labels = pred.argmax(1)
        for m in metrics.values():
            m.update(labels, target)

    def __repr__(self) -> str:
        return f"Segmentation({self.name!r}, {self.num_classes})"


class Depth(PerPixel):
    """Depth (B, 1, H, W) in metres, 0 = no measurement."""

    kind = "depth"
    dense = True
    metrics = {"abs_err": False, "rel_err": False}
    primary = "abs_err"
    out_channels = 1

    def head(self, channels: int, spatial: bool, reduction: int) -> nn.Module:
        return DenseHead(channels, 1, reduction)

    def loss(self, pred, target):
        return masked_mean((pred - target).abs(), target > 0)

    def make_metrics(self) -> nn.ModuleDict:
        if self.average == "batches":
            return self.batch_means()
        return nn.ModuleDict({"abs_err": MeanAbsoluteError(), "rel_err": MeanAbsolutePercentageError()})

    def update(self, metrics, pred, target) -> None:
        mask = target > 0
        if self.average == "batches":
            if mask.any():
                err = (pred[mask] - target[mask]).abs()
                metrics["abs_err"].update(err.mean())
                metrics["rel_err"].update((err / target[mask]).mean())
            return
        for m in metrics.values():
            m.update(pred[mask], target[mask])

    def crop_resize(self, target, box, size, scale):
        return super().crop_resize(target, box, size, scale) / scale  # zooming in by s brings the scene s closer


class Normal(PerPixel):
    """Surface normals (B, 3, H, W), unit vectors, zero vector = no normal; the head outputs unit vectors."""

    kind = "normal"
    dense = True
    metrics = {
        "angle_mean": False,
        "angle_median": False,
        "within_11_25": True,
        "within_22_5": True,
        "within_30": True,
    }
    primary = "angle_mean"
    out_channels, unit = 3, True

    def head(self, channels: int, spatial: bool, reduction: int) -> nn.Module:
        return DenseHead(channels, 3, reduction, normalize=True)

    def loss(self, pred, target):
        mask = (target != 0).any(1, keepdim=True)
        return masked_mean(1 - (pred * target).sum(1, keepdim=True), mask)

    def make_metrics(self) -> nn.ModuleDict:
        if self.average == "batches":
            return self.batch_means()
        return nn.ModuleDict({"angles": NormalAngleError()})

    def update(self, metrics, pred, target) -> None:
        mask = (target != 0).any(1)
        p, t = pred.permute(0, 2, 3, 1)[mask], target.permute(0, 2, 3, 1)[mask]
        if self.average == "batches":
            if len(p):
                for name, value in batch_angle_metrics(p, t).items():
                    metrics[name].update(value)
            return
        metrics["angles"].update(p, t)

    def crop_resize(self, target, box, size, scale):
        top, left, h, w = box  # bilinear, as MTAN resamples normals
        crop = target[None, :, top : top + h, left : left + w].float()
        return F.interpolate(crop, size=size, mode="bilinear", align_corners=True)[0]

    def hflip(self, target):
        out = target.flip(-1)
        out[0] = -out[0]  # a mirrored scene's normals point the other way along x
        return out


class PixelRegression(Task):
    """A per-pixel scalar (B, 1, H, W) regressed with L1; NaN marks a pixel without a value."""

    kind = "pixel_regression"
    dense = True
    metrics = {"l1": False}
    primary = "l1"
    out_channels = 1

    def head(self, channels: int, spatial: bool, reduction: int) -> nn.Module:
        return DenseHead(channels, 1, reduction)

    def loss(self, pred, target):
        mask = ~torch.isnan(target)
        return masked_mean((pred - target.nan_to_num()).abs(), mask)

    def make_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict({"l1": MeanAbsoluteError()})

    def update(self, metrics, pred, target) -> None:
        mask = ~torch.isnan(target)
        metrics["l1"].update(pred[mask], target[mask])
