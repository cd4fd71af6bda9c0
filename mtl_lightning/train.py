"""From a composed config to a trained model: data, model, weighting, loggers, checkpoints, Trainer."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from .checkpoint import AtomicCheckpointIO, LastCheckpoint
from .config import flatten, save_config, with_weighting, write_atomic
from .console import progress_callbacks, quiet_lightning, say, summary, warn
from .data import create_datamodule
from .errors import MTLError
from .forkmerge import ForkMerge, target_score
from .model import OPTIMIZERS, SCHEDULERS, default_monitor, higher_is_better
from .multitask import MultiTaskModule
from .population import PopulationModule, PopulationPBT, plan_population, write_member_metrics
from .tasks import read_base
from .tasks.delta_m import check_base
from .weighting import create_weighting

LOGGERS = ("csv", "tensorboard", "wandb", "none")


def resolve_run(cfg: DictConfig) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None for a fresh run). Writes nothing: the directory of
    a new run is made once every check has passed (`make_run_dir`)."""
    exp_dir = Path(cfg.out_dir).expanduser().resolve() / cfg.exp
    if cfg.resume == "last":
        if cfg.run_name:  # that run, not the newest one
            ckpt = exp_dir / cfg.run_name / "checkpoints" / "last.ckpt"
            if not ckpt.is_file():
                runs = sorted(p.parent.parent.name for p in exp_dir.glob("*/checkpoints/last.ckpt"))
                raise MTLError(
                    f"resume=last run_name={cfg.run_name} found no checkpoint {ckpt}. Runs of exp={cfg.exp} that "
                    f"can be resumed: {', '.join(runs) or 'none'}."
                )
            return ckpt.parent.parent, ckpt
        found = sorted(exp_dir.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise MTLError(
                f"resume=last found no checkpoint {exp_dir}/*/checkpoints/last.ckpt. Start a new run "
                "without `resume`, or give resume=PATH/TO/FILE.ckpt."
            )
        return found[-1].parent.parent, found[-1]
    if cfg.resume:
        ckpt = Path(cfg.resume).expanduser().resolve()
        if not ckpt.is_file():
            raise MTLError(f"resume={cfg.resume} is not a checkpoint file. Give a .ckpt path or resume=last.")
        if ckpt.parent.name == "checkpoints":
            run_dir = ckpt.parent.parent
            if cfg.run_name and cfg.run_name != run_dir.name:
                raise MTLError(
                    f"resume={cfg.resume} continues the run {run_dir}, but run_name={cfg.run_name} names another: "
                    "drop run_name, or resume that run with resume=last run_name=NAME."
                )
            return run_dir, ckpt
        return _new_run_dir(exp_dir, cfg.run_name), ckpt
    return _new_run_dir(exp_dir, cfg.run_name), None


def _new_run_dir(exp_dir: Path, run_name: str | None) -> Path:
    if run_name:
        run_dir = exp_dir / run_name
        if any((run_dir / "checkpoints").glob("*.ckpt")):  # never overwrite a trained run
            raise MTLError(
                f"{run_dir} already holds checkpoints. Continue it with resume=last run_name={run_name} (or resume="
                f"{run_dir}/checkpoints/last.ckpt), or choose another run_name."
            )
        return run_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, i = exp_dir / stamp, 1
    while run_dir.exists():
        run_dir, i = exp_dir / f"{stamp}-{i}", i + 1
    return run_dir


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise MTLError(
            f"Cannot write to the output directory {run_dir} ({e.strerror}). Choose a writable one with out_dir=PATH."
        ) from None


ARCHITECTURE = ("backbone", "depth", "width", "num_heads", "patch_size", "mlp_ratio", "kwargs")


def check_resumable(ckpt: Path, model, cfg: DictConfig) -> None:
    """Refuse, naming the difference, a checkpoint whose tasks, heads, backbone or weighting state are not this
    config's model: Lightning would fail half-way with a state-dict traceback after the run folder was touched."""
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        hp, state = saved.get("hyper_parameters") or {}, saved["state_dict"]
    except Exception as e:
        raise MTLError(f"resume={ckpt} is not a readable Lightning checkpoint ({type(e).__name__}: {e}).") from None
    here = {"data.name": cfg.data.name, "tasks": [t.name for t in model.tasks], "data.img_size": cfg.data.img_size}
    here.update({f"model.{k}": OmegaConf.to_container(cfg.model, resolve=True)[k] for k in ARCHITECTURE})
    there = {"data.name": (hp.get("data") or {}).get("name"), "tasks": saved.get("tasks")}
    there["data.img_size"] = (hp.get("data") or {}).get("img_size")
    there.update({f"model.{k}": (hp.get("model") or {}).get(k) for k in ARCHITECTURE})
    diffs = [f"{k} {there[k]!r} there, {v!r} here" for k, v in here.items() if there[k] is not None and there[k] != v]
    mine = {k: tuple(getattr(v, "shape", ())) for k, v in model.state_dict().items()}  # (a method's state: a dict)
    theirs = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    if mine != theirs and not diffs:  # an older checkpoint without the names, or a weighting with other state
        odd = sorted(set(mine) ^ set(theirs)) + sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
        name = (hp.get("weighting") or {}).get("name")
        if name and name != cfg.weighting.name:
            diffs.append(f"weighting.name {name!r} there, {cfg.weighting.name!r} here")
        diffs.append(f"the parameters {', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''} differ")
    if diffs:
        raise MTLError(
            f"resume={ckpt} was trained with another model than this config builds: {'; '.join(diffs)}. Resume it "
            f"with its own settings (its config.yaml: {ckpt.parent.parent / 'config.yaml'}), or start a new run "
            "without resume. Nothing was written."
        )


def save_run_config(cfg: DictConfig, run_dir: Path, resumed: bool) -> Path:
    """`config.yaml` for a new run. A resumed run keeps its own: the resuming command's config goes beside it, as
    `config.resume-<n>.yaml`, headed by the keys it changed."""
    path = run_dir / "config.yaml"
    if not (resumed and path.exists()):
        save_config(cfg, path)
        return path
    n = 1
    while (run_dir / f"config.resume-{n}.yaml").exists():
        n += 1
    old = flatten(OmegaConf.to_container(OmegaConf.load(path)))
    new = flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    ]
    head = "".join(f"#   {c}\n" for c in changed) or "#   (none)\n"
    path = run_dir / f"config.resume-{n}.yaml"
    write_atomic(path, f"# Resumed from config.yaml; the keys this command changed:\n{head}" + OmegaConf.to_yaml(cfg))
    return path


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


def check_settings(cfg: DictConfig) -> None:
    """The trainer's, optimiser's and scheduler's numbers, before anything is built or written."""
    for key in ("max_epochs", "max_steps"):
        value = cfg.trainer[key]
        if value < -1 or (key == "max_epochs" and value == 0):
            raise MTLError(f"trainer.{key}={value} must be a positive number, or -1 for no limit.")
    if cfg.grad_cos_every < 0 or cfg.trainer.early_stopping_patience < 0:
        raise MTLError(
            f"grad_cos_every={cfg.grad_cos_every} and trainer.early_stopping_patience="
            f"{cfg.trainer.early_stopping_patience} must be >= 0 (0: off)."
        )
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
    n = requested_devices(cfg.trainer)
    if reason and n > 1:
        raise MTLError(
            f"This run's {reason}, and trainer.devices={cfg.trainer.devices} asks for {n}. Train it on one device "
            "(trainer.devices=1), or use the devices for several runs at once: a search or study places its trials "
            "side by side (search.gpus_per_trial, study.gpus_per_trial)."
        )


def train(
    cfg: DictConfig,
    callbacks: Sequence[Callback] = (),
    save_checkpoints: bool = True,
    announce: Callable[[DictConfig], None] | None = None,
) -> dict:
    """Fit, then evaluate the final model on val (and test). Returns the metrics and `run_dir`.

    Every check (settings, data, weighting, model, the checkpoint to resume) runs before the run directory is made;
    `announce(cfg)` is then called (the command line prints the config). A new run that fails before its first
    step leaves no folder behind. `save_checkpoints=False` writes no best/last.ckpt: a search trial's checkpoints
    are the ones it reports to Tune.
    """
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    check_settings(cfg)
    dm = create_datamodule(cfg.data, cfg.seed)
    weighting = create_weighting([t.name for t in dm.tasks], cfg.weighting)
    forks = getattr(weighting, "forks", False)
    population = bool(cfg.population.weights)  # N members trained as one vectorised model
    if population:
        W, seeds = plan_population(cfg, [t.name for t in dm.tasks])
        if cfg.data.mixing == "sample":  # each member draws its own batch with its own domain probabilities
            dm.population_probs = W / W.sum(1, keepdim=True)
    elif cfg.data.mixing == "sample" and not forks:  # ForkMerge's branches sample with their own weights (below)
        dm.probs = weighting.mixture_probs()
    dm.check()
    check_one_device(cfg, dm, forks)
    weighting.check(str(cfg.trainer.precision), distributed=False)  # again with the world size in setup()
    bases = delta_bases(cfg, dm.tasks)
    monitor = cfg.checkpoint.monitor
    if monitor == "auto":
        monitor = default_monitor(dm.tasks, bool(bases))
    maximise = higher_is_better(monitor, dm.tasks, bool(bases), "checkpoint.monitor")
    worker = bool(rank_zero_only.rank and os.environ.get("MTL_RUN_DIR"))  # a DDP worker Lightning launched
    if worker:  # rank 0's run
        run_dir, ckpt = Path(os.environ["MTL_RUN_DIR"]), os.environ.get("MTL_RESUME") or None
    else:
        run_dir, ckpt = resolve_run(cfg)
    cfg.run_name = run_dir.name  # the directory actually used, in config.yaml and the logged hyperparameters
    hparams = OmegaConf.to_container(cfg, resolve=True)
    net = (dm.tasks, dm.in_chans, dm.img_size, cfg.model, cfg.optim)
    shared = {"hparams": hparams, "delta_base": bases}
    if population:
        p = cfg.population
        extra = {"chunk_size": p.chunk_size, "fused_attn": p.fused_attn, "clip_val": cfg.trainer.gradient_clip_val}
        model = PopulationModule(*net, W, seeds, cfg.data.mixing, cfg.seed, **shared, **extra)
    else:
        extra = {"grad_cos_every": cfg.grad_cos_every}
        model = MultiTaskModule(*net, weighting, cfg.data.mixing, cfg.seed, **shared, **extra)
    if ckpt and not worker:
        check_resumable(Path(ckpt), model, cfg)
    fresh = not run_dir.exists()
    if announce is not None:
        announce(cfg)
    say(summary(cfg, dm.tasks, model, run_dir))
    trainer = None
    try:
        if not worker:
            make_run_dir(run_dir)
            save_run_config(cfg, run_dir, resumed=ckpt is not None)
            # Lightning starts DDP workers by running this command again: they inherit these and share the run
            os.environ["MTL_RUN_DIR"], os.environ["MTL_RESUME"] = str(run_dir), str(ckpt or "")
        if getattr(weighting, "needs_ranking", False):  # ForkMerge's top-k branches: rank the auxiliaries first
            weighting.use_ranking(rank_auxiliaries(cfg, weighting, dm.tasks, run_dir, bases))
        if forks and cfg.data.mixing == "sample":
            dm.branch_probs = weighting.branch_probs()
        clip = None if population else cfg.trainer.gradient_clip_val  # a population clips each member itself
        if population and cfg.population.pbt:
            callbacks = [population_pbt(cfg, dm.tasks, bool(bases), monitor), *callbacks]
        if forks:  # ForkMerge: the callback holds the branches, the module steps them
            fork = ForkMerge(weighting)
            fork.criterion = forkmerge_criterion(cfg.weighting.criterion, bool(bases))
            model.fork, model.clip_val, model.automatic_optimization, clip = fork, clip, False, None
            callbacks = [fork, *callbacks]
        ckpt_dir = run_dir / "checkpoints"
        checkpoints = [  # AtomicCheckpointIO (below) writes each file atomically
            ModelCheckpoint(
                ckpt_dir,
                filename="best",
                monitor=monitor,
                mode="max" if maximise else "min",
                save_top_k=1,
                enable_version_counter=False,
            ),
            LastCheckpoint(ckpt_dir, cfg.checkpoint.every_n_steps),
        ]
        if not save_checkpoints:
            checkpoints = []
        if cfg.trainer.early_stopping_patience:  # as MTReclib: patience on the monitored metric (val, not test)
            mode = "max" if maximise else "min"
            stop = EarlyStopping(
                monitor, patience=cfg.trainer.early_stopping_patience, mode=mode, check_on_train_epoch_end=False
            )
            callbacks = [*callbacks, stop]
        t = cfg.trainer
        shown, bar = progress_callbacks(t.enable_progress_bar, monitor)
        trainer = L.Trainer(
            max_epochs=t.max_epochs,
            max_steps=t.max_steps,
            accelerator=t.accelerator,
            devices=1 if population and t.devices == "auto" else t.devices,
            strategy=t.strategy,
            precision=t.precision,
            log_every_n_steps=t.log_every_n_steps,
            check_val_every_n_epoch=t.check_val_every_n_epoch,
            limit_train_batches=t.limit_train_batches,
            limit_val_batches=t.limit_val_batches,
            gradient_clip_val=clip,
            num_sanity_val_steps=t.num_sanity_val_steps,
            deterministic=t.deterministic,
            enable_progress_bar=bar,
            enable_model_summary=t.enable_model_summary,
            logger=build_loggers(cfg, run_dir) or False,
            callbacks=[*checkpoints, *callbacks, *shown],
            enable_checkpointing=save_checkpoints,
            plugins=[AtomicCheckpointIO()],
            default_root_dir=run_dir,
            use_distributed_sampler=False,  # MixtureSampler shards by rank itself
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    except BaseException:
        if fresh and not worker and not _trained(run_dir, trainer):
            _end_wandb(cfg)
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    metrics = {}
    for evaluate in (trainer.validate, trainer.test) if cfg.test else (trainer.validate,):
        for results in evaluate(model, datamodule=dm, verbose=False):  # none with trainer.limit_val_batches=0
            metrics.update(results)
    out = {k: float(v) for k, v in metrics.items()}
    out.update(getattr(model, "grad_cos_means", dict)())
    if trainer.is_global_zero:  # the base results a later Δm% reads (delta_m.runs=[this run_dir])
        write_atomic(run_dir / "metrics.json", json.dumps(out, indent=1, sort_keys=True))
        if population:
            write_member_metrics(run_dir, out, model.member_weights.tolist(), model.member_seeds)
    out["run_dir"] = str(run_dir)
    _end_wandb(cfg)
    return out


def population_pbt(cfg: DictConfig, tasks, has_base: bool, monitor: str) -> PopulationPBT:
    """The in-process PBT callback of `population.pbt`, ranking members by `population.metric` (auto: the monitor)."""
    p = cfg.population
    metric = monitor if p.metric == "auto" else p.metric
    higher = higher_is_better(metric, tasks, has_base, "population.metric")
    stage, _, name = metric.partition("/")
    if stage != "val":
        raise MTLError(f"population.metric={metric!r} must be a validation metric (val/...): it ranks the members.")
    return PopulationPBT(
        name, higher, p.perturbation_interval, p.quantile_fraction, p.resample_probability, p.weight_low, p.pbt_seed
    )


def _trained(run_dir: Path, trainer) -> bool:
    """Whether a run holds anything trained: a step taken, a checkpoint, or ForkMerge's pruning results."""
    stepped = trainer is not None and trainer.global_step > 0
    return stepped or any(run_dir.rglob("*.ckpt")) or (run_dir / "pruning.json").exists()


def _end_wandb(cfg: DictConfig) -> None:
    """End the W&B run: a next train() in this process (a notebook, a search's retraining) then starts its own."""
    if "wandb" in str(cfg.logger):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def delta_bases(cfg: DictConfig, tasks) -> dict[str, dict[str, float]]:
    """Per stage, the base results Δm% compares against; {} when none are configured. Validation must be covered;
    test/delta_m is left out, with a warning, when the base runs were not evaluated on the test split."""
    if not cfg.delta_m.runs and not cfg.delta_m.base:
        return {}
    bases = {}
    for stage in ("val", "test"):
        base = read_base(cfg.delta_m.base, cfg.delta_m.runs, stage)
        source = f"delta_m.runs={list(cfg.delta_m.runs)} / delta_m.base ({stage} split)"
        try:
            left = check_base(base, tasks, source)
        except MTLError:
            if stage == "val":
                raise
            rank_zero_warn(f"No test/delta_m: the base results have no test-split values for every task ({source}).")
            continue
        if left:
            rank_zero_warn(f"{stage}/delta_m leaves out {left}: the base results give no value for them.")
        bases[stage] = base
    return bases


def rank_auxiliaries(cfg: DictConfig, weighting, tasks, run_dir: Path, bases) -> list[int]:
    """ForkMerge's pruning phase, as the reference code runs it: train the targets with each auxiliary task alone
    for `weighting.pruning_epochs`, from the same initial weights (same seed), and rank the auxiliaries by the
    targets' validation score. The runs live in `<run_dir>/pruning/`; `pruning.json` keeps the scores, so a resumed
    run does not prune again."""
    path = run_dir / "pruning.json"
    names = [t.name for t in tasks]
    if path.exists():
        return [names.index(n) for n in json.loads(path.read_text())["ranking"]]
    c = cfg.weighting
    criterion = forkmerge_criterion(c.criterion, bool(bases))
    targets = [tasks[k] for k in weighting.targets]
    scores = {}
    for k in weighting.aux:
        w = [0.0] * len(tasks)
        for t in weighting.targets:
            w[t] = 1.0 / len(weighting.targets)
        w[k] = c.aux_weight
        sub = with_weighting(
            cfg,
            {"name": "fixed", "weights": w, "normalize": False},
            out_dir=str(run_dir / "pruning"),
            run_name=names[k],
            resume=None,
            test=False,
            logger="csv",
        )
        sub.trainer.max_epochs, sub.trainer.max_steps = c.pruning_epochs, -1
        m = train(sub, save_checkpoints=False)
        results = {key[4:]: v for key, v in m.items() if key.startswith("val/")}
        scores[names[k]] = target_score(results, targets, criterion, bases.get("val"))
    ranking = sorted(weighting.aux, key=lambda k: -scores[names[k]])
    write_atomic(path, json.dumps({"scores": scores, "ranking": [names[k] for k in ranking]}, indent=1))
    return ranking


def forkmerge_criterion(criterion: str, has_base: bool) -> str:
    if criterion == "delta_m" and not has_base:
        raise MTLError(
            "weighting.criterion=delta_m merges by Δm% against base results, and none are given: set delta_m.runs "
            "(single-task run directories) or delta_m.base (numbers by metric), or use weighting.criterion=primary."
        )
    return criterion if criterion != "auto" else ("delta_m" if has_base else "primary")
