from __future__ import annotations

import torch
from torch import Tensor

from .base import Weighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("rlw")
class RLW(Weighting):
    """Random Loss Weighting (Lin et al., TMLR 2022, arXiv:2111.10603).

    Each step draws w = softmax(z), z ~ N(0, I). The draw uses torch's global generator, which the LightningModule
    reseeds from (seed, step), so a resumed run draws the same weights.
    """

    stochastic = True

    def weights(self, losses: Tensor) -> Tensor:
        return torch.softmax(torch.randn(self.num_tasks), 0).to(losses)
