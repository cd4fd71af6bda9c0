"""Adam on a method's own small state (FAMO's logits, Auto-Lambda's weights), kept in the method's buffers so that
it is checkpointed with them: the update torch.optim.Adam makes, written out."""

from __future__ import annotations

import torch
from torch import Tensor


def adam_step(value: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, t: Tensor, lr: float) -> None:
    """value -= lr * m^ / (sqrt(v^) + 1e-8), betas (0.9, 0.999); every tensor updated in place."""
    b1, b2 = 0.9, 0.999
    t += 1
    exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    n = t.double()  # bias corrections on the device: no host sync in the step
    m = exp_avg / (1 - torch.pow(b1, n)).to(exp_avg)
    v = exp_avg_sq / (1 - torch.pow(b2, n)).to(exp_avg_sq)
    value -= lr * m / (v.sqrt() + 1e-8)
