"""From a composed config to a trained model, top to bottom: check the settings, find the run folder, build the
data, the method and the model (`build`), make the folder and record the config, fit, evaluate, write the metrics.

Each concern has its own home: `checks.py` (settings), `runs.py` (run folders, resume), `config.py` (the config and
its records), `loggers.py`, `checkpoint.py`, `console.py`, `forkmerge.py` (ForkMerge's pruning and branches),
`population/` (populations and their PBT). `experiments.evaluate` builds a finished run's model the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .checkpoint import AtomicCheckpointIO, checkpoint_callbacks, init_weights
from .checks import check_one_device, check_settings
from .config import save_run_config, write_atomic
from .console import progress_callbacks, quiet_lightning, say, summary
from .data import MixtureDataModule, create_datamodule
from .errors import MTLError
from .forkmerge import ForkMerge, forkmerge_criterion, rank_auxiliaries
from .loggers import build_loggers, end_wandb
from .model import TaskModel, default_monitor, higher_is_better
from .multitask import MultiTaskModule
from .population import PopulationModule, pbt_callback, plan_population, write_member_metrics
from .protocol import BestWeights, EpochMeans, check_last_mean, report_callbacks, with_best
from .runs import check_resumable, make_run_dir, resolve_run, trained
from .tasks.delta_m import delta_bases, delta_flag
from .weighting import Weighting, create_weighting


@dataclass
class Built:
    """What a config builds: its data, its weighting, its model, and how the model is judged."""

    dm: MixtureDataModule
    weighting: Weighting
    model: TaskModel
    bases: dict  # stage -> the base results of Δm%; {} without
    monitor: str  # what best.ckpt (and early stopping) goes by
    maximise: bool


def build(cfg: DictConfig) -> Built:
    """The data, weighting and model of `cfg`, with every check that needs them (the data is there, the method runs
    at this precision on these devices, the population can be vectorised); nothing is written."""
    dm = create_datamodule(cfg.data, cfg.seed)
    names = [t.name for t in dm.tasks]
    weighting = create_weighting(names, cfg.weighting)
    forks = getattr(weighting, "forks", False)
    if cfg.population.weights:  # N members trained as one vectorised model
        W, seeds = plan_population(cfg, names)
        if cfg.data.mixing == "sample":  # each member draws its own batch with its own domain probabilities
            dm.population_probs = W / W.sum(1, keepdim=True)
    elif cfg.data.mixing == "sample" and not forks:  # ForkMerge's branches sample with their own weights
        dm.probs = weighting.mixture_probs()
    dm.check()
    check_one_device(cfg, dm, forks)
    weighting.check(str(cfg.trainer.precision), distributed=False)  # again with the world size in setup()
    bases = delta_bases(cfg, dm.tasks)
    monitor = cfg.checkpoint.monitor if cfg.checkpoint.monitor != "auto" else default_monitor(dm.tasks, bool(bases))
    maximise = higher_is_better(monitor, dm.tasks, delta_flag(cfg, bool(bases)), "checkpoint.monitor")
    net = (dm.tasks, dm.in_chans, dm.img_size, cfg.model, cfg.optim)
    shared = {"hparams": OmegaConf.to_container(cfg, resolve=True), "delta_base": bases}
    shared["delta_convention"] = cfg.delta_m.convention
    if cfg.population.weights:
        p = cfg.population
        extra = {"chunk_size": p.chunk_size, "fused_attn": p.fused_attn, "clip_val": cfg.trainer.gradient_clip_val}
        model = PopulationModule(*net, W, seeds, cfg.data.mixing, cfg.seed, **shared, **extra)
    else:
        model = MultiTaskModule(*net, weighting, cfg.data.mixing, cfg.seed, **shared, grad_cos_every=cfg.grad_cos_every)
        if getattr(weighting, "gradient_based", False) and not model.shared_parameters():
            raise MTLError(
                f"weighting={cfg.weighting.name} combines the tasks' gradients on the shared parameters, and this "
                "model trains none (model.freeze_backbone=true, or model.lora.share=task, with no shared architecture "
                "part: each task trains its own head and adapters alone). Use a loss weighting, shared adapters "
                "(model.adapter=lora with model.lora.share=shared, both or mtlora), or a shared model.bottom."
            )
    model.monitor, model.maximise = monitor, maximise
    if cfg.trainer.compile:
        compile_network(cfg, model)
    return Built(dm, weighting, model, bases, monitor, maximise)


def compile_network(cfg: DictConfig, model: TaskModel) -> None:
    """torch.compile in place (`nn.Module.compile`: parameter names, checkpoints and ForkMerge's branch copies are
    unchanged); a population compiles its vectorised call. Per-task gradients (autograd.grad through the compiled
    graph, retained) work with it."""
    if cfg.model.backbone == "mpnn":
        raise MTLError(
            "trainer.compile=true with model.backbone=mpnn: every graph batch has its own numbers of atoms and bonds, "
            "so the network would be recompiled batch after batch. Leave trainer.compile=false for graphs."
        )
    if isinstance(model, PopulationModule):
        model._vmap = torch.compile(model._vmap)
    else:
        model.backbone.compile()


def train(
    cfg: DictConfig,
    callbacks: Sequence[Callback] = (),
    save_checkpoints: bool = True,
    announce: Callable[[DictConfig], None] | None = None,
    check_only: bool = False,
) -> dict:
    """Fit, then evaluate the final model on val (and test). Returns the metrics and `run_dir`.

    Every check (settings, data, weighting, model, the checkpoint to resume) runs before the run directory is made;
    `announce(cfg)` is then called (the command line can print the config). A new run that fails before its first
    step leaves no folder behind. `save_checkpoints=False` writes no best/last.ckpt: a search trial's checkpoints
    are the ones it reports to Tune. `check_only` (the command line's `--check`) stops once every check has passed,
    before anything is written or trained.
    """
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    check_settings(cfg)
    worker = bool(rank_zero_only.rank and os.environ.get("MTL_RUN_DIR"))  # a DDP rank Lightning launched
    if worker:  # rank 0's run folder and checkpoint
        run_dir, ckpt = Path(os.environ["MTL_RUN_DIR"]), os.environ.get("MTL_RESUME") or None
    else:
        run_dir, ckpt = resolve_run(cfg)
    cfg.run_name = run_dir.name  # the directory actually used, in config.yaml and the logged hyperparameters
    b = build(cfg)
    if cfg.model.freeze_backbone and not cfg.model.adapter:  # a linear probe's backbone is in eval mode on purpose
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # an epoch with no step: checked for training only (evaluating a run on another root needs no training split)
    b.dm.check_epoch(cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1)
    if ckpt and not worker:
        check_resumable(Path(ckpt), b.model, cfg, instead="start a new run without resume")
    elif cfg.model.init:  # a new run started from another's weights (a resumed one has its own)
        init_weights(b.model, cfg.model.init)
    if announce is not None:
        announce(cfg)
    if check_only:
        return {"run_dir": str(run_dir), "summary": summary(cfg, b.dm.tasks, b.model, run_dir)}
    say(summary(cfg, b.dm.tasks, b.model, run_dir))
    fresh, trainer = not run_dir.exists(), None
    made = [p for p in (run_dir.parent.parent, run_dir.parent) if not p.exists()]  # out_dir, its <exp>/
    try:
        if not worker:
            make_run_dir(run_dir)
            save_run_config(cfg, run_dir, resumed=ckpt is not None)
            # Lightning starts DDP ranks by running this command again: they inherit these and share the run
            os.environ["MTL_RUN_DIR"], os.environ["MTL_RESUME"] = str(run_dir), str(ckpt or "")
        method = method_callbacks(cfg, b, run_dir)
        trainer = make_trainer(cfg, b, run_dir, [*method, *callbacks], save_checkpoints)
        trainer.fit(b.model, datamodule=b.dm, ckpt_path=ckpt)
    except BaseException:
        if fresh and not worker and not trained(run_dir, trainer):
            end_wandb(cfg)
            shutil.rmtree(run_dir, ignore_errors=True)
            for folder in reversed(made):  # and the folders made for it, when nothing else is in them
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
    out = final_metrics(cfg, trainer, b, method)
    if trainer.is_global_zero:  # the base results a later Δm% reads (delta_m.runs=[this run_dir])
        write_metrics(run_dir, out, b.model)
    out["run_dir"] = str(run_dir)
    end_wandb(cfg)
    return out


def method_callbacks(cfg: DictConfig, b: Built, run_dir: Path) -> list[Callback]:
    """What the training method adds to the loop: ForkMerge's branches (after its pruning phase, which trains runs of
    its own in `run_dir/pruning`), a population's PBT, and what the protocol's report keeps (`evaluation.report`)."""
    out = report_callbacks(cfg, b.monitor, b.maximise)
    check_last_mean(cfg, b.dm)
    w = b.weighting
    if getattr(w, "needs_ranking", False):  # ForkMerge's top-k branches: rank the auxiliaries first
        w.use_ranking(rank_auxiliaries(cfg, w, b.dm.tasks, run_dir, b.bases, fit=train))
    if getattr(w, "forks", False):  # the callback holds the branches, the module steps them (and clips itself)
        if cfg.data.mixing == "sample":
            b.dm.branch_probs = w.branch_probs()
        fork = ForkMerge(w)
        fork.criterion = forkmerge_criterion(cfg.weighting.criterion, bool(b.bases))
        b.model.fork, b.model.clip_val, b.model.automatic_optimization = fork, cfg.trainer.gradient_clip_val, False
        out.append(fork)
    if cfg.population.weights and cfg.population.pbt:
        out.append(pbt_callback(cfg, b.dm.tasks, bool(b.bases), b.monitor))
    return out


def make_trainer(
    cfg: DictConfig, b: Built, run_dir: Path, callbacks: Sequence[Callback], save_checkpoints: bool
) -> L.Trainer:
    t = cfg.trainer
    checkpoints = (
        checkpoint_callbacks(run_dir / "checkpoints", b.monitor, b.maximise, cfg.checkpoint.every_n_steps)
        if save_checkpoints
        else []
    )
    stop = []
    if t.early_stopping_patience:  # as MTReclib: patience on the monitored metric (val, not test)
        mode = "max" if b.maximise else "min"
        stop = [EarlyStopping(b.monitor, patience=t.early_stopping_patience, mode=mode, check_on_train_epoch_end=False)]
    shown, bar = progress_callbacks(t.enable_progress_bar, b.monitor)
    manual = not b.model.automatic_optimization  # a population and ForkMerge clip their own gradients
    fp16 = fp16_cpu(t)  # the CPU's fp16 plugin, which then stands for trainer.precision
    return L.Trainer(
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=1 if cfg.population.weights and t.devices == "auto" else t.devices,
        strategy=t.strategy,
        precision=None if fp16 else t.precision,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        limit_test_batches=t.limit_test_batches,
        gradient_clip_val=None if manual else t.gradient_clip_val,
        num_sanity_val_steps=t.num_sanity_val_steps,
        deterministic=t.deterministic,
        enable_progress_bar=bar,
        enable_model_summary=t.enable_model_summary,
        logger=build_loggers(cfg, run_dir) or False,
        callbacks=[*shown, *checkpoints, *callbacks, *stop],  # the epoch's line before a search trial reports
        enable_checkpointing=save_checkpoints,
        plugins=[AtomicCheckpointIO(), *fp16],
        default_root_dir=run_dir,
        use_distributed_sampler=False,  # MixtureSampler shards by rank itself
    )


def fp16_cpu(t) -> list:
    """fp16 on the CPU with a GradScaler, as on a GPU (Lightning gives the CPU none), so fp16's code paths (scaled
    per-task gradients, skipped overflowing steps) run and are tested on any machine."""
    cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
    if not cpu or str(t.precision) not in ("16-mixed", "16"):
        return []
    from lightning.pytorch.plugins.precision import MixedPrecision

    return [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]


def evaluate(trainer: L.Trainer, b: Built, stages: Sequence[str]) -> dict[str, float]:
    """The model's metrics on each stage's split (val, test), as logged: `val/acc/left`, `test/delta_m` ..."""
    metrics = {}
    for stage in stages:
        run = trainer.validate if stage == "val" else trainer.test
        for results in run(b.model, datamodule=b.dm, verbose=False):  # none with trainer.limit_val_batches=0
            metrics.update(results)
    out = {k: float(v) for k, v in metrics.items()}
    out.update(getattr(b.model, "grad_cos_means", dict)())
    return out


def final_metrics(cfg: DictConfig, trainer: L.Trainer, b: Built, method: Sequence[Callback]) -> dict[str, float]:
    """What the run reports (`evaluation.report`): the final model's val (and test) metrics; or the best epoch's
    weights evaluated; or, for the test split, the mean of its last epochs' evaluations."""
    best = next((c for c in method if isinstance(c, BestWeights)), None)
    if best is not None:
        with_best(b.model, best)
    out = evaluate(trainer, b, ("val", "test") if cfg.test else ("val",))
    means = next((c for c in method if isinstance(c, EpochMeans)), None)
    if means is not None and cfg.test:
        out.update(means.mean(cfg.evaluation.last_epochs))
    return out


def write_metrics(run_dir: Path, metrics: dict, model: TaskModel) -> None:
    write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=1, sort_keys=True))
    if isinstance(model, PopulationModule):
        write_member_metrics(run_dir, metrics, model.member_weights.tolist(), model.member_seeds)
