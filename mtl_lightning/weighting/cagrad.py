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
    c = 0 gives the average gradient, larger c moves toward MGDA. `rescale` divides the update as LibMTL's and the
    authors' code do: 0 not at all, 1 by 1 + c^2 (LibMTL's default, and the default of the authors' multi-task
    `cagrad` function for NYUv2 and Cityscapes; their two-task toy function defaults to 0), 2 by 1 + c.
    """

    @dataclass
    class Config(GradientWeighting.Config):
        name: str = "cagrad"
        c: float = 0.4  # the paper's value for its multi-task benchmarks
        rescale: int = 1  # 0: none | 1: / (1 + c^2) | 2: / (1 + c)

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if not cfg.c >= 0:
            raise MTLError(f"weighting.c={cfg.c} must be >= 0 (the radius of CAGrad's ball).")
        if cfg.rescale not in (0, 1, 2):
            raise MTLError(f"weighting.rescale={cfg.rescale} must be 0 (none), 1 (/ (1 + c^2)) or 2 (/ (1 + c)).")
        self.method = _torchjd.cagrad(cfg.c)
        self.scale = (1.0, 1 / (1 + cfg.c**2), 1 / (1 + cfg.c))[cfg.rescale]

    def combine(self, J, G):
        return None, _torchjd.weights(self.method, G) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, c={self.cfg.c}, rescale={self.cfg.rescale}"
