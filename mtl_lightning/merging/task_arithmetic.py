from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ..errors import MTLError
from .base import MERGINGS, Merging


@MERGINGS.register("task_arithmetic")
class TaskArithmetic(Merging):
    """Task Arithmetic (Ilharco et al., ICLR 2023, arXiv:2212.04089): theta = theta_0 + lambda sum_t tau_t, the
    task vectors added with one scaling coefficient lambda, chosen on validation data among `lambdas` (the paper's
    grid: 0 to 1 in steps of 0.05; ours is coarser by default, each value costs an evaluation)."""

    @dataclass
    class Config(Merging.Config):
        name: str = "task_arithmetic"
        lambdas: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0])

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if not cfg.lambdas or any(not lam > 0 for lam in cfg.lambdas):
            raise MTLError(f"merging.lambdas={cfg.lambdas} must be one or more values > 0.")

    def merge(self, theta0: Tensor, tau: Tensor, lam: float = 0.3) -> Tensor:
        return theta0 + lam * tau.sum(0)

    def grid(self) -> list[dict]:
        return [{"lam": lam} for lam in self.cfg.lambdas]
