"""What COSMOS and PBI share: a loss that scalarises the task losses along a preference vector r (torchjd's
scalarisers), fixed or drawn from a Dirichlet distribution every step, and the weights its gradient gives each task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import MTLError
from .base import Weighting, check_weights


class PreferenceScalarization(Weighting):
    """A loss f(L; r) along a preference r on the simplex. Subclasses set `self.scalarizer` (a torchjd Scalarizer
    whose `weights` attribute is r). Logged weights are the gradient's, dLoss/dL_k."""

    @dataclass
    class Config(Weighting.Config):
        preference: list[float] | None = None  # r, one non-negative value per task (normalised); None: uniform
        # draw r ~ Dirichlet(dirichlet * 1) every step instead (the papers' way to cover the Pareto front); None: fixed
        dirichlet: float | None = None

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        K = len(self.tasks)
        r = torch.ones(K) if cfg.preference is None else check_weights(cfg.preference, tasks, "weighting.preference")
        if cfg.dirichlet is not None and not cfg.dirichlet > 0:
            raise MTLError(f"weighting.dirichlet={cfg.dirichlet} must be > 0 (a concentration), or null for a fixed r.")
        self.register_buffer("r", r / r.sum(), persistent=False)
        self.stochastic = cfg.dirichlet is not None  # a fresh r per step, from torch's generator (reseeded per step)

    def preference(self, losses: Tensor) -> Tensor:
        if self.cfg.dirichlet is None:
            return self.r.to(losses)
        alpha = torch.full((self.num_tasks,), float(self.cfg.dirichlet))
        return torch.distributions.Dirichlet(alpha).sample().to(losses)

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        self.scalarizer.weights = self.preference(losses)
        w = torch.func.grad(self.scalarizer)(losses.detach())
        return self.scalarizer(losses), w

    def extra_repr(self) -> str:
        pref = "uniform" if self.cfg.preference is None else self.cfg.preference
        return f"tasks={self.tasks}, preference={pref}, dirichlet={self.cfg.dirichlet}"
