from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Weighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("imtl_l")
class IMTLL(Weighting):
    """IMTL-L, the loss-balancing half of Impartial Multi-Task Learning (Liu et al., ICLR 2021,
    openreview.net/forum?id=IMPnRXEWpvr).

    Learns s_k per task and minimises sum_k exp(s_k) L_k - s_k, which drives every scaled loss exp(s_k) L_k
    towards 1 (at the optimum exp(s_k) = 1 / L_k), so no task dominates by the scale of its loss.
    """

    stateful = True

    def __init__(self, tasks, cfg):
        super().__init__(tasks, cfg)
        self.s = nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        s = self.s.to(losses)
        return (torch.exp(s) * losses - s).sum(), torch.exp(s).detach()
