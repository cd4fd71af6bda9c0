from __future__ import annotations

from dataclasses import dataclass

from ..errors import MTLError
from . import _torchjd
from .gradient import GradientWeighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("aligned_mtl")
class AlignedMTL(GradientWeighting):
    """Aligned-MTL (Senushkin et al., CVPR 2023, arXiv:2305.19000), via torchjd.

    Aligns the task gradients by the balance transformation that makes the (linear system of the) Jacobian well
    conditioned: every task gets an orthogonal component of equal magnitude, scaled by an eigenvalue of the Gramian
    (`scale_mode`: `min` the smallest, as torchjd; `rmse` the mean, as the authors' code), then averaged.
    """

    @dataclass
    class Config(GradientWeighting.Config):
        name: str = "aligned_mtl"
        scale_mode: str = "min"  # min | median | rmse

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if cfg.scale_mode not in ("min", "median", "rmse"):
            raise MTLError(f"Unknown weighting.scale_mode={cfg.scale_mode!r}. Valid choices: min, median, rmse.")
        self.method = _torchjd.aligned_mtl(cfg.scale_mode)

    def combine(self, J, G):
        return None, _torchjd.weights(self.method, G)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale_mode={self.cfg.scale_mode}"
