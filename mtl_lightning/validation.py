"""Validation batches during training, for the methods that decide on held-out data as they train: ForkMerge scores
its merges on them, the bilevel weightings (Auto-Lambda) take their meta-step on them. One place says which loader
that is, and refuses the test split to a method that would learn from it."""

from __future__ import annotations

from .errors import MTLError


def validation_loader(trainer, learns_from_it: str | None = None, batch_size: int | None = None):
    """The datamodule's validation loader (`data.train_fraction`'s hold-out, or the dataset's official split), in
    batches of `batch_size` (default `data.eval_batch_size`). `learns_from_it`: the method that updates weights from
    these batches; it is refused the test split (what the validation split is when the dataset has none and
    data.train_fraction=1), which would train on the test set."""
    dm = trainer.datamodule
    if learns_from_it and dm.splits["val"] is dm.splits["test"]:
        raise MTLError(
            f"{learns_from_it} updates its weights on validation batches as it trains, and data={dm.cfg.name} "
            "validates on its test split (no official validation split, data.train_fraction=1): it would learn from "
            "the test set. Set data.train_fraction below 1 (e.g. 0.9) to hold out part of the training split."
        )
    return dm.val_dataloader(batch_size)


class CycledBatches:
    """Validation batches of the training batch size one at a time, starting over at the end. `drawn` (how many so
    far, kept by the caller in its checkpointed state) places a resumed run at the same batch."""

    def __init__(self, trainer, learns_from_it: str):
        self.trainer, self.who, self.it, self.n = trainer, learns_from_it, None, 0

    def _loader(self):
        return validation_loader(self.trainer, self.who, self.trainer.datamodule.cfg.batch_size)

    def next(self, drawn: int):
        if self.it is None:  # first use, or after a resume: skip to where the run was
            loader = self._loader()
            self.n = len(loader)
            self.it = iter(loader)
            for _ in range(drawn % self.n):
                next(self.it)
        elif drawn % self.n == 0:
            self.it = iter(self._loader())
        return next(self.it)
