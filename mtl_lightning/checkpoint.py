"""Checkpoints that are never half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .adapters import base_name
from .errors import MTLError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file beside the target, fsync, then rename it over the target.

    A crash or a full disk at any moment leaves either the previous checkpoint or the new one, never a truncated
    file. (Lightning's own save stages the file in the system temp dir and moves it, which is a plain copy when
    that dir is on another file system.)
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class LastCheckpoint(Checkpoint):
    """Keep `last.ckpt` current: every `every_n_steps` training steps (if set), at every epoch end (after that
    epoch's validation), and when fitting ends (after every other callback's on_train_end).

    Lightning's `ModelCheckpoint(save_last=True)` refreshes `last.ckpt` only when a top-k checkpoint was saved in
    the same step, so it goes stale whenever the monitored metric does not improve. Subclassing `Checkpoint` makes
    Lightning run this after every other callback, so the saved state includes theirs (the best score included).
    """

    def __init__(self, dirpath: Path, every_n_steps: int | None = None):
        self.path, self.every_n_steps = Path(dirpath) / "last.ckpt", every_n_steps

    def _save(self, trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state, said so (Lightning logs otherwise)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # not at an epoch's last batch or the step budget's end: the epoch-end (or train-end) save of the same step
        # follows at once, after validation, and would write the whole state again (a 300 MB DeepLab run: ~1 s each)
        ends = trainer.is_last_batch or 0 < trainer.max_steps <= trainer.global_step
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not ends:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        # Always: a callback's on_train_end may change the model after the last step's save (ForkMerge merges the
        # round the budget cut short), and last.ckpt is the final model whose numbers metrics.json holds
        self._save(trainer)


def checkpoint_callbacks(ckpt_dir: Path, monitor: str, maximise: bool, every_n_steps: int | None) -> list:
    """`best.ckpt` by the monitored metric, in its direction, and `last.ckpt` (each written atomically by
    `AtomicCheckpointIO`)."""
    best = ModelCheckpoint(
        ckpt_dir,
        filename="best",
        monitor=monitor,
        mode="max" if maximise else "min",
        save_top_k=1,
        enable_version_counter=False,
    )
    return [best, LastCheckpoint(ckpt_dir, every_n_steps)]


def load_model(path: str | Path):
    """A trained single model from its checkpoint (a run's best/last.ckpt, or a population member's export): the
    `MultiTaskModule` its saved config builds, with its weights, in eval mode. Needs no data files: the tasks come
    from the config."""
    from .config import config_from_dict
    from .data import create_datamodule
    from .multitask import MultiTaskModule
    from .weighting import create_weighting

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = config_from_dict(ckpt["hyper_parameters"], f"the checkpoint {path}")
    dm = create_datamodule(cfg.data, cfg.seed)
    if dm.in_chans is None:  # tabular fields whose cardinalities come from the data files
        dm.check()
    weighting = create_weighting([t.name for t in dm.tasks], cfg.weighting)
    model = MultiTaskModule(dm.tasks, dm.in_chans, dm.img_size, cfg.model, cfg.optim, weighting, cfg.data.mixing)
    model.on_load_checkpoint(ckpt)  # a checkpoint of adapters and heads gets its frozen trunk back
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def init_checkpoint(path: str | Path) -> Path:
    """The checkpoint `model.init` names: a run folder's last.ckpt, or a .ckpt file."""
    p = Path(path).expanduser()
    ckpt = p / "checkpoints" / "last.ckpt" if p.is_dir() else p
    if not ckpt.is_file():
        raise MTLError(
            f"model.init={path}: no checkpoint there ({ckpt} does not exist). Give a run folder (its "
            "checkpoints/last.ckpt starts the model) or a .ckpt file."
        )
    return ckpt


def init_weights(model, path: str | Path) -> dict:
    """Start `model` from the checkpoint `model.init` names: its shared parameters by name, and each of this model's
    heads from the checkpoint's head of the same task (by name: a single-task model takes its task's head from a
    multi-task run). Anything else the model has keeps its initialisation; returns the loaded entries."""
    ckpt = torch.load(init_checkpoint(path), map_location="cpu", weights_only=False)
    src, theirs = ckpt["state_dict"], list(ckpt.get("tasks", []))
    mine = model.state_dict()
    # a backbone with adapters holds each adapted layer's weights as <layer>.base_layer: the plain run's names map there
    plain = {base_name(k): k for k in mine if ".base_layer." in k}
    src = {plain.get(k, k): v for k, v in src.items()}
    out = {k: v for k, v in src.items() if not k.startswith(("heads.", "weighting.")) and k in mine}
    for i, task in enumerate(t.name for t in model.tasks):
        if task in theirs:
            j = theirs.index(task)
            out.update(
                {f"heads.{i}.{k[len(f'heads.{j}.') :]}": v for k, v in src.items() if k.startswith(f"heads.{j}.")}
            )
    bad = [k for k, v in out.items() if k not in mine or mine[k].shape != v.shape]
    if bad or not out:
        said = f"entries of another shape or not in this model: {', '.join(bad[:3])}" if bad else "no entry in common"
        raise MTLError(
            f"model.init={path} cannot start this model ({said}). It must come from a run of the same backbone and "
            "model.* settings."
        )
    model.load_state_dict(out, strict=False)
    return out
