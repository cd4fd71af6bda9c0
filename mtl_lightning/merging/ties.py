from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import MTLError
from .base import MERGINGS, Merging, check_fraction


def trim(tau: Tensor, keep: float) -> Tensor:
    """Each task vector with all but its `keep` fraction of largest-magnitude entries set to 0: floor(keep N) entries
    kept (fewer where magnitudes tie at the cut). The authors' code (and fusion-bench's) keeps every entry at least as
    large as the (N - floor(keep N))-th smallest magnitude: one entry more."""
    N = tau.shape[1]
    k = N - int(N * keep)  # the k-th smallest magnitude is the largest one dropped
    if k <= 0:
        return tau.clone()
    kth = tau.abs().kthvalue(k, dim=1, keepdim=True).values
    return tau * (tau.abs() > kth)


def elect(trimmed: Tensor) -> Tensor:
    """Per entry, the sign of the total mass sum_t tau_t (entries with none take the sign of the whole sum)."""
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    return sign


def disjoint_mean(trimmed: Tensor, sign: Tensor) -> Tensor:
    """Per entry, the mean of the task values that agree with the elected sign (zeros excluded)."""
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    kept = trimmed * agree
    return kept.sum(0) / agree.sum(0).clamp(min=1)


@MERGINGS.register("ties")
class TIES(Merging):
    """TIES-Merging (Yadav et al., NeurIPS 2023, arXiv:2306.01708): trim each task vector to its top-`keep` fraction
    of magnitudes, elect a sign per parameter (the sign of the trimmed vectors' sum), average the entries that agree
    with it (a disjoint mean), and add lambda times the result to theta_0. `keep` (the paper's k, 20% by default) and
    lambda are chosen on validation data among `keeps` x `lambdas` (the paper: lambda in 0.8 .. 1.8)."""

    @dataclass
    class Config(Merging.Config):
        name: str = "ties"
        keeps: list[float] = field(default_factory=lambda: [0.2])  # fractions of each task vector kept
        lambdas: list[float] = field(default_factory=lambda: [0.6, 0.8, 1.0, 1.2, 1.4])

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        for k in cfg.keeps:
            check_fraction(k, "keeps", closed=True)
        if not cfg.keeps or not cfg.lambdas or any(not lam > 0 for lam in cfg.lambdas):
            raise MTLError(f"merging.keeps={cfg.keeps} and merging.lambdas={cfg.lambdas} need one value or more each.")

    def merge(self, theta0: Tensor, tau: Tensor, keep: float = 0.2, lam: float = 1.0) -> Tensor:
        trimmed = trim(tau, keep)
        return theta0 + lam * disjoint_mean(trimmed, elect(trimmed))

    def grid(self) -> list[dict]:
        return [{"keep": k, "lam": lam} for k in self.cfg.keeps for lam in self.cfg.lambdas]
