from __future__ import annotations

from . import _torchjd
from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("dualproj")
class DualProj(GradientWeighting):
    """DualProj (Quinton & Rey, arXiv:2406.16232, after GEM by Lopez-Paz & Ranzato 2017), via torchjd.

    Projects the average gradient onto the dual cone of the task gradients: the closest direction to the mean that
    conflicts with no task (its dot product with every task gradient is >= 0).
    """

    def __init__(self, tasks, cfg):
        super().__init__(tasks, cfg)
        self.method = _torchjd.dual_proj()

    def combine(self, J, G):
        return None, _torchjd.weights(self.method, G)
