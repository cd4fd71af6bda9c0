"""Searching scalarization weights with Ray Tune: PBT, PB2 and grid sweeps (Royer et al., arXiv:2310.08910).

Every trial is `train()` (a Lightning Trainer) reporting `search.metric` and a checkpoint to Tune after each epoch
through Ray's Lightning callback. The population is ranked on a held-out part of the training set
(`data.train_fraction`, 0.7 as in the paper), never on the test split.

PBT/PB2 search the K task weights as K raw values in [weight_low, 1], used normalised (w / sum w): perturbing or
resampling one value never leaves the simplex, and `custom_explore_fn` rescales a mutated vector so its largest
entry is 1 (the normalised weights do not change; the raw values stay inside the bounds). On exploit, Tune
restarts a trial from the donor's checkpoint with the trial's own mutated config. Its weights come from that
config (fixed weights are not saved in a checkpoint); its learning rate is restored with the donor's optimiser and
scheduler, so `ApplyLearningRate` sets it again after Lightning's restore: the donor's values never win.
The weights used at every epoch travel inside the checkpoint (`WeightSchedule`), so the best trial's checkpoint
holds its whole schedule, across the exploits of its lineage.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from .config import compose
from .data import create_datamodule
from .errors import MTLError
from .model import default_monitor, higher_is_better
from .train import train


@dataclass
class SearchConfig:
    name: str = "pbt"  # pbt | pb2 | grid
    population: int = 4  # pbt/pb2: trials trained in parallel
    perturbation_interval: int = 1  # epochs between exploit/explore steps
    quantile_fraction: float = 0.25  # the bottom fraction copies the top fraction
    resample_probability: float = 0.25  # pbt: resample a weight instead of perturbing it
    weight_low: float = 0.05  # raw weights live in [weight_low, 1] before normalisation
    initial: list[list[float]] | None = None  # pbt/pb2: start (part of) the population at these weight vectors
    search_lr: bool = False  # also search optim.lr (log-uniform within lr_bounds)
    lr_bounds: list[float] = field(default_factory=lambda: [1e-4, 1e-2])
    grid: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])  # p of task 0
    capacities: list[list[int]] = field(default_factory=list)  # grid: [[depth, width], ...]; [] = the exp's model
    baselines: bool = True  # grid: also train every single-task baseline
    train_fraction: float = 0.7  # the rest of the training split ranks the population
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = -1.0  # -1: 1 when CUDA is available, else 0; fractions share a GPU
    num_cpus: int | None = None  # local Ray only; None: all
    storage_path: str | None = None  # default <out_dir>/search; shared storage on a multi-node cluster
    name_suffix: str | None = None  # the search's folder: <exp>-<search.name>[-suffix]
    max_failures: int = 0  # retry a crashed trial this many times, from its last checkpoint
    reuse_actors: bool = True  # pbt/pb2: an exploit restarts the trial in its live worker, not a new process
    resume: bool = False  # continue an interrupted search (Tuner.restore)
    retrain: bool = False  # retrain on the whole training split with the best weights, evaluate on test
    metric: str = "auto"  # what ranks the trials, in its direction: any val metric; auto as checkpoint.monitor
    seed: int = 0


def compose_search(exp: str, overrides: list[str]) -> tuple[SearchConfig, list[str]]:
    """Split `search.*`/`search=`/`resume=` overrides from the training ones; validate the search config."""
    mine, rest = [], []
    for o in overrides:
        key = o.split("=", 1)[0]
        if key == "search":
            mine.append(f"name={o.split('=', 1)[1]}")
        elif key.startswith("search."):
            mine.append(o[len("search.") :])
        elif key == "resume":
            mine.append(o)
        else:
            rest.append(o)
    schema = OmegaConf.structured(SearchConfig)
    OmegaConf.set_struct(schema, True)
    try:
        scfg = SearchConfig(**OmegaConf.to_container(OmegaConf.merge(schema, OmegaConf.from_dotlist(mine))))
    except Exception as e:
        msg = str(e).splitlines()[0]
        raise MTLError(
            f"Bad search config {mine}: {msg}. Valid keys: search.{', search.'.join(asdict(SearchConfig()))}."
        ) from None
    if scfg.name not in ("pbt", "pb2", "grid"):
        raise MTLError(f"Unknown search={scfg.name!r}. Valid choices: grid, pb2, pbt.")
    if scfg.name != "grid" and scfg.population < 2:
        raise MTLError(f"search.population={scfg.population}: population-based training needs at least 2 trials.")
    if not 0 < scfg.train_fraction < 1:
        raise MTLError(f"search.train_fraction={scfg.train_fraction} must be within (0, 1): the rest ranks trials.")
    cfg = compose(exp, rest)  # fail now, not inside a trial, on a bad training override
    dm_tasks, has_delta = create_datamodule(cfg.data).tasks, bool(cfg.delta_m.runs or cfg.delta_m.base)
    if scfg.metric == "auto":
        scfg.metric = default_monitor(dm_tasks, has_delta)
    higher_is_better(scfg.metric, dm_tasks, has_delta, "search.metric")  # a clear error for an unknown metric
    tasks = [t.name for t in dm_tasks]
    if scfg.name == "grid" and len(tasks) != 2:
        raise MTLError(
            f"search=grid sweeps p over two tasks (p, 1-p); data has {len(tasks)} tasks {tasks}: use data.tasks=[a,b] "
            "or search=pbt."
        )
    if len(tasks) < 2:
        raise MTLError(f"search={scfg.name} searches task weights, which needs at least 2 tasks; data has {tasks}.")
    return scfg, rest


# -- inside a trial -----------------------------------------------------------------------------------------
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
    from ray.tune.integration.pytorch_lightning import TuneReportCheckpointCallback

    class Report(TuneReportCheckpointCallback):
        def _handle(self, trainer, pl_module):
            if trainer.state.fn == "fit":  # one Tune iteration per training epoch, none for trainer.validate()
                super()._handle(trainer, pl_module)

        def _get_report_dict(self, trainer, pl_module):
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            return {
                **m,
                "score": sign * m[metric],
                "step": trainer.global_step,
                "weights": _weights(trainer.lightning_module),
            }

    return Report(filename="trial.ckpt", on="validation_end")


def _config_weights(config: dict) -> list[float] | None:
    """A PBT/PB2 trial's raw weights w0..w{K-1}; None for a grid trial (its weights come as overrides)."""
    return [config[f"w{k}"] for k in range(config["num_tasks"])] if "w0" in config else None


def _weights(pl_module) -> list[float]:
    w = getattr(pl_module.weighting, "w", None)
    return [] if w is None else w.tolist()


def trial(config: dict) -> None:
    """A Tune function trainable: one `train()` from the trial's config, resumed from Tune's checkpoint if any."""
    from ray import tune

    weights = _config_weights(config)
    ctx = tune.get_context()
    # One run directory (and W&B run) per trial, kept across the restarts PBT makes on exploit
    run_dir = Path(ctx.get_trial_dir()) / config["exp"] / ctx.get_trial_id()
    over = list(config["overrides"]) + [f"out_dir={ctx.get_trial_dir()}", "test=false"]
    over += [f"wandb.group={config['search']}", *config.get("extra", [])]
    if weights is not None:
        over += ["weighting=fixed", f"weighting.weights=[{','.join(map(str, weights))}]", "weighting.normalize=true"]
    lr = config.get("lr")
    if lr is not None:
        over.append(f"optim.lr={lr}")
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        over.append(f"run_name={ctx.get_trial_id()}")
    else:  # copy it out (its directory only lives inside as_directory) into the run dir, then resume from it
        local = run_dir / "checkpoints" / "restore.ckpt"
        local.parent.mkdir(parents=True, exist_ok=True)
        with ckpt.as_directory() as d:
            shutil.copy(Path(d) / "trial.ckpt", local)
        over.append(f"resume={local}")
    cfg = compose(config["exp"], over)
    callbacks = [WeightSchedule(), _report_callback(config["metric"], config["sign"])]
    if lr is not None:
        callbacks.insert(0, ApplyLearningRate(lr))
    # Tune's per-epoch checkpoint is the trial's restore point: best/last.ckpt beside it would double the disk used,
    # and Ray's sync of the trial folder can catch an atomic write's temporary file as it is renamed
    train(cfg, callbacks, save_checkpoints=False)


# -- the driver ---------------------------------------------------------------------------------------------
def _explore(config: dict) -> dict:
    """Rescale the raw weights so the largest is 1: same normalised weights, raw values kept in bounds."""
    ks = sorted(k for k in config if k[:1] == "w" and k[1:].isdigit())
    top = max(config[k] for k in ks)
    for k in ks:
        config[k] = config[k] / top
    return config


def _initial_weights_callback(path: Path):
    """A driver-side Tune callback that records each trial's starting weights in `path` (kept across resume)."""
    from ray import tune

    class InitialWeights(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            seen = json.loads(path.read_text()) if path.exists() else {}
            weights = _config_weights(trial.config)
            if trial.trial_id not in seen and weights is not None:  # a restored trial keeps its first entry
                seen[trial.trial_id] = weights
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(seen))

    return InitialWeights()


class _DoubleDeleteFilter(logging.Filter):
    """Drop Tune's traceback for deleting an already deleted checkpoint (Ray 2.60, harmless, seen with PBT).

    PBT asks a donor to save, and Tune registers the checkpoint that save returns a second time; with
    `num_to_keep` the second entry later deletes a folder the first already removed. Only that case is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ("Error handling checkpoint" in str(record.msg) and isinstance(exc, FileNotFoundError))


def run_search(exp: str, overrides: list[str], scfg: SearchConfig) -> dict:
    import ray
    from ray import tune

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    controller_log = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(isinstance(f, _DoubleDeleteFilter) for f in controller_log.filters):
        controller_log.addFilter(_DoubleDeleteFilter())
    random.seed(scfg.seed)  # Tune samples the initial population and PBT explores with these generators
    np.random.seed(scfg.seed)
    cfg = compose(exp, overrides)
    dm = create_datamodule(cfg.data)
    tasks = [t.name for t in dm.tasks]
    K = len(tasks)
    has_delta = bool(cfg.delta_m.runs or cfg.delta_m.base)
    if scfg.metric == "auto":
        scfg.metric = default_monitor(dm.tasks, has_delta)
    storage = Path(scfg.storage_path or Path(cfg.out_dir) / "search").expanduser().resolve()
    name = f"{exp}-{scfg.name}" + (f"-{scfg.name_suffix}" if scfg.name_suffix else "")
    base = {
        "exp": exp,
        "overrides": [*overrides, f"data.train_fraction={scfg.train_fraction}", "trainer.enable_progress_bar=false"],
        "num_tasks": K,
        "search": name,
        "metric": scfg.metric,
        "sign": 1.0 if higher_is_better(scfg.metric, dm.tasks, has_delta, "search.metric") else -1.0,
    }
    gpus = scfg.gpus_per_trial if scfg.gpus_per_trial >= 0 else float(torch.cuda.is_available())
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()  # an existing cluster
        else:
            ray.init(num_cpus=scfg.num_cpus, include_dashboard=False)
    trainable = tune.with_resources(trial, {"cpu": scfg.cpus_per_trial, "gpu": gpus})
    run_config = tune.RunConfig(
        name=name,
        storage_path=str(storage),
        failure_config=tune.FailureConfig(max_failures=scfg.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=4),  # PBT donors need theirs kept
        callbacks=[_initial_weights_callback(storage / name / "initial_weights.json")],
        verbose=0,
    )
    if scfg.name == "grid":
        param_space, tune_config = _grid_space(scfg, cfg, tasks, base)
    else:
        param_space, tune_config = _pbt_space(scfg, cfg, tasks, base)
    path = storage / name
    if scfg.resume:
        if not tune.Tuner.can_restore(str(path)):
            raise MTLError(f"search.resume=true found no search to continue in {path}; start it without resume.")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        if path.exists():
            raise MTLError(f"{path} holds a search already: continue it with resume=true, or set search.name_suffix.")
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    results = tuner.fit()
    errors = [str(r.error).splitlines()[0] for r in results if r.error]
    if errors and len(errors) == len(results):
        raise MTLError(f"Every trial failed; the first error: {errors[0]}. Logs: {path}")
    out = (_grid_report if scfg.name == "grid" else _pbt_report)(results, scfg, tasks, path)
    out["failed_trials"] = errors
    out["compute_trial_epochs"] = sum(int(r.metrics.get("training_iteration", 0)) for r in results if r.metrics)
    out["search_dir"] = str(path)
    if scfg.retrain and "best_weights" in out:
        w = out["best_weights"]
        final = train(
            compose(exp, [*overrides, "weighting=fixed", f"weighting.weights=[{','.join(map(str, w))}]", "test=true"])
        )
        out.update({f"retrain/{k}": v for k, v in final.items() if k.startswith("test/")})
    return out


def _pbt_space(scfg, cfg, tasks, base):
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    K = len(tasks)
    space = {**base, **{f"w{k}": tune.uniform(scfg.weight_low, 1.0) for k in range(K)}}
    bounds = {f"w{k}": [scfg.weight_low, 1.0] for k in range(K)}
    if scfg.search_lr:
        space["lr"] = tune.loguniform(*scfg.lr_bounds)
        bounds["lr"] = list(scfg.lr_bounds)
    if scfg.name == "pbt":
        sched = PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=scfg.perturbation_interval,
            hyperparam_mutations={k: tune.uniform(*b) for k, b in bounds.items()},
            quantile_fraction=scfg.quantile_fraction,
            resample_probability=scfg.resample_probability,
            custom_explore_fn=_explore,
        )
    else:
        from ray.tune.schedulers.pb2 import PB2

        sched = PB2(
            time_attr="training_iteration",
            perturbation_interval=scfg.perturbation_interval,
            hyperparam_bounds=bounds,
            quantile_fraction=scfg.quantile_fraction,
        )
    points = None
    if scfg.initial:
        from ray.tune.search import BasicVariantGenerator

        points = []
        for v in scfg.initial:
            if len(v) != K or min(v) <= 0:
                raise MTLError(f"search.initial vector {list(v)} needs {K} positive weights (tasks {tasks}).")
            raw = [x / max(v) for x in v]  # same normalised weights, largest raw value 1
            if min(raw) < scfg.weight_low:
                raise MTLError(f"search.initial vector {list(v)} has a weight below search.weight_low x its largest.")
            points.append({f"w{k}": raw[k] for k in range(K)})
        if len(points) > scfg.population:
            raise MTLError(f"search.initial has {len(points)} vectors for search.population={scfg.population}.")
    search_alg = None if points is None else BasicVariantGenerator(points_to_evaluate=points)
    n, reuse = scfg.population, scfg.reuse_actors  # reuse: no new process (and no re-import of torch) per exploit
    tc = tune.TuneConfig(
        metric="score", mode="max", scheduler=sched, num_samples=n, search_alg=search_alg, reuse_actors=reuse
    )
    return space, tc


def _grid_space(scfg, cfg, tasks, base):
    from ray import tune

    if any(not 0 <= p <= 1 for p in scfg.grid):
        raise MTLError(f"search.grid={list(scfg.grid)} must hold values of p within [0, 1].")
    caps = [list(c) for c in scfg.capacities] or [[cfg.model.depth, cfg.model.width]]
    if any(len(c) != 2 for c in caps):
        raise MTLError(f"search.capacities={caps} must be [depth, width] pairs.")
    variants = [["mix", p] for p in scfg.grid] + ([["single", t] for t in tasks] if scfg.baselines else [])
    space = {**base, "variant": tune.grid_search(variants), "capacity": tune.grid_search(caps)}
    space["extra"] = tune.sample_from(lambda spec: _grid_overrides(spec.config))
    return space, tune.TuneConfig(metric="score", mode="max")


def _grid_overrides(config: dict) -> list[str]:
    (kind, value), (depth, width) = config["variant"], config["capacity"]
    extra = [f"model.depth={depth}", f"model.width={width}"] if depth is not None else []
    if kind == "single":
        return [*extra, f"data.tasks=[{value}]"]
    return [*extra, "weighting=fixed", f"weighting.weights=[{value},{1 - value}]"]


def _final_metrics(result) -> dict:
    return {k: v for k, v in (result.metrics or {}).items() if k.startswith("val/") or k == "score"}


def _pbt_report(results, scfg, tasks, path: Path) -> dict:
    best = results.get_best_result(metric="score", mode="max", scope="last")
    with best.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "trial.ckpt", map_location="cpu", weights_only=False)
    schedule = state["callbacks"]["WeightSchedule"]["schedule"]
    with open(path / "best_schedule.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", *tasks])
        w.writerows(schedule)
    _plot_schedule(schedule, tasks, path / "best_schedule.png")
    # each trial's starting weights (raw, as sampled) and those of its last report (r.config is the last config)
    first = [[x / sum(w) for x in w] for w in json.loads((path / "initial_weights.json").read_text()).values()]
    last = [list(r.metrics["weights"]) for r in results if r.metrics]
    initial_mean = [sum(w[k] for w in first) / len(first) for k in range(len(tasks))]
    final_mean = [sum(w[k] for w in last) / len(last) for k in range(len(tasks))]
    return {
        "best_trial": Path(best.path).name,
        "best_value": float(best.metrics[scfg.metric]),
        "best_weights": schedule[-1][1:],
        "schedule": schedule,
        "initial_weights_mean": initial_mean,
        "final_weights_mean": final_mean,
    }


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (trials and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_schedule(schedule, tasks, png: Path) -> None:
    plt = _pyplot()

    epochs = [r[0] for r in schedule]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.stackplot(epochs, *[[r[1 + k] for r in schedule] for k in range(len(tasks))], labels=tasks, step="post")
    ax.set(xlabel="epoch", ylabel="task weight", ylim=(0, 1), title="weight schedule of the best trial")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _grid_report(results, scfg, tasks, path: Path) -> dict:
    rows = []
    for r in results:
        if not r.metrics:
            continue
        (kind, value), (depth, width) = r.config["variant"], r.config["capacity"]
        row = {"kind": kind, "p": value if kind == "mix" else "", "task": value if kind == "single" else ""}
        row.update({"depth": depth, "width": width, "acc_mean": r.metrics.get("val/acc_mean")})
        for t in tasks:
            row[f"acc/{t}"] = r.metrics.get(f"val/acc/{t}", "")
        rows.append(row)
    with open(path / "grid.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot_grid(rows, tasks, path)
    mix = [r for r in rows if r["kind"] == "mix"]
    best = max(mix, key=lambda r: r["acc_mean"])
    return {
        "table": str(path / "grid.csv"),
        "best_trial": f"p={best['p']}, depth {best['depth']}, width {best['width']}",
        "best_p": best["p"],
        "best_value": best["acc_mean"],
        "best_weights": [best["p"], 1 - best["p"]],
    }


def _plot_grid(rows, tasks, path: Path) -> None:
    plt = _pyplot()

    caps = sorted({(r["depth"], r["width"]) for r in rows}, key=lambda c: (c[0] or 0, c[1] or 0))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for c in caps:
            pts = sorted((r["p"], r[f"acc/{t}"]) for r in rows if r["kind"] == "mix" and (r["depth"], r["width"]) == c)
            ax.plot([p for p, _ in pts], [a for _, a in pts], marker="o", label=f"depth {c[0]}, width {c[1]}")
        ax.set(xlabel=f"p (weight of {tasks[0]})", ylabel=f"val acc {t}", title=t)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path / "grid_acc_vs_p.png", dpi=120)
    plt.close(fig)
    labels = [f"{d}x{w}" for d, w in caps]
    best_p, gaps = [], {t: [] for t in tasks}
    for c in caps:
        mix = [r for r in rows if r["kind"] == "mix" and (r["depth"], r["width"]) == c]
        best = max(mix, key=lambda r: r["acc_mean"])
        best_p.append(best["p"])
        for t in tasks:
            single = [
                r[f"acc/{t}"]
                for r in rows
                if r["kind"] == "single" and r["task"] == t and (r["depth"], r["width"]) == c
            ]
            gaps[t].append(best[f"acc/{t}"] - single[0] if single and single[0] != "" else float("nan"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    a1.plot(labels, best_p, marker="o")
    a1.set(xlabel="capacity (depth x width)", ylabel="best p", ylim=(-0.05, 1.05), title="best weight vs capacity")
    for t in tasks:
        a2.plot(labels, gaps[t], marker="o", label=t)
    a2.axhline(0, color="grey", lw=0.8)
    a2.set(xlabel="capacity (depth x width)", ylabel="MTL - single-task acc", title="gap vs capacity")
    a2.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path / "grid_capacity.png", dpi=120)
    plt.close(fig)
