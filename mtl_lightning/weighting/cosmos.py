from __future__ import annotations

from dataclasses import dataclass

from torchjd.scalarization import COSMOS as TorchJDCOSMOS

from ..errors import MTLError
from .preference import PreferenceScalarization
from .registry import WEIGHTINGS


@WEIGHTINGS.register("cosmos")
class COSMOS(PreferenceScalarization):
    """COSMOS's scalarisation (Ruchte & Grabocka, ICDM 2021, arXiv:2103.13392), via torchjd's COSMOS scalariser.

    Loss r^T L - lambda_ cos(r, L): the linear scalarisation with preference r, minus a reward for a loss vector
    that points along r, which moves the solution toward the preference ray (lambda_ = 0 is the linear one).
    Difference: the paper also feeds r to the network (concatenated to the input) and draws r from a Dirichlet
    distribution every step, to learn the whole Pareto front in one model; here r is fixed (one trade-off, the
    multi-task setting) unless `dirichlet` is set, and the network does not see it.
    """

    @dataclass
    class Config(PreferenceScalarization.Config):
        name: str = "cosmos"
        lambda_: float = 1.0  # the cosine penalty (the paper tunes it per dataset, 0.01 to 8)

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if cfg.lambda_ < 0:
            raise MTLError(f"weighting.lambda_={cfg.lambda_} must be >= 0 (0: the linear scalarisation).")
        self.scalarizer = TorchJDCOSMOS(cfg.lambda_, self.r)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambda_={self.cfg.lambda_}"
