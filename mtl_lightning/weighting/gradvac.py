from __future__ import annotations

from dataclasses import dataclass

from ..errors import MTLError
from . import _torchjd
from .registry import WEIGHTINGS
from .stateful import TorchJDStateful


@WEIGHTINGS.register("gradvac")
class GradVac(TorchJDStateful):
    """Gradient Vaccine (Wang et al., ICLR 2021, arXiv:2010.05874), via torchjd.

    Like PCGrad, but instead of removing conflicts it raises each pair's cosine similarity to a target: an
    exponential moving average (decay `beta`) of the cosines seen so far. When g_i's cosine with g_j falls below
    the target, a multiple of g_j is added to g_i so that it reaches it; the update is the sum of the corrected
    gradients. The targets are state, saved with the checkpoint. torchjd computes it from the Gramian and updates
    every pair's target at every step, as the paper; LibMTL 1.1.5 only updates it when it corrected the pair (see
    tests/test_libmtl_parity.py).
    """

    @dataclass
    class Config(TorchJDStateful.Config):
        name: str = "gradvac"
        beta: float = 0.5  # EMA decay of the target cosines (LibMTL's default)

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if not 0 <= cfg.beta <= 1:
            raise MTLError(f"weighting.beta={cfg.beta} must be within [0, 1].")
        self.method = _torchjd.gradvac(cfg.beta)

    def combine(self, J, G):
        return None, self.step_weights(G)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.cfg.beta}"
