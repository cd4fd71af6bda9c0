from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import MTLError
from .base import MERGINGS, Merging, check_fraction


def drop_and_rescale(tau: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Each entry of the task vectors dropped (set to 0) with probability p, the rest scaled by 1 / (1 - p): the
    expectation of every entry is kept."""
    keep = torch.rand(tau.shape, generator=generator, device=tau.device) >= p
    return tau * keep / (1 - p)


@MERGINGS.register("dare")
class DARE(Merging):
    """DARE, drop and rescale (Yu et al., ICML 2024, arXiv:2311.03099): before merging, each task vector loses a
    fraction `p` of its entries at random and the rest are scaled by 1 / (1 - p), which keeps each entry's
    expectation; then `base` (task_arithmetic or ties) merges the sparse vectors. Draws from a generator seeded with
    `seed`: a merge is reproducible."""

    @dataclass
    class Config(Merging.Config):
        name: str = "dare"
        p: float = 0.9  # the drop rate (the paper's experiments: 0.9 and up for fine-tuned language models)
        base: str = "task_arithmetic"
        seed: int = 0

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        check_fraction(cfg.p, "p")
        if cfg.base not in ("task_arithmetic", "ties"):
            raise MTLError(f"Unknown merging.base={cfg.base!r} for merging=dare. Valid choices: task_arithmetic, ties.")
        cls = MERGINGS.get(cfg.base)
        self.base = cls(cls.Config())

    def merge(self, theta0: Tensor, tau: Tensor, **coefficients) -> Tensor:
        sparse = drop_and_rescale(tau, self.cfg.p, torch.Generator(tau.device).manual_seed(self.cfg.seed))
        return self.base.merge(theta0, sparse, **coefficients)

    def grid(self) -> list[dict]:
        return self.base.grid()
