from __future__ import annotations

from dataclasses import dataclass

from ..errors import MTLError
from . import _torchjd
from .gradient import GradientWeighting, least_squares_weights
from .registry import WEIGHTINGS


@WEIGHTINGS.register("graddrop")
class GradDrop(GradientWeighting):
    """GradDrop, gradient sign dropout (Chen et al., NeurIPS 2020, arXiv:2010.06808), via torchjd.

    Per coordinate, keeps only the task gradients of one sign, chosen at random with the probability of the
    sign's share (the "purity"); coordinates where all tasks agree pass unchanged. The paper applies it to the
    shared activations: `mode=rep` is its default here. Its randomness follows the per-step reseeding, so runs
    and resumed runs repeat it. `weights/<task>` logs the least-squares weights c with c^T J closest to the result.
    """

    gramian_only = False
    stochastic = True

    @dataclass
    class Config(GradientWeighting.Config):
        name: str = "graddrop"
        mode: str = "rep"
        leak: list[float] | None = None  # per task, the fraction of its gradient that always passes

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if cfg.leak is not None and (len(cfg.leak) != len(self.tasks) or not all(0 <= v <= 1 for v in cfg.leak)):
            raise MTLError(f"weighting.leak={list(cfg.leak)} needs one value in [0, 1] per task {self.tasks}.")
        self.method = _torchjd.graddrop(cfg.leak)

    def combine(self, J, G):
        g = self.method(J)
        return g, least_squares_weights(J, G, g)
