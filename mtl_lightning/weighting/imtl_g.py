from __future__ import annotations

from . import _torchjd
from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("imtl_g")
class IMTLG(GradientWeighting):
    """IMTL-G, impartial MTL, gradient part (Liu et al., ICLR 2021, openreview.net/forum?id=IMPnRXEWpvr), via torchjd.

    Finds the combination of the task gradients (weights summing to 1) whose projections onto every task's unit
    gradient are equal, so no task is favoured by the size of its gradient.
    """

    def __init__(self, tasks, cfg):
        super().__init__(tasks, cfg)
        self.method = _torchjd.imtl_g()

    def combine(self, J, G):
        return None, _torchjd.weights(self.method, G)
