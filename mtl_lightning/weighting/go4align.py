from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import MTLError
from .base import Weighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("go4align")
class GO4Align(Weighting):
    """GO4Align, group optimisation for aligning the tasks' progress (Shen et al., NeurIPS 2024, arXiv:2404.06486),
    as its authors' code (autumn9999/GO4Align, `GO4ALIGN`) runs it.

    Each step, from the detached losses: a risk-guided indicator w_k = (sum_j L_j / L_k) p_k, where p (on the simplex,
    state saved with the checkpoint) follows p_k <- p_k exp(-eta L_k) / Z; the tasks are then grouped by w into
    `num_groups` groups (k-means in one dimension), and every task of a group gets the group's mean w. The loss is
    sum_k w_k L_k. `num_groups=1` (the reference's default) gives every task the mean indicator: the loss weights
    follow the tasks' relative progress only through their common scale. Difference: the reference clusters with a
    randomly initialised k-means (kmeans_pytorch); here the grouping is the exact k-means optimum, which in one
    dimension is a split of the sorted values found by dynamic programming: deterministic, no random draws.
    """

    stateful = True

    @dataclass
    class Config(Weighting.Config):
        name: str = "go4align"
        num_groups: int = 1  # groups of tasks that share a weight (the reference's default; 1 to K)
        robust_step_size: float = 1e-4  # eta, the step of the indicator's exponentiated update (the reference's)

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        K = len(self.tasks)
        if not 1 <= cfg.num_groups <= K or cfg.robust_step_size < 0:
            raise MTLError(
                f"weighting.num_groups={cfg.num_groups} must be 1 to the number of tasks ({K}), and "
                f"weighting.robust_step_size={cfg.robust_step_size} >= 0."
            )
        self.register_buffer("p", torch.full((K,), 1.0 / K))

    def weights(self, losses: Tensor) -> Tensor:
        L = losses.detach().to(self.p).clamp(min=1e-12)
        p = self.p * torch.exp(-self.cfg.robust_step_size * L)
        self.p.copy_(p / p.sum())
        w = L.sum() / L * self.p
        return group_means(w, kmeans_1d(w, self.cfg.num_groups)).to(losses)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, num_groups={self.cfg.num_groups}, robust_step_size={self.cfg.robust_step_size}"


def kmeans_1d(x: Tensor, groups: int) -> Tensor:
    """The k-means optimum of the values x (K,) in `groups` groups: each value's group, 0 .. groups - 1 in increasing
    order of value. In one dimension the optimal groups are contiguous in sorted order, so a dynamic programme over the
    split points (O(groups K^2)) finds them exactly."""
    order = torch.argsort(x).tolist()
    v = x[order].double().tolist()
    K = len(v)
    s, s2 = [0.0], [0.0]
    for a in v:
        s.append(s[-1] + a)
        s2.append(s2[-1] + a * a)

    def sse(i, j):  # the values i .. j - 1 of the sorted order as one group
        return s2[j] - s2[i] - (s[j] - s[i]) ** 2 / (j - i)

    inf = float("inf")
    cost = [[inf] * (K + 1) for _ in range(groups + 1)]
    cut = [[0] * (K + 1) for _ in range(groups + 1)]
    cost[0][0] = 0.0
    for g in range(1, groups + 1):
        for j in range(g, K + 1):
            for i in range(g - 1, j):
                c = cost[g - 1][i] + sse(i, j)
                if c < cost[g][j]:
                    cost[g][j], cut[g][j] = c, i
    labels, j = [0] * K, K
    for g in range(groups, 0, -1):
        i = cut[g][j]
        for r in range(i, j):
            labels[order[r]] = g - 1
        j = i
    return torch.tensor(labels)


def group_means(x: Tensor, labels: Tensor) -> Tensor:
    """Every value replaced by the mean of its group."""
    onehot = torch.nn.functional.one_hot(labels.to(x.device)).to(x)  # (K, groups)
    return onehot @ ((onehot.T @ x) / onehot.sum(0))
