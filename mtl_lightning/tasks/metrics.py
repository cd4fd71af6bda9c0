"""Metrics torchmetrics does not ship: surface-normal angle errors (mean, median, share within thresholds)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def batch_angle_metrics(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """One batch's normal metrics as Nash-MTL and FAMO compute them: the angles' mean, exact median (numpy's: the
    middle two averaged) and shares within 11.25, 22.5 and 30 degrees, over the batch's valid pixels (N, 3)."""
    cos = torch.nn.functional.cosine_similarity(pred.double(), target.double(), dim=1).clamp(-1, 1)
    angle = torch.rad2deg(torch.acos(cos)).sort().values
    n = len(angle)
    out = {"angle_mean": angle.mean(), "angle_median": (angle[(n - 1) // 2] + angle[n // 2]) / 2}
    for t in NormalAngleError.THRESHOLDS:
        out[f"within_{str(t).replace('.', '_').removesuffix('_0')}"] = (angle < t).double().mean()
    return out


class NormalAngleError(Metric):
    """Angles between predicted and true normals, in degrees, over the valid pixels of every batch.

    The median comes from a histogram of 0.01-degree bins (its value is the bin's centre, within 0.005 degrees of
    the exact median), so memory stays flat instead of keeping every pixel's angle as LibMTL does. The shares
    within 11.25, 22.5 and 30 degrees are counted exactly, with `<` as LibMTL and MTAN count them.
    """

    full_state_update = False
    BINS = 18_000  # 0.01 degrees over [0, 180]
    THRESHOLDS = (11.25, 22.5, 30.0)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hist", torch.zeros(self.BINS, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("within", torch.zeros(len(self.THRESHOLDS), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred, target: (N, 3) normals of the valid pixels (pred need not be unit length)."""
        cos = torch.nn.functional.cosine_similarity(pred.double(), target.double(), dim=1).clamp(-1, 1)
        angle = torch.rad2deg(torch.acos(cos))
        self.total += angle.sum()
        self.count += angle.numel()
        idx = (angle / 180 * self.BINS).long().clamp(max=self.BINS - 1)
        self.hist += torch.bincount(idx, minlength=self.BINS).double()
        self.within += torch.stack([(angle < t).sum() for t in self.THRESHOLDS]).double()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp(min=1)
        cum = self.hist.cumsum(0)
        median_bin = torch.searchsorted(cum, self.count / 2)
        out = {"angle_mean": self.total / n, "angle_median": (median_bin.double() + 0.5) * 180 / self.BINS}
        for t, w in zip(self.THRESHOLDS, self.within):
            out[f"within_{str(t).replace('.', '_').removesuffix('_0')}"] = w / n
        return {k: v.float() for k, v in out.items()}
