from __future__ import annotations

from dataclasses import dataclass

from . import _torchjd
from .gradient import GradientWeighting, psd_sqrt
from .registry import WEIGHTINGS


@WEIGHTINGS.register("nash_mtl")
class NashMTL(GradientWeighting):
    """Nash-MTL, multi-task learning as a bargaining game (Navon et al., ICML 2022, arXiv:2202.01017), via torchjd.

    Weights alpha solving G alpha = 1 / alpha (the Nash bargaining solution), by a sequence of convex problems
    (cvxpy), warm-started from the previous step's alpha: stateful. The state (alpha, step counter, normalisation)
    is saved in the checkpoint, so a resumed run continues the same weights. torchjd reads J only through J J^T,
    so it is given a K x K square root of the Gramian, which also makes it exact under DDP.
    """

    stateful = True

    @dataclass
    class Config(GradientWeighting.Config):
        name: str = "nash_mtl"
        max_norm: float = 1.0  # clip |J^T alpha| to this (0: no clipping), as the reference implementation
        update_weights_every: int = 1
        optim_niter: int = 20

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        self.method = _torchjd.nash_mtl(len(self.tasks), cfg.max_norm, cfg.update_weights_every, cfg.optim_niter)

    def combine(self, J, G):
        return None, _torchjd.weights(self.method, psd_sqrt(G))

    def get_extra_state(self):
        return _torchjd.nash_state(self.method)

    def set_extra_state(self, state) -> None:
        _torchjd.set_nash_state(self.method, state)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{super().extra_repr()}, max_norm={c.max_norm}, update_weights_every={c.update_weights_every}"
