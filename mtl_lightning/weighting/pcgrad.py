from __future__ import annotations

from . import _torchjd
from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("pcgrad")
class PCGrad(GradientWeighting):
    """PCGrad, gradient surgery (Yu et al., NeurIPS 2020, arXiv:2001.06782), via torchjd.

    Each task gradient is projected onto the normal plane of every task gradient it conflicts with (negative dot
    product); the projected gradients are summed. Non-conflicting gradients are left alone (their sum). torchjd
    computes the result exactly from the Gramian over all task orders, not from one random order per step.
    """

    def __init__(self, tasks, cfg):
        super().__init__(tasks, cfg)
        self.method = _torchjd.pcgrad()

    def combine(self, J, G):
        return None, _torchjd.weights(self.method, G)
