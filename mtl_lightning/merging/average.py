from __future__ import annotations

from torch import Tensor

from .base import MERGINGS, Merging


@MERGINGS.register("average")
class WeightAveraging(Merging):
    """Weight averaging, a uniform model soup of the task models (Wortsman et al., ICML 2022, arXiv:2203.05482):
    theta = theta_0 + mean_t tau_t, the mean of the task models' parameters. Task Arithmetic at lambda = 1/T."""

    def merge(self, theta0: Tensor, tau: Tensor) -> Tensor:
        return theta0 + tau.mean(0)
