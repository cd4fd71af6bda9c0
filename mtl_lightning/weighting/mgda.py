from __future__ import annotations

from dataclasses import dataclass

from . import _torchjd
from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("mgda")
class MGDA(GradientWeighting):
    """MGDA, multiple-gradient descent (Désidéri 2012; Sener & Koltun, NeurIPS 2018, arXiv:1810.04650), via torchjd.

    The min-norm point of the convex hull of the task gradients (weights >= 0 summing to 1, found by Frank-Wolfe):
    a common descent direction, zero at a Pareto-stationary point.
    """

    @dataclass
    class Config(GradientWeighting.Config):
        name: str = "mgda"
        epsilon: float = 1e-3  # Frank-Wolfe stops when the step is below this
        max_iters: int = 100

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        self.method = _torchjd.mgda(cfg.epsilon, cfg.max_iters)

    def combine(self, J, G):
        return None, _torchjd.weights(self.method, G)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, epsilon={self.cfg.epsilon}, max_iters={self.cfg.max_iters}"


@WEIGHTINGS.register("mgda_ub")
class MGDAUB(MGDA):
    """MGDA-UB (Sener & Koltun, NeurIPS 2018, arXiv:1810.04650): MGDA on the gradients w.r.t. the shared
    representation, an upper bound of the parameter-gradient problem that needs one backward through the encoder."""

    @dataclass
    class Config(MGDA.Config):
        name: str = "mgda_ub"
        mode: str = "rep"
