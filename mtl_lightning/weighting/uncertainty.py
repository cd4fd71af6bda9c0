from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Weighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("uncertainty")
class Uncertainty(Weighting):
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, arXiv:1705.07115).

    Learns s_k = log sigma_k^2 per task and minimises sum_k exp(-s_k) L_k + s_k. At the optimum of s_k for a fixed
    loss, exp(-s_k) = 1 / L_k: each task is weighted by its inverse loss. The s_k are parameters of this module, so
    the optimiser trains them and the checkpoint keeps them.
    """

    stateful = True

    def __init__(self, tasks, cfg):
        super().__init__(tasks, cfg)
        self.log_var = nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        s = self.log_var.to(losses)
        return (torch.exp(-s) * losses + s).sum(), torch.exp(-s).detach()
