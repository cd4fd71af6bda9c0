from __future__ import annotations

from . import _torchjd
from .gradient import GradientWeighting, least_squares_weights
from .registry import WEIGHTINGS


@WEIGHTINGS.register("config")
class ConFIG(GradientWeighting):
    """ConFIG, conflict-free training (Liu et al., ICLR 2025, arXiv:2408.11104), via torchjd.

    The direction whose cosine is equal with every unit task gradient (the pseudo-inverse of the row-normalised
    Jacobian applied to ones), scaled by the sum of the task gradients' projections on it. It reads J itself, not
    only its Gramian: under DDP it needs `mode=param`. `weights/<task>` logs the least-squares weights of its update.
    """

    gramian_only = False

    def __init__(self, tasks, cfg):
        super().__init__(tasks, cfg)
        self.method = _torchjd.config()

    def combine(self, J, G):
        g = self.method(J.double()).to(J.dtype)
        return g, least_squares_weights(J, G, g)
