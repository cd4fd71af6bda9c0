from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._adam import adam_step
from .base import Weighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("famo")
class FAMO(Weighting):
    """FAMO, fast adaptive multitask optimisation (Liu et al., NeurIPS 2023, arXiv:2306.03792).

    Loss-level, one backward: the model minimises sum_k z_k log(L_k) / c with z = softmax(xi), c = sum_k z_k / L_k
    (so the update is sum_k (z_k / c L_k) grad L_k: weights z_k / (c L_k), logged, summing to 1). After the
    optimiser step the same batch is evaluated again (one extra forward, no backward, as in the reference code)
    and xi moves by Adam (lr `lr`, weight decay `gamma`) along the change of log-losses it caused, raising the
    weight of tasks whose loss fell least. xi and its Adam moments are buffers, saved with the checkpoint.
    """

    stateful = True

    needs_post_step_losses = True

    @dataclass
    class Config(Weighting.Config):
        name: str = "famo"
        lr: float = 0.025  # the reference implementation's w_lr
        gamma: float = 0.01  # weight decay of the logits

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        K = len(self.tasks)
        for name in ("logits", "exp_avg", "exp_avg_sq", "prev"):
            self.register_buffer(name, torch.zeros(K))
        self.register_buffer("t", torch.zeros((), dtype=torch.long))

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        z = torch.softmax(self.logits, 0).to(losses)
        d = losses.clamp(min=1e-8)
        c = (z / d).sum().detach()
        if self.training:
            self.prev.copy_(losses.detach())
        return (z * d.log()).sum() / c, (z / (c * d)).detach()

    def update(self, new_losses: Tensor) -> None:
        """After the step: move the logits along delta = log L_before - log L_after (through the softmax)."""
        delta = self.prev.clamp(min=1e-8).log() - new_losses.detach().to(self.prev).clamp(min=1e-8).log()
        z = torch.softmax(self.logits, 0)
        grad = z * (delta - (z * delta).sum()) + self.cfg.gamma * self.logits  # softmax VJP + weight decay
        adam_step(self.logits, grad, self.exp_avg, self.exp_avg_sq, self.t, self.cfg.lr)  # the reference's Adam

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, lr={self.cfg.lr}, gamma={self.cfg.gamma}"
