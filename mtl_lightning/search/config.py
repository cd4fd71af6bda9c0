"""The search's own settings (`search.*` on the command line), split from the training overrides and checked."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import OmegaConf

from ..checks import warn_no_perturbation
from ..config import compose
from ..data import create_datamodule
from ..errors import MTLError
from ..model import default_monitor, higher_is_better
from ..tasks.delta_m import delta_flag
from .space import check_space, flat_space

NAMES = ("asha", "grid", "pb2", "pbt")
ALGOS = ("random", "optuna")


@dataclass
class SearchConfig:
    name: str = "pbt"  # pbt | pb2 | grid | asha
    backend: str = "ray"  # ray: a Ray Tune trial per weight vector; population: vectorised populations (grid, pbt)
    population: int = 4  # pbt/pb2: trials trained in parallel
    perturbation_interval: int = 1  # epochs between exploit/explore steps
    quantile_fraction: float = 0.25  # the bottom fraction copies the top fraction
    resample_probability: float = 0.25  # pbt: resample a weight instead of perturbing it
    weight_low: float = 0.05  # raw weights live in [weight_low, 1] before normalisation
    initial: list[list[float]] | None = None  # pbt/pb2: start (part of) the population at these weight vectors
    # any config key -> a distribution (search/space.py): a method's own options, the optimiser's, the model's
    space: dict[str, Any] = field(default_factory=dict)
    weights: bool = True  # also search the task weights (false: the experiment's own weighting, with the space)
    trials: int = 8  # asha: trials sampled (pbt/pb2: search.population)
    grace_period: int = 1  # asha: epochs every trial trains before it can be stopped
    reduction_factor: float = 2.0  # asha: keep the best 1/reduction_factor at each rung
    algo: str = "random"  # asha: random sampling, or optuna (Optuna's TPE through Ray Tune, seeded by search.seed)
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
    reuse_actors: bool = True  # a live worker runs the next trial (or a PBT exploit's restart): no new process
    resume: bool = False  # continue an interrupted search (Tuner.restore)
    retrain: bool = False  # retrain on the whole training split with the best weights, evaluate on test
    metric: str = "auto"  # what ranks the trials, in its direction: any val metric; auto as checkpoint.monitor
    seed: int = 0


def split_overrides(overrides: list[str], section: str, name_key: bool = False) -> tuple[list[str], list[str]]:
    """(the section's own overrides, the training ones): `SECTION.key=v` becomes `key=v`, `resume=` is the section's,
    and with name_key `SECTION=v` becomes `name=v`."""
    mine, rest = [], []
    for o in overrides:
        key, _, value = o.partition("=")
        if name_key and key == section:
            mine.append(f"name={value}")
        elif key.startswith(section + "."):
            mine.append(o[len(section) + 1 :])
        elif key == "resume":
            mine.append(o)
        else:
            rest.append(o)
    return mine, rest


def compose_search(exp: str, overrides: list[str]) -> tuple[SearchConfig, list[str]]:
    """Split `search.*`/`search=`/`resume=` overrides from the training ones; validate the search config."""
    mine, rest = split_overrides(overrides, "search", name_key=True)
    schema = OmegaConf.structured(SearchConfig)
    OmegaConf.set_struct(schema, True)
    OmegaConf.set_struct(schema.space, False)  # its keys are config keys, checked against the experiment later
    try:
        scfg = SearchConfig(**OmegaConf.to_container(OmegaConf.merge(schema, OmegaConf.from_dotlist(mine))))
    except Exception as e:
        msg = str(e).splitlines()[0]
        raise MTLError(
            f"Bad search config {mine}: {msg}. Valid keys: search.{', search.'.join(asdict(SearchConfig()))}."
        ) from None
    if scfg.name not in NAMES:
        raise MTLError(f"Unknown search={scfg.name!r}. Valid choices: {', '.join(NAMES)}.")
    if scfg.algo not in ALGOS:
        raise MTLError(f"Unknown search.algo={scfg.algo!r}. Valid choices: {', '.join(ALGOS)}.")
    if scfg.algo != "random" and scfg.name != "asha":
        raise MTLError(
            f"search.algo={scfg.algo} proposes the trials of search=asha; search={scfg.name} makes its own "
            "(PBT/PB2 explore from the population, a grid is a grid)."
        )
    if scfg.name == "asha" and (scfg.trials < 1 or scfg.grace_period < 1 or scfg.reduction_factor <= 1):
        raise MTLError(
            f"search=asha needs search.trials >= 1 (got {scfg.trials}), search.grace_period >= 1 epoch (got "
            f"{scfg.grace_period}) and search.reduction_factor > 1 (got {scfg.reduction_factor})."
        )
    if scfg.backend not in ("ray", "population"):
        raise MTLError(f"Unknown search.backend={scfg.backend!r}. Valid choices: ray, population.")
    if scfg.backend == "population":
        from .population import check_backend

        check_backend(scfg)
    if scfg.name in ("pbt", "pb2") and scfg.population < 2:
        raise MTLError(f"search.population={scfg.population}: population-based training needs at least 2 trials.")
    if not 0 < scfg.train_fraction < 1:
        raise MTLError(f"search.train_fraction={scfg.train_fraction} must be within (0, 1): the rest ranks trials.")
    if scfg.name == "grid" and (scfg.space or not scfg.weights):
        raise MTLError("search=grid sweeps the weight p of two tasks; a search.space needs search=asha, pbt or pb2.")
    if scfg.backend == "population" and (scfg.space or not scfg.weights or scfg.name == "asha"):
        raise MTLError(
            "search.backend=population trains the trials as members of one model, which share every option but "
            "their weights: search.space, search.weights=false and search=asha need search.backend=ray."
        )
    given = [o for o in rest if o.split("=", 1)[0].split(".")[0] == "weighting"]
    if given and scfg.weights:  # every trial trains fixed weights (the ones searched): the user's would be overridden
        raise MTLError(
            f"search={scfg.name} searches fixed scalarization weights, one vector per trial, so {', '.join(given)} "
            "cannot apply to its trials: drop it, or search that method's options with search.weights=false and a "
            "search.space (a study compares methods: python -m experiments.study)."
        )
    cfg = compose(exp, rest)  # fail now, not inside a trial, on a bad training override
    if scfg.name in ("pbt", "pb2") and scfg.backend == "ray":  # (a population's PBT says it when it starts)
        warn_no_perturbation(cfg.trainer.max_epochs, scfg.perturbation_interval, "search.perturbation_interval")
    if scfg.name == "asha" and scfg.grace_period > cfg.trainer.max_epochs:
        raise MTLError(
            f"search.grace_period={scfg.grace_period} exceeds trainer.max_epochs={cfg.trainer.max_epochs}: ASHA lets "
            "every trial train its grace period before it may stop one, so it must fit in the run. Lower "
            f"search.grace_period to at most {cfg.trainer.max_epochs}, or raise trainer.max_epochs."
        )
    dm_tasks, has_delta = create_datamodule(cfg.data).tasks, bool(cfg.delta_m.runs or cfg.delta_m.base)
    if scfg.metric == "auto":
        scfg.metric = default_monitor(dm_tasks, has_delta)
    higher_is_better(scfg.metric, dm_tasks, delta_flag(cfg, has_delta), "search.metric")  # an unknown one: clear
    tasks = [t.name for t in dm_tasks]
    if scfg.name == "grid" and len(tasks) != 2:
        raise MTLError(
            f"search=grid sweeps p over two tasks (p, 1-p); data has {len(tasks)} tasks {tasks}: use data.tasks=[a,b] "
            "or search=pbt."
        )
    if len(tasks) < 2 and scfg.weights:
        raise MTLError(
            f"search={scfg.name} searches task weights, which needs at least 2 tasks; data has {tasks} (search a "
            "single task's options with search.weights=false and a search.space)."
        )
    if not scfg.weights and not scfg.space:
        raise MTLError("search.weights=false leaves nothing to search: give a search.space (e.g. optim.lr).")
    fixed = ["weighting=fixed", f"weighting.weights=[{','.join(['1'] * len(tasks))}]"] if scfg.weights else []
    method_keys = [k for k in flat_space(scfg.space) if k.startswith("weighting.")]
    if scfg.weights and method_keys:
        raise MTLError(
            f"search.space keys {method_keys} are a method's options, but the trials train the searched weights "
            "(weighting=fixed): set search.weights=false and the method (weighting=NAME)."
        )
    dists = check_space(scfg.space, exp, [*rest, *fixed])
    if scfg.search_lr and "optim.lr" in dists:
        raise MTLError("search.search_lr and search.space.optim.lr both search the learning rate: keep one.")
    if scfg.name == "pb2" and any(d.form == "choice" for d in dists.values()):
        raise MTLError("search=pb2 fits a Gaussian process over ranges: a list of choices needs search=pbt or asha.")
    return scfg, rest
