"""What a run reports when it ends (`evaluation.report`), as each benchmark's protocol does:

- `final` (default): the final model's val and test metrics;
- `last_mean`: the test metrics as the mean of the last `evaluation.last_epochs` epochs' evaluations of the test
  split, as Nash-MTL's README reports NYUv2 and Cityscapes (it evaluates on the test set every epoch, and has no
  validation split: the run must validate on the test split, `data.train_fraction=1`);
- `best`: the val and test metrics of the weights of the epoch best by `checkpoint.monitor`, as Nash-MTL, FAMO and
  LibMTL report QM9 and Office (test at the best validation epoch); kept in memory, so search trials, which write no
  checkpoint files, report it too.
"""

from __future__ import annotations

import copy

from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from .errors import MTLError

REPORTS = ("final", "last_mean", "best")


class EpochMeans(Callback):
    """Every epoch's validation metrics; `mean(n)`: the mean of the last n epochs', renamed to the test split."""

    def __init__(self):
        self.epochs: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:  # after the module logged its epoch
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            m = trainer.callback_metrics
            self.epochs.append({k: float(v) for k, v in m.items() if k.startswith("val/")})

    def mean(self, n: int) -> dict[str, float]:
        last = self.epochs[-n:]
        keys = set.intersection(*(set(e) for e in last)) if last else set()
        return {"test/" + k[4:]: sum(e[k] for e in last) / len(last) for k in sorted(keys)}

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.epochs = state["epochs"]


class BestWeights(Callback):
    """A CPU copy of the module's weights at its best validation epoch by `monitor`."""

    def __init__(self, monitor: str, maximise: bool):
        self.monitor, self.sign, self.best, self.state = monitor, 1.0 if maximise else -1.0, None, None

    def on_validation_end(self, trainer, pl_module) -> None:  # after the module logged its epoch
        if trainer.state.fn != "fit" or trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = self.sign * float(trainer.callback_metrics[self.monitor])
        if self.best is None or value > self.best:
            self.best = value
            # tensors, and a method's extra state (BayesAgg-MTL's features and posteriors: a dict of tensors)
            self.state = apply_to_collection(pl_module.state_dict(), Tensor, lambda t: t.detach().to("cpu", copy=True))

    def state_dict(self) -> dict:
        return {"best": self.best, "state": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.state = state["best"], state["state"]


def report_callbacks(cfg, monitor: str, maximise: bool) -> list[Callback]:
    r = cfg.evaluation
    if r.report not in REPORTS:
        raise MTLError(f"Unknown evaluation.report={r.report!r}. Valid choices: {', '.join(REPORTS)}.")
    if r.last_epochs < 1:
        raise MTLError(f"evaluation.last_epochs={r.last_epochs} must be >= 1.")
    if r.report == "last_mean":
        return [EpochMeans()]
    return [BestWeights(monitor, maximise)] if r.report == "best" else []


def check_last_mean(cfg, dm) -> None:
    """last_mean averages evaluations of the test split: the run must validate on it (as the references do)."""
    if cfg.evaluation.report == "last_mean":
        dm.setup("fit")
        if dm.splits["val"] is not dm.splits["test"]:
            raise MTLError(
                "evaluation.report=last_mean reports the mean of the last epochs' evaluations of the test split, as "
                f"Nash-MTL does, but data={cfg.data.name} validates here on a held-out part of train: set "
                "data.train_fraction=1 (validation on the test split, as the reference), or evaluation.report=final."
            )


def with_best(module, callback: BestWeights) -> None:
    """Load the best epoch's weights into the module (for the final evaluation)."""
    if callback.state is not None:
        module.load_state_dict(copy.copy(callback.state))
