"""What DB-MTL and MoCo share: a moving average of the task gradients (K x P), carried from step to step."""

from __future__ import annotations

import torch
from torch import Tensor

from .gradient import GradientWeighting


class TrackedGradients(GradientWeighting):
    """A gradient method that tracks each task's gradient across steps: `self.tracked` (K, P), None before the first
    step (P is known only then), and the step count `self.t`, both saved with the checkpoint. The rows belong to the
    same coordinates every step: `mode=param` only. Weights depend on the tracked rows, not on G alone."""

    stateful = True
    param_only = True
    gramian_only = False

    def __init__(self, tasks, cfg):
        super().__init__(tasks, cfg)
        self.tracked: Tensor | None = None
        self.register_buffer("t", torch.zeros((), dtype=torch.long))

    def track(self, J: Tensor, rate: float) -> Tensor:
        """tracked <- tracked - rate * (tracked - J), from zeros, as both references; returns the new rows."""
        prev = torch.zeros_like(J) if self.tracked is None else self.tracked.to(J)
        self.tracked = prev - rate * (prev - J)
        return self.tracked

    def get_extra_state(self):
        return {} if self.tracked is None else {"tracked": self.tracked.detach().clone()}

    def set_extra_state(self, state) -> None:
        self.tracked = state.get("tracked")  # moved to J's device at the next step
