"""The loggers a run writes to (`logger=csv,tensorboard,wandb`), each in its own folder of the run directory; W&B
online with an API key, offline without."""

from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import MTLError

LOGGERS = ("csv", "tensorboard", "wandb", "none")


def wandb_mode(cfg: DictConfig) -> str:
    if cfg.wandb.mode != "auto":
        return cfg.wandb.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return "online" if netrc.is_file() and "api.wandb.ai" in netrc.read_text() else "offline"


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    names = [n.strip() for n in cfg.logger.split(",") if n.strip()]
    bad = [n for n in names if n not in LOGGERS]
    if bad:
        raise MTLError(f"Unknown logger={cfg.logger!r}. Valid choices (comma-separated): {', '.join(LOGGERS)}.")
    if cfg.wandb.mode not in ("auto", "online", "offline"):
        raise MTLError(f"Unknown wandb.mode={cfg.wandb.mode!r}. Valid choices: auto, online, offline.")
    loggers = []
    for n in names:
        if n == "csv":
            loggers.append(CSVLogger(run_dir, name="csv"))  # a resumed run adds version_1: nothing is overwritten
        elif n == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir, name="tb", version="", default_hp_metric=False))
        elif n == "wandb":
            mode = wandb_mode(cfg)
            loggers.append(
                WandbLogger(
                    project=cfg.wandb.project,
                    entity=cfg.wandb.entity,
                    group=cfg.wandb.group or cfg.exp,
                    name=run_dir.name,
                    id=re.sub(r"[^A-Za-z0-9_-]", "-", f"{cfg.exp}-{run_dir.name}"),  # resuming continues the run
                    save_dir=str(run_dir),
                    offline=mode == "offline",
                    mode=mode,
                    tags=list(cfg.wandb.tags),
                    resume="allow",
                )
            )
    params = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(params)
    return loggers


def end_wandb(cfg: DictConfig) -> None:
    """End the W&B run: a next train() in this process (a notebook, a search's retraining) then starts its own."""
    if "wandb" in str(cfg.logger):
        import wandb

        if wandb.run is not None:
            wandb.finish()
