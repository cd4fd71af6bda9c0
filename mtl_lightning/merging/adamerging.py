from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import MTLError
from .base import MERGINGS, Merging


@MERGINGS.register("adamerging")
class AdaMerging(Merging):
    """AdaMerging (Yang et al., ICLR 2024, arXiv:2310.02575): the merging coefficients learned without labels, by
    minimising the merged model's prediction entropy on unlabelled inputs. theta = theta_0 + sum_t lambda_t * tau_t
    with one lambda per task (`granularity=task`) or per task and parameter tensor (`layer`, the paper's better
    variant), from `init`, by Adam (the paper: lr 1e-3, 500 steps, lambda 0.3 at the start). Difference: the paper
    adapts on the test inputs; a run here adapts on the validation split's inputs (its labels unused), so the test
    split stays unseen."""

    learned = True  # its coefficients come from `learn`, not from a grid scored on validation

    @dataclass
    class Config(Merging.Config):
        name: str = "adamerging"
        granularity: str = "layer"  # layer: a lambda per task and parameter tensor | task: one per task
        init: float = 0.3
        lr: float = 1e-3
        steps: int = 500

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if cfg.granularity not in ("layer", "task"):
            raise MTLError(f"Unknown merging.granularity={cfg.granularity!r}. Valid choices: layer, task.")
        if not cfg.lr > 0 or cfg.steps < 0:
            raise MTLError(f"merging.lr={cfg.lr} must be > 0 and merging.steps={cfg.steps} >= 0.")

    def merge(self, theta0: Tensor, tau: Tensor, lambdas: Tensor | None = None, sizes=None) -> Tensor:
        """lambdas: (T, 1) task-wise or (T, L) per parameter tensor of `sizes` (their numbers of entries, in order);
        None: every lambda at `init`."""
        if lambdas is None:
            lambdas = torch.full((len(tau), 1), self.cfg.init, device=tau.device)
        if lambdas.shape[1] > 1:
            lambdas = torch.repeat_interleave(lambdas, torch.as_tensor(sizes, device=tau.device), dim=1)
        return theta0 + (lambdas * tau).sum(0)

    def learn(
        self,
        theta0: Tensor,
        tau: Tensor,
        sizes: list[int],
        batches: Iterator,
        entropy: Callable[[Tensor, object], Tensor],
    ) -> tuple[Tensor, list[float]]:
        """The lambdas that minimise `entropy(theta, batch)` (the merged model's mean prediction entropy on a batch of
        inputs), one Adam step per batch; returns them and the entropy at each step."""
        shape = (len(tau), len(sizes) if self.cfg.granularity == "layer" else 1)
        lambdas = torch.full(shape, self.cfg.init, device=tau.device, requires_grad=True)
        opt = torch.optim.Adam([lambdas], lr=self.cfg.lr)
        trace = []
        for _ in range(self.cfg.steps):
            loss = entropy(self.merge(theta0, tau, lambdas, sizes), next(batches))
            opt.zero_grad()
            loss.backward()
            opt.step()
            trace.append(loss.item())
        return lambdas.detach(), trace


def prediction_entropy(kind: str, out: Tensor) -> Tensor | None:
    """The mean entropy of a task's predicted distribution: over classes (classification; per pixel, segmentation),
    or of a Bernoulli (binary). None for tasks that predict no distribution (regression, depth, normals)."""
    if kind in ("classification", "segmentation"):
        logp = torch.log_softmax(out.float(), dim=1)
        return -(logp.exp() * logp).sum(1).mean()
    if kind == "binary":
        p = torch.sigmoid(out.float())
        return -(p * torch.log(p.clamp(min=1e-12)) + (1 - p) * torch.log((1 - p).clamp(min=1e-12))).mean()
    return None
