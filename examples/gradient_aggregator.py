"""A gradient aggregator of your own: the mean of the task gradients rescaled to one common length (their mean
norm), so no task dominates the update by the size of its gradient. Use it as a built-in, in either mode:

    python -m experiments.run exp=digits_mtl plugins=[examples/gradient_aggregator.py] weighting=unit_mean \
        weighting.mode=rep
"""

import torch

from mtl_lightning import WEIGHTINGS, GradientWeighting


@WEIGHTINGS.register("unit_mean")
class UnitMean(GradientWeighting):
    """g = sum_k w_k g_k with w_k = mean_j |g_j| / (K |g_k|): each task's gradient at the mean norm, averaged.

    It sees the gradients only through the Gramian G = J J^T (their norms are sqrt(diag G)), so it is exact under
    DDP as the Gramian methods are (`gramian_only`, inherited)."""

    def combine(self, J, G):  # J (K, N) the task gradients, G (K, K): -> (None: use w^T J, the weights w)
        norms = torch.diagonal(G).clamp(min=1e-12).sqrt()
        return None, norms.mean() / (len(norms) * norms)
