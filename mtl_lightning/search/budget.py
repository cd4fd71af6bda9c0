"""Equal budgets: every trial of a grid and every cell of a study trains the same number of optimiser steps.

An epoch of a single-task baseline (or of a study cell on fewer domains) is shorter than an epoch of the full
mixture, so "the same max_epochs" would give the baselines fewer steps. The budget is fixed in steps instead: the
experiment's `trainer.max_steps` when set, else its `max_epochs` epochs of the full mixture.
"""

from __future__ import annotations

import math

from ..data import create_datamodule
from ..errors import MTLError


def steps_per_epoch(cfg) -> int:
    dm = create_datamodule(cfg.data, cfg.seed)
    dm.check()
    dm.setup("fit")
    return math.ceil((cfg.data.epoch_size or len(dm.splits["train"])) / cfg.data.batch_size)


def equal_steps(cfg) -> int:
    """The optimiser steps every trial trains: `trainer.max_steps`, or `max_epochs` epochs of the full mixture."""
    if cfg.trainer.max_steps > 0:
        return int(cfg.trainer.max_steps)
    if cfg.trainer.max_epochs < 1:
        raise MTLError(
            "A grid or a study trains every trial for the same number of steps: set trainer.max_steps, or "
            f"trainer.max_epochs >= 1 (got {cfg.trainer.max_epochs}) to count epochs of the full mixture."
        )
    return int(cfg.trainer.max_epochs) * steps_per_epoch(cfg)


def budget_overrides(steps: int) -> list[str]:
    return [f"trainer.max_steps={steps}", "trainer.max_epochs=-1"]
