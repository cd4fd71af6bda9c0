from __future__ import annotations

import torch
from torch import Tensor

from .base import Weighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("gls")
class GLS(Weighting):
    """Geometric Loss Strategy (Chennupati et al., CVPR Workshops 2019, arXiv:1904.08492).

    Minimises the geometric mean (prod_k L_k)^(1/K). Its gradient weights task k by L / (K L_k): tasks with small
    losses get relatively more weight. Those implied weights are what is logged.
    """

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        losses = losses.clamp(min=1e-12)
        loss = torch.exp(torch.log(losses).mean())
        return loss, (loss / (self.num_tasks * losses)).detach()
