"""Settings checked before anything is built or written: the trainer's, optimiser's and scheduler's numbers, the
files a model starts from, the population's PBT budget, and runs that must stay on one device."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import init_checkpoint
from .console import warn
from .errors import MTLError
from .model import OPTIMIZERS, SCHEDULERS
from .network import weights_file


def check_settings(cfg: DictConfig) -> None:
    """The trainer's, optimiser's and scheduler's numbers, before anything is built or written."""
    for key in ("max_epochs", "max_steps"):
        value = cfg.trainer[key]
        if value < -1 or (key == "max_epochs" and value == 0):
            raise MTLError(f"trainer.{key}={value} must be a positive number, or -1 for no limit.")
    if cfg.trainer.limit_train_batches == 0:  # (None: Lightning's default, every batch)
        raise MTLError(
            f"trainer.limit_train_batches={cfg.trainer.limit_train_batches} gives every epoch 0 training steps: the "
            "run would train nothing. Use a positive number of batches (or a fraction), or evaluate a trained run "
            "with `python -m experiments.evaluate RUN`."
        )
    if cfg.grad_cos_every < 0 or cfg.trainer.early_stopping_patience < 0:
        raise MTLError(
            f"grad_cos_every={cfg.grad_cos_every} and trainer.early_stopping_patience="
            f"{cfg.trainer.early_stopping_patience} must be >= 0 (0: off)."
        )
    m = cfg.model  # the files a model starts from: named now (a study's --check too), not at a cell's start
    if m.get("checkpoint"):
        weights_file(m)
    if m.get("init") and not cfg.get("resume"):  # a resumed run has its own weights: its start may be gone
        init_checkpoint(m.init)
    o = cfg.optim
    choices = {"name": OPTIMIZERS, "scheduler": SCHEDULERS}
    for key, valid in choices.items():
        if o[key] not in valid:
            raise MTLError(f"Unknown optim.{key}={o[key]!r}. Valid choices: {', '.join(valid)}.")
    bounds = {
        "lr": (o.lr > 0, "must be > 0"),
        "weight_decay": (o.weight_decay >= 0, "must be >= 0"),
        "momentum": (0 <= o.momentum < 1, "must lie in [0, 1)"),
        "warmup": (0 <= o.warmup < 1, "must lie in [0, 1) (a fraction of the total steps)"),
        "step_epochs": (o.step_epochs >= 1, "must be >= 1"),
        "gamma": (o.gamma > 0, "must be > 0"),
        "patience": (o.patience >= 0, "must be >= 0"),
        "min_lr": (o.min_lr >= 0, "must be >= 0"),
        "weighting_lr": (o.weighting_lr is None or o.weighting_lr > 0, "must be > 0 (or null: optim.lr)"),
        "milestones": (
            o.scheduler != "milestones" or (len(o.milestones) > 0 and all(0 < f < 1 for f in o.milestones)),
            "must be fractions of the total steps within (0, 1), at least one, with optim.scheduler=milestones",
        ),
    }
    for key, (ok, why) in bounds.items():
        if not ok:
            raise MTLError(f"optim.{key}={o[key]} {why}.")
    p = cfg.population
    if p.pbt and not p.weights:
        raise MTLError(
            "population.pbt=true runs PBT over a population's members, and population.weights gives none: set "
            "population.weights=[[...],[...],...] (one starting vector per member), or search=pbt "
            "search.backend=population, which draws them."
        )
    if p.pbt:
        warn_no_perturbation(cfg.trainer.max_epochs, p.perturbation_interval, "population.perturbation_interval")


def warn_no_perturbation(epochs: int, interval: int, key: str) -> None:
    """PBT exploits and explores every `interval` epochs, never after the last: say so when none can happen."""
    if 0 < epochs <= interval:
        warn(
            f"PBT perturbs every {key}={interval} epoch(s), never after the last, and trainer.max_epochs={epochs} "
            "leaves no perturbation: every member keeps its starting weights (a random search of them). Give "
            f"trainer.max_epochs > {key}."
        )


def requested_devices(t) -> int:
    """How many processes `trainer.devices` (with `trainer.accelerator`) starts, as Lightning counts them: "auto" and
    -1 are every GPU when one is used, else 1 (the CPU)."""
    if OmegaConf.is_list(t.devices) or isinstance(t.devices, list | tuple):
        return len(t.devices)
    if str(t.devices) not in ("auto", "-1"):
        return int(t.devices)
    gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
    return torch.cuda.device_count() if gpu else 1


def check_one_device(cfg: DictConfig, dm, forks: bool) -> None:
    """Refuse, before anything starts, several devices for a run whose batches are drawn on one (Lightning would
    start every rank first, and each would refuse)."""
    reason = None
    if cfg.data.labels_per_class is not None:
        reason = "semi-supervised batches (data.labels_per_class) are drawn on one device"
    elif forks and cfg.data.mixing == "sample":
        reason = "ForkMerge with data.mixing=sample draws one batch per branch on one device"
    elif cfg.data.mixing == "multi_input":
        reason = "multi-input batches (data.mixing=multi_input) are drawn on one device"
    n = requested_devices(cfg.trainer)
    if reason and n > 1:
        raise MTLError(
            f"This run's {reason}, and trainer.devices={cfg.trainer.devices} asks for {n}. Train it on one device "
            "(trainer.devices=1), or use the devices for several runs at once: a search or study places its trials "
            "side by side (search.gpus_per_trial, study.gpus_per_trial)."
        )
