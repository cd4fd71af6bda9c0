from __future__ import annotations

import torch
from torch import Tensor

from .base import Weighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("uniform")
class Uniform(Weighting):
    """Uniform scalarization: minimise the mean of the task losses, w_k = 1/K.

    The baseline Royer et al. find on par with multi-task optimisers at scale (arXiv:2310.08910).
    For multi-domain data with `data.mixing=sample` it samples every domain with probability 1/K.
    """

    def weights(self, losses: Tensor) -> Tensor:
        return torch.full_like(losses, 1.0 / self.num_tasks)

    def mixture_probs(self) -> Tensor:
        return torch.full((self.num_tasks,), 1.0 / self.num_tasks)
