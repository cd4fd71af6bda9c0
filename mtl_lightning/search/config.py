"""The search's own settings (`search.*` on the command line), split from the training overrides and checked."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from omegaconf import OmegaConf

from ..checks import warn_no_perturbation
from ..config import compose
from ..data import create_datamodule
from ..errors import MTLError
from ..model import default_monitor, higher_is_better
from ..tasks.delta_m import delta_flag


@dataclass
class SearchConfig:
    name: str = "pbt"  # pbt | pb2 | grid
    backend: str = "ray"  # ray: a Ray Tune trial per weight vector; population: vectorised populations (grid, pbt)
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
    try:
        scfg = SearchConfig(**OmegaConf.to_container(OmegaConf.merge(schema, OmegaConf.from_dotlist(mine))))
    except Exception as e:
        msg = str(e).splitlines()[0]
        raise MTLError(
            f"Bad search config {mine}: {msg}. Valid keys: search.{', search.'.join(asdict(SearchConfig()))}."
        ) from None
    if scfg.name not in ("pbt", "pb2", "grid"):
        raise MTLError(f"Unknown search={scfg.name!r}. Valid choices: grid, pb2, pbt.")
    if scfg.backend not in ("ray", "population"):
        raise MTLError(f"Unknown search.backend={scfg.backend!r}. Valid choices: ray, population.")
    if scfg.backend == "population":
        from .population import check_backend

        check_backend(scfg)
    if scfg.name != "grid" and scfg.population < 2:
        raise MTLError(f"search.population={scfg.population}: population-based training needs at least 2 trials.")
    if not 0 < scfg.train_fraction < 1:
        raise MTLError(f"search.train_fraction={scfg.train_fraction} must be within (0, 1): the rest ranks trials.")
    given = [o for o in rest if o.split("=", 1)[0].split(".")[0] == "weighting"]
    if given:  # every trial trains fixed weights (the ones searched): a weighting of the user's would be overridden
        raise MTLError(
            f"search={scfg.name} searches fixed scalarization weights, one vector per trial, so {', '.join(given)} "
            "cannot apply to its trials: drop it (a study compares methods: python -m experiments.study)."
        )
    cfg = compose(exp, rest)  # fail now, not inside a trial, on a bad training override
    if scfg.name != "grid" and scfg.backend == "ray":  # (a population's PBT says it when it starts)
        warn_no_perturbation(cfg.trainer.max_epochs, scfg.perturbation_interval, "search.perturbation_interval")
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
    if len(tasks) < 2:
        raise MTLError(f"search={scfg.name} searches task weights, which needs at least 2 tasks; data has {tasks}.")
    return scfg, rest
