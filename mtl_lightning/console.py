"""What a run shows on the console: one summary line, a line per epoch (or a progress bar in a terminal), progress
for every long phase, warnings the user can act on; and silence for what is not the user's to act on (Lightning's
tips, device banners, a deprecation inside Lightning).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings

from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only

# Lightning's and torch's notices that no setting of ours or the user's changes: the litlogger tip, "GPU available",
# "`Trainer.fit` stopped", a `_pytree` deprecation inside Lightning, the worker-count hint for in-memory data
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*does not have many workers.*",
    r".*is smaller than the logging interval.*",
)


def quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def say(message: str) -> None:
    """A progress line, on rank 0 only (DDP's other ranks run the same code)."""
    if not rank_zero_only.rank:
        print(message, flush=True)


def warn(message: str) -> None:
    """A warning the user can act on: one line on stderr, on rank 0 only."""
    if not rank_zero_only.rank:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def summary(cfg, tasks, model, run_dir) -> str:
    """The run in one line: experiment, tasks, network, weighting, where its outputs go."""
    names = [t.name for t in tasks]
    shown = ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:5])} ... ({len(names)} tasks)"
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    m = cfg.model
    net = m.backbone + ("" if m.architecture == "hps" else f" + {m.architecture}")
    if m.adapter:  # what trains is then a small part: say which, and what stays frozen
        net += f" + LoRA r={m.lora.rank} ({m.lora.share})"
    elif m.freeze_backbone:
        net += " (frozen: a linear probe)"
    trained = f"{count(params)} parameters" + (f" trained, {count(frozen)} frozen" if frozen else "")
    members = f", {len(cfg.population.weights)} members" if cfg.population.weights else ""
    return (
        f"exp={cfg.exp}: tasks {shown}; {net} ({trained}{members}); weighting={cfg.weighting.name}; "
        f"outputs in {run_dir}"
    )


class EpochLines(Callback):
    """One line per epoch when there is no progress bar (a log file, a search's trials, the tests): the epoch, the
    step, the training loss, the monitored metric and the time it took.

    Printed when the epoch's validation ends (before a search trial reports to Tune, which may pause or restart the
    trial there), else at the epoch's end; only for an epoch that trained batches in this process: a run restored
    from a checkpoint saved at validation end replays that epoch's end with no metrics (an empty line, issue 35)."""

    def __init__(self, monitor: str):
        self.monitor, self.t0, self.batches, self.shown = monitor, time.monotonic(), 0, -1

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.t0, self.batches = time.monotonic(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self.on_train_epoch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.batches:
            return
        if self.shown == trainer.current_epoch:
            return
        self.shown = trainer.current_epoch
        m = trainer.callback_metrics
        shown = [f"{k} {float(m[k]):.4g}" for k in ("train/loss", self.monitor) if k in m]
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        line = f"epoch {trainer.current_epoch + 1}{total}, step {trainer.global_step}: {', '.join(shown)}"
        print(f"{line} ({time.monotonic() - self.t0:.1f} s)", flush=True)


class TrainingBar(TQDMProgressBar):
    """Lightning's bar for training in a terminal, without the validation bar that would flash under it."""

    def init_validation_tqdm(self):
        bar = super().init_validation_tqdm()
        bar.disable = True
        return bar


def progress_callbacks(enabled: bool, monitor: str) -> tuple[list[Callback], bool]:
    """(callbacks, enable_progress_bar): a bar in a terminal when `enabled`, else a line per epoch."""
    if enabled and sys.stderr.isatty():
        return [TrainingBar()], True
    return [EpochLines(monitor)], False
