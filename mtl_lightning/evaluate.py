"""Evaluate any checkpoint: a finished run's (`last`, the final model whose numbers metrics.json holds, or `best`),
a checkpoint file, or one member of a population; on the run's own val/test split, or on another root or split
given as overrides. Also each task's predictions for a split, in a file numpy or pandas reads."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from .config import config_from_dict, with_overrides, write_atomic
from .console import quiet_lightning
from .errors import MTLError
from .population import PopulationModule, export_member
from .runs import check_resumable
from .train import Built, build, evaluate

STAGES = ("val", "test")


def find_checkpoint(path: str | Path, which: str = "last") -> Path:
    """A checkpoint file, or a run directory's `checkpoints/<which>.ckpt`."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        found = sorted(p.stem for p in (path / "checkpoints").glob("*.ckpt"))
        ckpt = path / "checkpoints" / f"{which}.ckpt"
        if not ckpt.is_file():
            raise MTLError(
                f"{path} holds no checkpoints/{which}.ckpt. Its checkpoints: {', '.join(found) or 'none'} (ckpt=NAME "
                "picks one); give a run directory or a .ckpt file."
            )
        return ckpt
    if not path.is_file():
        raise MTLError(f"{path} is neither a run directory nor a checkpoint file.")
    return path


def load_for_evaluation(ckpt: Path, overrides: list[str], member: int | None = None) -> tuple[DictConfig, Built, Path]:
    """The model a checkpoint holds, built by its own config (plugins included) with `overrides` on top (another
    data.root, an eval batch size ...), its weights loaded: its config, the built model, the checkpoint read."""
    saved = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    hp = saved.get("hyper_parameters") if isinstance(saved, dict) else None
    if not hp or "data" not in hp:
        raise MTLError(f"{ckpt} is not a checkpoint of an mtl_lightning run (it holds no config).")
    if member is not None:  # one member of a population, as an ordinary single model
        if "population" not in saved:
            raise MTLError(f"member={member}: {ckpt} holds one model, not a population.")
        ckpt = export_member(ckpt, member, Path(tempfile.mkdtemp()) / f"member-{member}.ckpt")
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        hp = saved["hyper_parameters"]
    cfg = config_from_dict(hp, f"the checkpoint {ckpt}")
    cfg = with_overrides(cfg, overrides)
    cfg.population.pbt = False  # nothing trains
    b = build(cfg)
    # the overrides describe another model (model.depth=...): named, not a state-dict traceback
    check_resumable(ckpt, b.model, cfg, key="the checkpoint ", instead="drop the overrides that change the model")
    b.model.on_load_checkpoint(saved)  # a checkpoint of adapters and heads gets its frozen trunk back
    b.model.load_state_dict(saved["state_dict"])
    return cfg, b, ckpt


def run_evaluation(cfg: DictConfig, b: Built, stages=STAGES) -> dict[str, float]:
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise MTLError(f"split={bad[0]} is not evaluated: valid choices are val, test (or both, the default).")
    quiet_lightning()
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        limit_val_batches=cfg.trainer.limit_val_batches,
        limit_test_batches=cfg.trainer.limit_test_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return evaluate(trainer, b, stages)


def write_predictions(b: Built, stage: str, path: Path) -> Path:
    """Each task's prediction (`Task.predict`: a class id, a probability, a map) and target for every sample of the
    split, in order: `.npz` (arrays `<task>` and `<task>_target`), or `.csv` when every prediction is one number."""
    if isinstance(b.model, PopulationModule):
        raise MTLError("--predict writes one model's predictions: pick a population's member with member=N.")
    if Path(path).suffix not in (".npz", ".csv"):  # numpy would write PATH.npz, not the file named
        raise MTLError(f"--predict {path}: give a file ending in .npz (every task) or .csv (one number per sample).")
    b.dm.setup("test")
    loader = b.dm.val_dataloader(in_split_order=True) if stage == "val" else b.dm.test_dataloader(True)
    tasks = [(k, t) for k, t in enumerate(b.model.tasks) if not t.view]  # a view task predicts its own views
    preds, targets = {t.name: [] for _, t in tasks}, {t.name: [] for _, t in tasks}
    b.model.eval()
    with torch.no_grad():
        for x, y in loader:
            out, ys = b.model(x), b.model.targets(y)
            for k, t in tasks:
                pred = t.predict(out[k])
                pred = pred[:, 0] if pred.ndim == 2 and pred.shape[1] == 1 else pred
                preds[t.name].append((pred.float() if pred.is_floating_point() else pred).cpu())  # class ids: ints
                targets[t.name].append(ys[k].cpu())
    arrays = {}
    for _, t in tasks:
        arrays[t.name] = torch.cat(preds[t.name]).numpy()
        arrays[f"{t.name}_target"] = torch.cat(targets[t.name]).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        if any(a.ndim != 1 for a in arrays.values()):
            raise MTLError(f"--predict {path}: some tasks predict maps, not one number per sample; write a .npz.")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(arrays)
            w.writerows(zip(*(a.tolist() for a in arrays.values())))
    else:
        np.savez(path, **arrays)
    return path


def save_metrics(metrics: dict, path: Path) -> Path:
    write_atomic(path, json.dumps(metrics, indent=1, sort_keys=True))
    return path


def default_output(ckpt: Path, stages, member: int | None) -> Path:
    """`<run>/eval/<checkpoint>[-m<i>]-<splits>.json` beside the checkpoints (or beside a loose checkpoint file)."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    tag = ckpt.stem + (f"-m{member}" if member is not None else "") + "-" + "-".join(stages)
    return run / "eval" / f"{tag}.json"


__all__ = [
    "default_output",
    "find_checkpoint",
    "load_for_evaluation",
    "run_evaluation",
    "save_metrics",
    "write_predictions",
]
