"""What the bilevel weightings (Auto-Lambda, FORUM) share: task weights moved by an upper-level loss of the model they
would give, the `target` tasks', every `every`-th step, on one device. Where the upper level's batches come from is
each method's own (Auto-Lambda: validation batches; FORUM: half of each training batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MTLError
from .auxiliary import target_indices
from .base import Weighting


class Bilevel(Weighting):
    """A weighting whose weights (a buffer, with Adam's moments) follow a hypergradient of the `target` tasks'
    upper-level loss (every task when unset; some: auxiliary learning, the others serve them). `every`: how often."""

    stateful = True

    @dataclass
    class Config(Weighting.Config):
        target: list[str] | None = None  # primary tasks (None: every task, multi-task learning)
        every: int = 1  # the meta-step before every `every`-th training step (the references: every step)

    def __init__(self, tasks, cfg):
        super().__init__(tasks, cfg)
        targets = range(len(self.tasks)) if cfg.target is None else target_indices(self.tasks, cfg.target)
        if cfg.every < 1:
            raise MTLError(f"weighting.every={cfg.every} must be >= 1.")
        K = len(self.tasks)
        for name in ("exp_avg", "exp_avg_sq"):
            self.register_buffer(name, torch.zeros(K))
        self.register_buffer("t", torch.zeros((), dtype=torch.long))
        primary = torch.tensor([float(k in targets) for k in range(K)])
        self.register_buffer("primary", primary, persistent=False)

    def check(self, precision: str, distributed: bool) -> None:
        if distributed or precision.startswith("16"):
            raise MTLError(
                f"weighting={self.cfg.name} takes its meta-step on one device in fp32 or bf16 (its meta-gradient is "
                "neither averaged over ranks nor loss-scaled): use trainer.devices=1 and trainer.precision=32 or "
                "bf16-mixed."
            )

    def due(self, module) -> bool:
        """Whether this training step takes a meta-step: not outside a Trainer (no optimiser), and every `every`-th
        step."""
        return getattr(module, "_trainer", True) is not None and module.global_step % self.cfg.every == 0

    def extra_repr(self) -> str:
        target = self.cfg.target if self.cfg.target is not None else "all"
        return f"tasks={self.tasks}, target={target}, every={self.cfg.every}"
