from __future__ import annotations

from dataclasses import dataclass

from ..errors import MTLError
from . import _torchjd
from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("cagrad")
class CAGrad(GradientWeighting):
    """CAGrad, conflict-averse gradient descent (Liu et al., NeurIPS 2021, arXiv:2110.14048), via torchjd.

    Maximises the worst task's improvement within a ball of radius c * |g0| around the average gradient g0;
    c = 0 gives the average gradient, larger c moves toward MGDA.
    """

    @dataclass
    class Config(GradientWeighting.Config):
        name: str = "cagrad"
        c: float = 0.4  # the paper's value for its multi-task benchmarks

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if not cfg.c >= 0:
            raise MTLError(f"weighting.c={cfg.c} must be >= 0 (the radius of CAGrad's ball).")
        self.method = _torchjd.cagrad(cfg.c)

    def combine(self, J, G):
        return None, _torchjd.weights(self.method, G)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, c={self.cfg.c}"
