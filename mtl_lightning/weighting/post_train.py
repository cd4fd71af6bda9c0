from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import MTLError
from .auxiliary import target_index
from .base import Weighting
from .registry import WEIGHTINGS


@WEIGHTINGS.register("post_train")
class PostTrain(Weighting):
    """Post-train: joint training on the target and the auxiliary tasks, then fine-tuning on the target alone (the
    baseline of ForkMerge's tables, Jiang et al., NeurIPS 2023, arXiv:2301.12618).

    For the first `joint_epochs` epochs every task has weight 1 (the target plus `aux_weight` x each auxiliary, as
    ForkMerge's joint branch); afterwards only the target trains (weight 1). The switch follows the trainer's
    epoch, so a resumed run switches at the same epoch. The optimiser and its schedule carry on across the switch.
    """

    auxiliary = True  # one target task; the others serve it

    @dataclass
    class Config(Weighting.Config):
        name: str = "post_train"
        target: str = ""
        joint_epochs: int = 0  # epochs of joint training before the target-only fine-tuning
        aux_weight: float = 1.0

    def __init__(self, tasks, cfg: Config):
        super().__init__(tasks, cfg)
        self.t = target_index(self.tasks, cfg.target, self.name)
        if cfg.joint_epochs < 1 or not cfg.aux_weight >= 0:
            raise MTLError(
                f"weighting=post_train needs weighting.joint_epochs >= 1 (got {cfg.joint_epochs}): the epochs of joint"
                f" training before fine-tuning on {cfg.target}; and weighting.aux_weight >= 0 (got {cfg.aux_weight})."
            )
        joint = torch.full((len(self.tasks),), float(cfg.aux_weight))
        joint[self.t] = 1.0
        # buffers follow the module to the device (no per-step copy); not saved: they follow from the config
        self.register_buffer("joint", joint, persistent=False)
        self.register_buffer("alone", torch.nn.functional.one_hot(torch.tensor(self.t), len(self.tasks)).float(), False)
        self.finetuning = False

    def on_train_epoch_start(self, epoch: int) -> None:
        self.finetuning = epoch >= self.cfg.joint_epochs

    def weights(self, losses: Tensor) -> Tensor:
        if self.finetuning:
            return self.alone.to(losses)
        return self.joint.to(losses)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, target={self.cfg.target}, joint_epochs={self.cfg.joint_epochs}"
