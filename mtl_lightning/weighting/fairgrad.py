from __future__ import annotations

from dataclasses import dataclass

from ..errors import MTLError
from . import _torchjd
from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("fairgrad")
class FairGrad(GradientWeighting):
    """FairGrad, fair resource allocation (Ban & Ji, ICML 2024, arXiv:2402.15638), via torchjd.

    The update is the weighted gradient whose per-task utilities g_k . d are alpha-fair: the weights solve
    G w = w^(-1/alpha). alpha -> 0 is the average, alpha = 1 proportional fairness (the Nash bargaining solution of
    Nash-MTL), alpha -> infinity max-min fairness.
    """

    @dataclass
    class Config(GradientWeighting.Config):
        name: str = "fairgrad"
        alpha: float = 1.0  # proportional fairness; the paper sweeps {0.5, 1, 2, 5, 10}

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if not cfg.alpha > 0:
            raise MTLError(f"weighting.alpha={cfg.alpha} must be > 0 (FairGrad's alpha-fairness).")
        self.method = _torchjd.fair_grad(cfg.alpha)

    def combine(self, J, G):
        return None, _torchjd.weights(self.method, G)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.cfg.alpha}"
