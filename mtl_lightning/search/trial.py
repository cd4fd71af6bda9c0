"""Inside a trial: one `train()` reporting to Tune after every epoch, resumed from Tune's checkpoint if any. The
search's trials and a study's cells all run this function."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from ..config import compose
from ..train import train
from .space import overrides_of


class ApplyLearningRate(Callback):
    """After a checkpoint restore, impose this trial's learning rate (restored with the donor's optimiser state)."""

    def __init__(self, lr: float):
        self.lr = lr

    def on_train_start(self, trainer, pl_module) -> None:
        for opt in trainer.optimizers:
            for g in opt.param_groups:
                g["lr"] = self.lr
        for cfg in trainer.lr_scheduler_configs:
            cfg.scheduler.base_lrs = [self.lr] * len(cfg.scheduler.base_lrs)


class WeightSchedule(Callback):
    """The normalised weights used in every epoch, saved in the checkpoint so they follow a trial's lineage."""

    def __init__(self):
        self.schedule: list[list[float]] = []  # [epoch, w_1, ..., w_K]

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.schedule = [r for r in self.schedule if r[0] < trainer.current_epoch]
        self.schedule.append([trainer.current_epoch, *_weights(pl_module)])

    def state_dict(self) -> dict:
        return {"schedule": self.schedule}

    def load_state_dict(self, state: dict) -> None:
        self.schedule = state["schedule"]


def _report_callback(metric: str, sign: float):
    """Reports every val metric, and `score` = sign x `metric` (Tune maximises it), after each training epoch."""
    from ray.tune import Checkpoint
    from ray.tune.integration.pytorch_lightning import TuneReportCheckpointCallback

    class Report(TuneReportCheckpointCallback):
        def _handle(self, trainer, pl_module):
            if trainer.state.fn == "fit":  # one Tune iteration per training epoch, none for trainer.validate()
                super()._handle(trainer, pl_module)

        @contextmanager
        def _get_checkpoint(self, trainer):  # as Ray's, saying weights_only=False (Lightning logs it otherwise)
            with tempfile.TemporaryDirectory() as d:
                trainer.save_checkpoint(os.path.join(d, self._filename), weights_only=False)
                yield Checkpoint.from_directory(d)

        def _get_report_dict(self, trainer, pl_module):
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            return {
                **m,
                "score": sign * m.get(metric, float("nan")),  # a study's cell may not log it (a baseline)
                "step": trainer.global_step,
                "weights": _weights(trainer.lightning_module),
            }

    return Report(filename="trial.ckpt", on="validation_end")


def trial_dirname(trial) -> str:
    """A trial's folder: `trial_<id>` and what varies between the search's trials (Tune's default name held the
    whole fixed config: the experiment, the metric, every override): a study's cell, a grid point, the weights, the
    learning rate, the search.space values. Short and file-system safe."""
    c = trial.config
    if "cell" in c:
        varies = [str(c["cell"].get("id", ""))]
    elif "variant" in c:  # a grid point: p or a single task, at a capacity
        (kind, value), (depth, width) = c["variant"], c.get("capacity", (None, None))
        varies = [f"p={value}" if kind == "mix" else f"single={value}"] + ([f"{depth}x{width}"] if depth else [])
    else:
        varies = [f"w{k}={c[f'w{k}']:.3g}" for k in range(c.get("num_tasks", 0)) if f"w{k}" in c]
        varies += [f"lr={c['lr']:.3g}"] if isinstance(c.get("lr"), float) else []
        varies += [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (c.get("params") or {}).items()]
    name = "_".join([f"trial_{trial.trial_id}", *varies])
    return re.sub(r"[^\w.=+-]", "", name)[:120]


def _config_weights(config: dict) -> list[float] | None:
    """A PBT/PB2 trial's raw weights w0..w{K-1}; None for a grid trial (its weights come as overrides)."""
    return [config[f"w{k}"] for k in range(config["num_tasks"])] if "w0" in config else None


def _weights(pl_module) -> list[float]:
    w = getattr(pl_module.weighting, "w", None)
    return [] if w is None else w.tolist()


@contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr to `path` (appended) at the file-descriptor level, so Lightning's and
    Ray's loggers, warnings and C-level prints all go there, not to the driver's console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "a") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def trial(config: dict) -> None:
    """A Tune function trainable: one `train()` from the trial's config, resumed from Tune's checkpoint if any. With
    `quiet` (a study's cells) its output goes to `console.log` in its run directory."""
    from .ray_session import quiet_worker

    quiet_worker()
    if not config.get("quiet"):
        return _trial(config)
    with _output_to(_run_dir(config) / "console.log"):
        return _trial(config)


def _run_dir(config: dict) -> Path:
    """One run directory (and W&B run) per trial, kept across the restarts PBT makes on exploit, named by the cell or
    trial: <runs_dir>/<exp>/<name> in the search's or study's own folder. Not get_trial_dir(): that is a folder in
    Ray's session tree, which Tune copies to storage only for a trial's first worker (reused ones write elsewhere)."""
    from ray import tune

    name = config.get("cell", {}).get("id") or tune.get_context().get_trial_id()
    return Path(config["runs_dir"]) / config["exp"] / name


def _trial(config: dict) -> None:
    from ray import tune

    weights = _config_weights(config)
    run_dir = _run_dir(config)
    out_dir, name = run_dir.parent.parent, run_dir.name
    final = config.get("final_report", False)  # a study's cell: evaluate the final model on test and report it
    over = list(config["overrides"]) + [f"out_dir={out_dir}", f"test={str(final).lower()}"]
    over += [f"wandb.group={config['search']}", *config.get("extra", [])]
    if weights is not None:
        over += ["weighting=fixed", f"weighting.weights=[{','.join(map(str, weights))}]", "weighting.normalize=true"]
    over += overrides_of(config.get("params", {}))  # search.space: this trial's values of any key
    lr = config.get("lr", config.get("params", {}).get("optim.lr"))
    if config.get("lr") is not None:
        over.append(f"optim.lr={lr}")
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        over.append(f"run_name={name}")
    else:  # copy it out (its directory only lives inside as_directory) into the run dir, then resume from it
        local = run_dir / "checkpoints" / "restore.ckpt"
        local.parent.mkdir(parents=True, exist_ok=True)
        with ckpt.as_directory() as d:
            shutil.copy(Path(d) / "trial.ckpt", local)
        over.append(f"resume={local}")
    cfg = compose(config["exp"], over)
    if cfg.merging.name:  # a merging row: its warm-up and task models are runs of their own; one report, at the end
        from ..merging.run import merge_run

        return _final_report(config, cfg, merge_run(cfg, fit=lambda c: train(c, save_checkpoints=True)))
    callbacks = [WeightSchedule(), _report_callback(config["metric"], config["sign"])]
    if lr is not None:
        callbacks.insert(0, ApplyLearningRate(lr))
    # Tune's per-epoch checkpoint is the trial's restore point: best/last.ckpt beside it would double the disk used,
    # and Ray's sync of the trial folder can catch an atomic write's temporary file as it is renamed
    metrics = train(cfg, callbacks, save_checkpoints=False)
    if final:  # one more report: the final model's val and test metrics, and its gradient conflict if logged
        _final_report(config, cfg, metrics)


def _final_report(config: dict, cfg, metrics: dict) -> None:
    from ray import tune

    keep = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/", "grad_cos/", "merging/"))}
    score = config["sign"] * keep.get(config["metric"], float("nan"))
    tune.report({**keep, "score": score, "step": cfg.trainer.max_steps})
