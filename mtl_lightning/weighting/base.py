"""The interface every weighting method implements.

A weighting is a small `nn.Module` the LightningModule calls in `training_step`; it is not a Lightning Callback,
because callbacks cannot change the loss (their return values are discarded). Being an `nn.Module`, any state a
method keeps (learned log-variances, loss histories) lives in its parameters and buffers, so it is saved and
restored with the model's checkpoint for free. Methods that need state outside the model (ForkMerge's branches)
pair a weighting with a Callback that holds that state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import MTLError


class Weighting(nn.Module):
    """A loss weighting: one scalar loss from the K task losses of a training step. Subclass it, register it with
    `@WEIGHTINGS.register("my_method")`, and `weighting=my_method` builds it (examples/loss_weighting.py).

    To implement: `weights(losses) -> (K,) weights` (the loss is then sum_k w_k L_k), or `forward(losses) -> (loss,
    weights)` for a loss that is not a weighted sum (GLS's geometric mean, uncertainty's regulariser). Options: a
    dataclass `Config(Weighting.Config)` with `name` defaulting to the registered name and one typed field per option
    (`weighting.alpha=0.3`; a mistyped key fails with the valid ones); check their values in `__init__` and raise
    `MTLError` naming the key.

    What the framework guarantees: `losses` is (K,), task k's mean loss over the samples labelled for it in the
    batch, in the order of `tasks` (the mixture's tasks after `data.tasks`), finite (a NaN stops the run before the
    weighting sees it); `weights` is called once per training step (per branch under ForkMerge); the returned
    weights are logged as `weights/<task>`. Being an `nn.Module`, its parameters (learned weights: trained by the
    model's optimiser) and persistent buffers are saved in every checkpoint and restored on resume; plain Python
    attributes are not (declare `stateful = True` when it carries state from step to step: the tests check that the
    checkpoint holds it; `signed = True` when a weight may be negative, which the tests otherwise refuse). Hooks:
    `on_train_epoch_start(epoch)` (also when a run resumes mid-epoch: make it idempotent), `on_train_epoch_end()`,
    `check(precision, distributed)` and `attach(module)` to refuse at start-up what it cannot run, and
    `mixture_probs()` for `data.mixing=sample` (only fixed scalarizations have them).
    """

    name: ClassVar[str]
    stochastic: ClassVar[bool] = False  # draws random weights each step (RLW)
    auxiliary: ClassVar[bool] = False  # serves one `target` task with the others (GCS, OL-AUX, ARML, Post-train)
    # its gradient may raise a task's loss (a negative weight): PBI pulls the loss vector onto a preference ray
    signed: ClassVar[bool] = False
    stateful: ClassVar[bool] = False  # carries state from step to step (learned weights, moving averages): checkpointed

    @dataclass
    class Config:
        name: str = "uniform"

    def __init__(self, tasks: Sequence[str], cfg: Config):
        super().__init__()
        self.tasks, self.cfg = list(tasks), cfg

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Per-task mean losses (K,) -> (scalar loss to back-propagate, the K weights used, detached)."""
        w = self.weights(losses)
        check_output(self, w, losses)
        return (w * losses).sum(), w.detach()

    def weights(self, losses: Tensor) -> Tensor:
        raise NotImplementedError

    def mixture_probs(self) -> Tensor:
        """Sampling probabilities over domains for `data.mixing=sample`; only scalarizations define them."""
        raise MTLError(
            f"data.mixing=sample draws each batch from domains with fixed probabilities, which weighting="
            f"{self.name} does not define (it weights losses). Use weighting=uniform or weighting=fixed with "
            f"data.mixing=sample, or keep weighting={self.name} with data.mixing=loss."
        )

    def check(self, precision: str, distributed: bool) -> None:
        """Called at start-up with the Trainer's precision and whether it runs on several processes."""

    def attach(self, module) -> None:
        """Called once by the module that trains it, its network built: to size parameters by the network (LDC-MTL's
        router) or refuse a network it cannot work on (BayesAgg-MTL's linear heads), before any run folder exists."""

    def on_train_epoch_start(self, epoch: int) -> None:
        """Called by the LightningModule at the start of every training epoch, with its index (Post-train), and when
        training starts or resumes (mid-epoch too, where Lightning skips the epoch-start hook): so it must be
        idempotent for one epoch."""

    def on_train_epoch_end(self) -> None:
        """Called by the LightningModule at the end of every training epoch (DWA keeps epoch loss averages)."""

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"


def check_output(weighting: Weighting, w, losses: Tensor) -> None:
    """What `weights()` returned is one finite weight per task: a wrong shape would fail deep in the step, a NaN
    weight would make the next step's losses NaN and be blamed on the tasks' data. Named, with where it comes from."""
    if not isinstance(w, Tensor) or w.shape != losses.shape:
        got = f"shape {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
        raise MTLError(
            f"{_named(weighting)}: weights() returned {got} for {len(losses)} tasks {weighting.tasks}; it must return "
            f"a tensor of shape ({len(losses)},), one weight per task in that order."
        )
    if not torch.isfinite(w).all():  # one host sync, beside the one that checks the losses
        raise MTLError(
            f"{_named(weighting)}: weights() returned non-finite weights {[round(v, 4) for v in w.tolist()]} for the "
            f"finite task losses {[round(v, 4) for v in losses.tolist()]}; training stopped. Look at that method's "
            "weights."
        )


def _named(weighting: Weighting) -> str:
    from ..registry import where

    return f"weighting={weighting.cfg.name} ({type(weighting).__name__}, {where(type(weighting))})"


def check_weights(weights: Sequence[float] | None, tasks: Sequence[str], key: str) -> Tensor:
    """Validate user-given weights: one per task, finite, non-negative, not all zero."""
    if weights is None:
        raise MTLError(f"{key} is required: give one non-negative weight per task, in order {list(tasks)}.")
    w = torch.as_tensor(list(weights), dtype=torch.float32)
    if w.ndim != 1 or len(w) != len(tasks):
        raise MTLError(
            f"{key} has {len(w)} values but there are {len(tasks)} tasks {list(tasks)}: give one weight per task."
        )
    if not torch.isfinite(w).all() or (w < 0).any():
        raise MTLError(f"{key}={list(weights)} must be finite and non-negative (one per task {list(tasks)}).")
    if w.sum() <= 0:
        raise MTLError(f"{key}={list(weights)} are all zero: at least one task must have a positive weight.")
    return w
