from __future__ import annotations

from dataclasses import dataclass

from ..errors import MTLError
from . import _torchjd
from .registry import WEIGHTINGS
from .stateful import TorchJDStateful


@WEIGHTINGS.register("excess_mtl")
class ExcessMTL(TorchJDStateful):
    """Excess-MTL, robust multi-task learning with excess risks (He et al., ICML 2024, arXiv:2402.02009), via
    torchjd.

    Estimates each task's excess risk as g_k^T H_k^{-1} g_k with an AdaGrad diagonal H_k (the running sum of squared
    gradients), relative to its first value, and moves the weights by an exponentiated-gradient step toward the
    tasks with the most excess risk (distributionally robust). The squared-gradient sums (K x P) and the weights
    are state, saved with the checkpoint. It reads J itself, so it needs `mode=param` (fixed columns); torchjd
    starts the weights at 1/K, as the paper (the authors' code and LibMTL start at 1).
    """

    gramian_only = False
    param_only = True

    @dataclass
    class Config(TorchJDStateful.Config):
        name: str = "excess_mtl"
        robust_step_size: float = 0.01  # LibMTL's default (torchjd's 1.0 saturates within a few hundred steps)
        # Steps of uniform weights whose mean excess risk is the baseline. 1 is the authors' code and LibMTL (the first
        # step only sets the baseline); torchjd's 0 also moves the weights by the first step's raw excess risk, which
        # is not scale-free (in `param` mode it is about the L1 norm of the gradient: it saturates the weights).
        warmup_steps: int = 1

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if cfg.robust_step_size <= 0 or cfg.warmup_steps < 1:
            raise MTLError(
                f"weighting.robust_step_size={cfg.robust_step_size} must be > 0 and "
                f"weighting.warmup_steps={cfg.warmup_steps} >= 1."
            )
        self.method = _torchjd.excess_mtl(cfg.robust_step_size, cfg.warmup_steps)

    def combine(self, J, G):
        return None, self.step_weights(J)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, robust_step_size={self.cfg.robust_step_size}"
