"""A task is a head, a loss and its metrics.

The LightningModule drives any list of tasks through this interface: it builds each task's head on the shared
features, asks each task for its masked mean loss (the weightings see one loss per task), and feeds each task's
torchmetrics `Metric`s at evaluation (so they sync under DDP). A task names its metrics with their direction
(higher or lower is better) and its primary metric, which ForkMerge's merge criterion, Δm% and a search can use.

The shared features are either pooled, (B, D), when every task is image-level, or a spatial map, (B, C, h, w),
when any task is dense: `spatial` tells a head which it gets. Dense heads upsample their output to the label size.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn


class Task:
    """A task: a head, a loss and metrics. A dataset declares its tasks in `describe()` (examples/custom_task.py).

    To implement: class attributes `metrics` ({name: higher is better}; logged as `<stage>/<task>/<name>`), `primary`
    (the metric Δm%, ForkMerge and `checkpoint.monitor` use), `dense` (True for per-pixel targets), `target_dtype`
    ("float" for a number per sample); and `head(channels, spatial, reduction)` (an `nn.Module` called as head(z,
    size)), `loss(pred, target) -> (mean loss over the labelled samples, their count)`, `make_metrics()` (torchmetrics
    `Metric`s by name, so they sync under DDP) and `update(metrics, pred, target)`. Optional: `predict(pred)` (what
    `experiments.evaluate --predict` writes).

    What the framework guarantees: `z` is the architecture's representation for this task, pooled (B, channels) for
    image-level tasks or a map (B, channels, h, w), `reduction` times smaller than the image, when any task is
    dense; `size` is the label size (None for tabular inputs). `target` is the task's column of the batch's labels,
    -1 (or the task's own sentinel) where a sample has no label: mask it in `loss` and `update`. `loss` may be
    called on a batch with no labelled sample (return a zero loss and count 0). Metrics are reset every stage.
    """

    kind: ClassVar[str]
    dense: ClassVar[bool] = False
    unit: ClassVar[bool] = False  # dense: the head's output is normalised to unit vectors (surface normals)
    view: ClassVar[bool] = False  # owns its view of the input (tasks/views.py): the module calls view_forward
    # what a column of a (N, K) label tensor holds for this task: "long" (a class id, -1 = none) or "float" (a number,
    # NaN = none). A float label tensor carries both kinds; its columns are cast per task (TaskModel.targets)
    target_dtype: ClassVar[str] = "long"
    metrics: ClassVar[dict[str, bool]]  # metric name -> higher is better
    primary: ClassVar[str]

    def __init__(self, name: str):
        self.name = name

    def head(self, channels: int, spatial: bool, reduction: int) -> nn.Module:
        """The task's head on shared features of `channels` channels, `reduction` times smaller than the image when
        `spatial`; called as head(z, size) with the label size."""
        raise NotImplementedError

    def loss(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(mean loss over the labelled samples/pixels, number of samples with any label for this task)."""
        raise NotImplementedError

    def make_metrics(self) -> nn.ModuleDict:
        """Fresh torchmetrics `Metric`s, one per name of `metrics`."""
        raise NotImplementedError

    def update(self, metrics: nn.ModuleDict, pred: Tensor, target: Tensor) -> None:
        """Feed one batch to `metrics`, leaving out what is unlabelled."""
        raise NotImplementedError

    def predict(self, pred: Tensor) -> Tensor:
        """The head's output as the prediction a user reads (`experiments.evaluate --predict`): a class id, a
        probability, a map. By default the output as it is."""
        return pred

    def metric_name(self, metric: str) -> str:
        """A metric's name without the stage (`<task>/<metric>`), as Δm% base results and merge scores name it."""
        return f"{self.name}/{metric}"

    def key(self, stage: str, metric: str) -> str:
        """The logged name of a metric: `<stage>/<task>/<metric>`."""
        return f"{stage}/{self.metric_name(metric)}"

    # Augmentation of dense targets (random scale-crop and flip, applied by the datamodule to whole batches)
    def crop_resize(self, target: Tensor, box: tuple[int, int, int, int], size, scale: float) -> Tensor:
        top, left, h, w = box
        crop = target[..., top : top + h, left : left + w].float()
        out = F.interpolate(crop[None] if crop.ndim == 3 else crop[None, None], size=size, mode="nearest")
        return out.view(*target.shape[:-2], *size).to(target.dtype)

    def hflip(self, target: Tensor) -> Tensor:
        return target.flip(-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class DenseHead(nn.Module):
    """A light per-task decoder: 3x3 conv (at most 256 channels) + GELU, then a 1x1 conv to r^2 sub-pixels per output
    channel, rearranged to r times the resolution (pixel shuffle, r = min(reduction, 4): a learned upsampling, sharper
    than interpolating a coarse map), then bilinearly resized to the label size where that is still larger.

    `normalize` makes the output unit vectors along channels (surface normals, as MTAN's and LibMTL's heads do).
    """

    def __init__(self, channels: int, out_channels: int, reduction: int, normalize: bool = False):
        super().__init__()
        hidden, r = min(channels, 256), min(reduction, 4)
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, out_channels * r**2, 1)
        self.shuffle = nn.PixelShuffle(r)
        self.normalize = normalize

    def forward(self, z: Tensor, size) -> Tensor:
        y = self.shuffle(self.out(F.gelu(self.conv(z))))
        if tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return F.normalize(y, dim=1) if self.normalize else y


def masked_mean(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of `values` over `mask` (0 when nothing is labelled), and the samples with any labelled pixel."""
    n = mask.sum()
    loss = (values * mask).sum() / n.clamp(min=1)
    return loss, mask.flatten(1).any(1).sum()
