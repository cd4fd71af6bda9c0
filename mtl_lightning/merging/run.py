"""A merging run (`merging=NAME`): warm-up, one model per task, the merge, its coefficients chosen on validation.

    <run_dir>/warmup/<exp>/start/        the joint warm-up: theta_0 (uniform weights, merging.warmup_epochs)
    <run_dir>/tasks/<exp>/<task>/        each task alone, started from it (model.init), merging.task_epochs
    <run_dir>/checkpoints/last.ckpt      the merged model (experiments.evaluate reads it), metrics.json, merging.json

Task models that finished (their metrics.json is there) are not trained again when the same run folder is given
again (`run_name=`), and one interrupted after a checkpoint continues from its last.ckpt, so an interrupted merging
run continues where it stopped. With `merging.parallel=true` the task models train at once, one Ray task each (a
local Ray, or the cluster at RAY_ADDRESS), each resumable alike.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from ..adapters import fold_lora
from ..checkpoint import init_checkpoint, init_weights
from ..config import save_run_config, with_weighting, write_atomic
from ..console import say
from ..errors import MTLError
from . import MERGINGS, Merging, task_vectors, to_state_dict


def create_from_config(m) -> Merging:
    """The method `merging.name` with the options of `merging` that are its own (null: the method's default)."""
    cls = MERGINGS.get(m.name)
    mine = {f.name for f in fields(cls.Config)} - {"name"}
    given = {k.removeprefix("dare_").removeprefix("ada_"): v for k, v in OmegaConf.to_container(m).items()}
    given = {k: v for k, v in given.items() if v is not None}
    return cls(cls.Config(**{k: v for k, v in given.items() if k in mine}))


def check_merging(cfg: DictConfig) -> Merging:
    m = cfg.merging
    method = create_from_config(m)
    if cfg.model.architecture != "hps" or cfg.model.tower:
        raise MTLError(
            f"merging={m.name} merges the shared parameters and gives each task its own model's head, which needs the "
            f"plain shared network (model.architecture=hps without model.tower); got model.architecture="
            f"{cfg.model.architecture}, model.tower={list(cfg.model.tower)}."
        )
    if cfg.weighting.name != "uniform" or cfg.population.weights:
        raise MTLError(
            f"merging={m.name} trains its warm-up with uniform weights and each task model alone: weighting="
            f"{cfg.weighting.name} and population.* do not apply. Leave them at their defaults."
        )
    if (m.start is None) != (not m.models):
        raise MTLError("merging.start and merging.models go together: theta_0's run and the task models' runs.")
    if not 0 < m.warmup_fraction < 1:
        raise MTLError(f"merging.warmup_fraction={m.warmup_fraction} must be in (0, 1).")
    if m.start is None and m.warmup_epochs < 0:
        raise MTLError(f"merging.warmup_epochs={m.warmup_epochs} must be >= 0 (0: no warm-up).")
    return method


def sub_config(cfg: DictConfig, out_dir: Path, run_name: str, epochs: int, steps: int, **changes) -> DictConfig:
    """A warm-up or task run of this merging run: uniform weights, no merging, no test split; `steps` optimiser steps
    (> 0: a share of trainer.max_steps), else `epochs` epochs."""
    sub = with_weighting(cfg, {"name": "uniform"}, out_dir=str(out_dir), run_name=run_name, resume=None, test=False)
    sub.merging.name = None
    sub.trainer.max_epochs, sub.trainer.max_steps = (-1, steps) if steps > 0 else (epochs, -1)
    for key, value in changes.items():
        OmegaConf.update(sub, key, value)
    return sub


def budget(cfg: DictConfig, tasks: int) -> tuple[int, list[int]]:
    """The warm-up's steps and each task model's, with trainer.max_steps S: warmup_fraction of S (none without a
    warm-up), the rest split as evenly as steps allow, summing to S. (0, [0, ...]) without S: epochs count instead."""
    S, m = int(cfg.trainer.max_steps), cfg.merging
    if S <= 0:
        return 0, [0] * tasks
    warm = round(S * m.warmup_fraction) if m.warmup_epochs > 0 else 0
    share, extra = divmod(S - warm, tasks)
    if share < 1 or (m.warmup_epochs > 0 and warm < 1):
        raise MTLError(
            f"trainer.max_steps={S} leaves a part of merging={m.name} without a step (warm-up {warm}, each of the "
            f"{tasks} task models {share}): raise trainer.max_steps or change merging.warmup_fraction."
        )
    return warm, [share + (i < extra) for i in range(tasks)]


def trained_run(cfg: DictConfig, fit) -> Path:
    """The run `cfg` names, trained by `fit` unless it finished before (its metrics.json is there); one interrupted
    after a checkpoint continues from its last.ckpt, exactly as `resume=last` continues any run."""
    run_dir = Path(cfg.out_dir) / cfg.exp / cfg.run_name
    if (run_dir / "metrics.json").exists():
        say(f"merging: {run_dir} finished before, kept")
        return run_dir
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        say(f"merging: {run_dir} was interrupted, continued from its last.ckpt")
        cfg = OmegaConf.merge(cfg, {"resume": "last"})
    elif run_dir.exists():  # interrupted before its first checkpoint: trained again from its start
        shutil.rmtree(run_dir)
    return Path(fit(cfg)["run_dir"])


def _train_in_worker(sub: dict) -> str:
    """A task model trained in a Ray worker (merging.parallel): its config typed again, its plugins imported."""
    from ..config import config_from_dict
    from ..train import train

    return str(trained_run(config_from_dict(sub, "merging.parallel"), train))


def task_models(cfg: DictConfig, subs: dict[str, DictConfig], fit) -> dict[str, Path]:
    """Each task model trained (or kept, or continued): one after another, or with merging.parallel at once, one
    Ray task each with `merging.cpus_per_model` CPUs and `merging.gpus_per_model` GPUs."""
    m = cfg.merging
    if not m.parallel or len(subs) < 2:
        return {t: trained_run(sub, fit) for t, sub in subs.items()}
    import ray

    from ..search.ray_session import ray_session

    gpus = m.gpus_per_model if m.gpus_per_model >= 0 else float(torch.cuda.is_available())
    say(f"merging: {len(subs)} task models in parallel on Ray ({m.cpus_per_model} CPU, {gpus} GPU each)")
    with ray_session(None, plugins=list(cfg.plugins)):
        remote = ray.remote(num_cpus=m.cpus_per_model, num_gpus=gpus, max_retries=0)(_train_in_worker)
        refs = {}
        for t, sub in subs.items():
            sub = OmegaConf.to_container(sub, resolve=True)
            if "root" in sub["data"]:  # a worker's working directory is not this one
                sub["data"]["root"] = str(Path(sub["data"]["root"]).expanduser().resolve())
            refs[t] = remote.remote(sub)
        try:
            return {t: Path(ray.get(ref)) for t, ref in refs.items()}
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, MTLError) else str(e).strip().splitlines()[-1]
            raise MTLError(
                f"merging.parallel: a task model failed in its Ray worker: {cause}. The task models that finished "
                "are kept; run the same command again (same run_name) to continue."
            ) from None


def merge_run(cfg: DictConfig, fit) -> dict:
    """Train (or take) the start and the task models, merge them, choose the coefficients on validation, report the
    merged model's metrics on val and test. `fit(cfg) -> metrics` trains one run (`train.train`)."""
    from ..train import build, evaluate

    method = check_merging(cfg)
    m = cfg.merging
    run_dir = Path(cfg.out_dir).expanduser().resolve() / cfg.exp / (cfg.run_name or _stamp())
    if m.start is None:
        names = _task_names(cfg)
        warm, per_task = budget(cfg, len(names))
        if m.warmup_epochs > 0:
            start = trained_run(sub_config(cfg, run_dir / "warmup", "start", m.warmup_epochs, warm), fit)
        else:  # theta_0 is the pretrained (or model.init's) weights themselves, or the seeded random initialisation
            if not (cfg.model.pretrained or cfg.model.init):
                say(
                    f"merging={m.name} from a random start (merging.warmup_epochs=0): the task models share no "
                    "training, and their merge is expected to fail (what a warm-up or pretrained weights avoid)"
                )
            start = run_dir / "warmup" / "start.ckpt"
            if not start.exists():
                start.parent.mkdir(parents=True, exist_ok=True)
                L.seed_everything(cfg.seed, workers=True, verbose=False)  # the run's seed: its initialisation
                b = build(cfg)
                if cfg.model.init:
                    init_weights(b.model, cfg.model.init)
                state = {"state_dict": b.model.state_dict(), "tasks": [t.name for t in b.dm.tasks], "global_step": 0}
                torch.save(state, start)
        subs = {}
        for t, steps in zip(names, per_task):
            epochs = m.task_epochs or cfg.trainer.max_epochs
            # started from theta_0 (model.init), not from the hub's weights again (model.pretrained)
            over = {"data.tasks": [t], "model.init": str(start), "model.pretrained": False}
            subs[t] = sub_config(cfg, run_dir / "tasks", t, epochs, steps, **over)
        models = task_models(cfg, subs, fit)
    else:
        start, models = Path(m.start).expanduser().resolve(), {}
        for path in m.models:
            saved = OmegaConf.load(Path(path) / "config.yaml")
            tasks = list(saved.data.get("tasks") or [])
            if len(tasks) != 1:
                raise MTLError(f"merging.models: {path} trained {len(tasks) or 'every'} task(s); a task model has one.")
            if saved.model.get("init") is None or Path(saved.model.init).expanduser().resolve() != start:
                raise MTLError(
                    f"merging.models: {path} was not fine-tuned from merging.start={m.start} (its model.init is "
                    f"{saved.model.get('init')}): task vectors are differences from one shared start theta_0."
                )
            models[tasks[0]] = Path(path)
        names = list(models)
    cfg = OmegaConf.merge(cfg, {"data": {"tasks": names}})
    start_ckpt, task_ckpts = _load(start), [_load(models[t]) for t in names]  # each read once
    theta0_state, task_states = start_ckpt["state_dict"], [c["state_dict"] for c in task_ckpts]
    if cfg.model.adapter == "lora":  # task vectors of adapters: on the folded weights, merged into a plain model
        scale = cfg.model.lora.alpha / cfg.model.lora.rank
        theta0_state, task_states = fold_lora(theta0_state, scale), [fold_lora(s, scale) for s in task_states]
        cfg = OmegaConf.merge(cfg, {"model": {"adapter": None, "freeze_backbone": False}})
    shared = {k: v for k, v in theta0_state.items() if not k.startswith(("heads.", "weighting."))}
    theta0, tau, keys = task_vectors(
        shared, [{k: s[k] for k in s if k in shared} for s in task_states], [str(models[t]) for t in names]
    )
    b = build(cfg)
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, enable_model_summary=False, **quiet)
    heads = {}
    for i, s in enumerate(task_states):  # each task's own model's head (head 0 of a single-task model)
        heads.update({f"heads.{i}.{k[len('heads.0.') :]}": v for k, v in s.items() if k.startswith("heads.0.")})

    def load(coefficients: dict) -> None:
        state = to_state_dict(method.merge(theta0, tau, **coefficients), shared, keys)
        b.model.load_state_dict({**state, **heads}, strict=False)

    sizes = [shared[k].numel() for k in keys]
    grid, learned = method.grid(), None
    if getattr(method, "learned", False):  # AdaMerging: its coefficients learned on the validation inputs
        lambdas, trace = adapt(method, b, theta0, tau, keys, shared, heads, sizes, cfg.data.batch_size)
        grid = [{"lambdas": lambdas, "sizes": sizes}]
        learned = {"lambdas": lambdas.tolist(), "entropy": [trace[0], trace[-1]] if trace else []}
    tried = []
    for coefficients in grid:
        load(coefficients)
        score = evaluate(trainer, b, ("val",))[b.monitor]
        shown = {k: v for k, v in coefficients.items() if k not in ("lambdas", "sizes")}
        tried.append({**shown, b.monitor: score, "_coefficients": coefficients})
        say(f"merging={m.name} {shown or ''}: {b.monitor} {score:.4f}")
    pick = max if b.maximise else min
    best = pick(tried, key=lambda r: r[b.monitor])
    load(best["_coefficients"])
    chosen = {k: v for k, v in best.items() if k not in (b.monitor, "_coefficients")}
    tried = [{k: v for k, v in r.items() if k != "_coefficients"} for r in tried]
    out = evaluate(trainer, b, ("val", "test") if cfg.test else ("val",))
    steps = {"warmup": int(start_ckpt["global_step"])}
    steps.update({t: int(c["global_step"]) for t, c in zip(names, task_ckpts)})
    out["merging/steps"] = float(sum(steps.values()))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, run_dir, resumed=False)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    record = {"method": repr(method), "chosen": chosen, "tried": tried, "steps": steps}
    if learned is not None:
        record["learned"] = learned
    record["start"], record["models"] = str(start), {t: str(p) for t, p in models.items()}
    write_atomic(run_dir / "merging.json", json.dumps(record, indent=1))
    write_atomic(run_dir / "metrics.json", json.dumps(out, indent=1, sort_keys=True))
    say(
        f"merging={m.name}: chose {chosen or 'its only setting'} on validation; {int(out['merging/steps'])} training "
        f"steps in all ({', '.join(f'{k} {v}' for k, v in steps.items())})"
    )
    out["run_dir"] = str(run_dir)
    return out


def adapt(method, b, theta0, tau, keys, shared, heads, sizes, batch_size: int):
    """AdaMerging's lambdas, learned on the validation split's inputs (labels unused) in training-sized batches."""
    import itertools

    from .adamerging import prediction_entropy

    kinds = [(i, t.kind) for i, t in enumerate(b.dm.tasks) if t.kind in ("classification", "segmentation", "binary")]
    if not kinds:
        raise MTLError(
            f"merging=adamerging learns its coefficients by minimising the entropy of predicted class probabilities, "
            f"and none of the tasks {[t.name for t in b.dm.tasks]} predicts classes: use task_arithmetic or ties."
        )
    b.dm.setup("validate")
    inputs = [x for x, _ in b.dm.val_dataloader(batch_size)]
    model = b.model.eval()

    def entropy(theta, x):
        state = {**to_state_dict(theta, shared, keys), **heads}
        outs = torch.func.functional_call(model, state, (x,))
        return sum(prediction_entropy(kind, outs[i]) for i, kind in kinds)

    return method.learn(theta0, tau, sizes, itertools.cycle(inputs), entropy)


def _load(run: Path) -> dict:
    """A run's (or a .ckpt's) checkpoint: its state dict and global step."""
    return torch.load(init_checkpoint(run), map_location="cpu", weights_only=False)


def _task_names(cfg: DictConfig) -> list[str]:
    from ..data import create_datamodule

    return [t.name for t in create_datamodule(cfg.data, cfg.seed).tasks]


def _stamp() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S")
