from __future__ import annotations

from . import _torchjd
from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("upgrad")
class UPGrad(GradientWeighting):
    """UPGrad, Jacobian descent (Quinton & Rey, 2024, arXiv:2406.16232), via torchjd.

    Projects each task gradient onto the dual cone of all of them (the directions that conflict with none) and
    averages the projections. Non-conflicting gradients are already in the cone: the result is their mean.
    """

    def __init__(self, tasks, cfg):
        super().__init__(tasks, cfg)
        self.method = _torchjd.upgrad()

    def combine(self, J, G):
        return None, _torchjd.weights(self.method, G)
