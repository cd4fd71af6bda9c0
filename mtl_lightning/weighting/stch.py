from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchjd.scalarization import STCH as TorchJDSTCH

from ..errors import MTLError
from .base import Weighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("stch")
class STCH(Weighting):
    """STCH, smooth Tchebycheff scalarisation (Lin et al., ICML 2024, arXiv:2402.19078), as the authors' multi-task
    code (Xi-L/STCH, STCH_MTL) and LibMTL's STCH run it.

    Warm-up: for epochs 0 .. `warmup_epochs` the loss is sum_k log L_k, and the last of them (epoch `warmup_epochs`)
    averages the task losses into the nadir point n. From then on the loss is
    K mu log sum_k exp(log(L_k / n_k) / mu), the smoothed maximum of the log-normalised losses (torchjd's STCH
    scalariser with unit preferences, times K as the reference): as mu -> 0 it is K max_k log(L_k / n_k), the
    Tchebycheff scalarisation; as mu grows its gradient tends to that of sum_k log(L_k / n_k), the linear one.
    Logged weights are the gradient's weights dLoss/dL_k. The nadir point and its running sum are buffers, saved with
    the checkpoint.
    """

    stateful = True

    @dataclass
    class Config(Weighting.Config):
        name: str = "stch"
        mu: float = 1.0  # smoothing (LibMTL's default; the paper evaluates 0.01 to 1)
        warmup_epochs: int = 4  # epochs of log-loss training before the nadir point is fixed (LibMTL's default)

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        if not cfg.mu > 0 or cfg.warmup_epochs < 0:
            raise MTLError(f"weighting.mu={cfg.mu} must be > 0 and weighting.warmup_epochs={cfg.warmup_epochs} >= 0.")
        K = len(self.tasks)
        self.smooth = TorchJDSTCH(cfg.mu, weights=torch.ones(K))
        self.register_buffer("loss_sum", torch.zeros(K))  # the nadir epoch's loss sum and step count
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("nadir", torch.zeros(K))  # 0 until the warm-up ends
        self.epoch, self.ready = 0, False  # ready: the nadir point is set (a cache of nadir.any(), a host sync)

    def on_train_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        d = losses.clamp(min=1e-20)  # the reference's log(L + 1e-20), without moving a loss that is not 0
        if self.epoch <= self.cfg.warmup_epochs:
            if self.training and self.epoch == self.cfg.warmup_epochs:
                self.loss_sum += losses.detach().to(self.loss_sum)
                self.steps += 1
            return d.log().sum(), (1 / d).detach()
        if not self.ready and not self.nadir.any():  # the first step after the warm-up: fix the nadir point
            if not self.steps:
                raise MTLError(
                    f"weighting=stch fixes its nadir point from the losses of epoch {self.cfg.warmup_epochs}, which "
                    "this run did not train (it resumed past it from a checkpoint without STCH's state?)."
                )
            self.nadir.copy_(self.loss_sum / self.steps)
        self.ready = True
        self.smooth.weights = self.smooth.weights.to(losses)
        logs = (d / self.nadir.to(d)).log()
        loss = self.smooth(logs) * len(losses)
        w = len(losses) * torch.softmax(logs.detach() / self.cfg.mu, 0) / d.detach()
        return loss, w

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, mu={self.cfg.mu}, warmup_epochs={self.cfg.warmup_epochs}"
