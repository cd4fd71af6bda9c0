from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Weighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("dwa")
class DWA(Weighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, arXiv:1803.10704).

    w = softmax(r / T) with r_k = L_k(e-1) / L_k(e-2), the ratio of task k's mean training loss over the last two
    epochs: a task whose loss falls slowly gets more weight. Uniform for the first two epochs. The paper scales w
    to sum to K; here it sums to 1, like `uniform` (w_k = 1/K), so the two compare at the same learning rate.
    The loss history lives in buffers and is saved with the checkpoint.
    """

    stateful = True

    @dataclass
    class Config(Weighting.Config):
        name: str = "dwa"
        temperature: float = 2.0

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        K = len(self.tasks)
        self.register_buffer("history", torch.zeros(2, K))  # mean losses of epochs e-2, e-1
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(K))  # this epoch's loss sum and step count
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def weights(self, losses: Tensor) -> Tensor:
        if self.training:
            self.running += losses.detach().to(self.running)
            self.steps += 1
        if self.epochs_seen < 2:
            return torch.full_like(losses, 1.0 / self.num_tasks)
        r = self.history[1] / self.history[0].clamp(min=1e-12)
        return torch.softmax(r / self.cfg.temperature, 0).to(losses)

    def on_train_epoch_end(self) -> None:
        if self.steps > 0:
            self.history = torch.stack([self.history[1], self.running / self.steps])
            self.epochs_seen += 1
        self.running.zero_()
        self.steps.zero_()

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, temperature={self.cfg.temperature}"
