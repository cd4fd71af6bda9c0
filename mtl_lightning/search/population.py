"""`search.backend=population`: a weight grid or a PBT population trained as vectorised populations
(`mtl_lightning.population`) instead of one Ray trial per weight vector, with the same tables and plots.

Grid: one population per capacity, its members the grid's p values and, with `search.baselines`, one single-task
member per task (one-hot weights: the backbone and that task's head train as a single-task run's would; only that
task is reported). One capacity trains in this process; several are Ray trials, one population each, so several
GPUs and RAY_ADDRESS clusters keep working. PBT: one population, exploit and explore in process
(`population.PopulationPBT`), ranked on the rank split.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..config import compose
from ..console import say
from ..errors import MTLError
from ..train import train
from .budget import budget_overrides, equal_steps
from .grid import grid_row, write_grid_report
from .pbt import _plot_schedule


def _weights_arg(rows: list[list[float]]) -> str:
    return "population.weights=[" + ",".join("[" + ",".join(f"{w:.6g}" for w in r) + "]" for r in rows) + "]"


def check_backend(scfg) -> None:
    if scfg.name == "pb2":
        raise MTLError(
            "search=pb2 fits Ray Tune's Gaussian-process bandit over trials; it has no in-process form. Use "
            "search=pbt or search=grid with search.backend=population, or search.backend=ray for PB2."
        )
    if scfg.search_lr:
        raise MTLError(
            "search.search_lr gives each trial its own learning rate; a population's members share one optimiser "
            "schedule. Use search.backend=ray to search the learning rate."
        )


def grid_members(grid: list[float], tasks: list[str], baselines: bool) -> list[tuple[str, object, list[float]]]:
    """(kind, value, weights) per member: the mixtures p, then a one-hot member per task."""
    members = [("mix", p, [p, 1 - p]) for p in grid]
    if baselines:
        members += [("single", t, [1.0 if k == i else 0.0 for k in range(len(tasks))]) for i, t in enumerate(tasks)]
    return members


def run_population_grid(exp: str, overrides: list[str], scfg, cfg, tasks: list[str], path: Path) -> dict:
    caps = [list(c) for c in scfg.capacities] or [[cfg.model.depth, cfg.model.width]]
    members = grid_members(list(scfg.grid), tasks, scfg.baselines)
    steps = equal_steps(compose(exp, overrides))
    common = [*overrides, *budget_overrides(steps), "test=false", _weights_arg([m[2] for m in members])]
    common += ["population.normalize=false"]  # the grid's weights are on the simplex already (one-hot members too)
    jobs = {
        tuple(c): [*common, *([f"model.depth={c[0]}", f"model.width={c[1]}"] if c[0] is not None else [])] for c in caps
    }
    named = {f"population-{c[0]}x{c[1]}": over for c, over in jobs.items()}
    say(
        f"the grid: {len(members)} members ({len(scfg.grid)} weights, {len(members) - len(scfg.grid)} single-task) "
        f"as {len(named)} population(s), {steps} steps each"
    )
    done = run_populations(exp, named, path / "runs", scfg.num_cpus, scfg.cpus_per_trial, scfg.gpus_per_trial)
    results = {c: done[f"population-{c[0]}x{c[1]}"] for c in jobs}
    rows = []
    for (depth, width), metrics in results.items():
        for i, (kind, value, _) in enumerate(members):
            rows.append(grid_row(kind, value, depth, width, {**metrics, "step": steps}, f"/m{i}", tasks))
    out = write_grid_report(rows, tasks, path)
    out["compute_trial_epochs"] = len(members) * len(caps) * max(1, cfg.trainer.max_epochs)
    out["steps_per_trial"] = steps
    return out


def run_populations(
    exp: str,
    jobs: dict[str, list[str]],
    out_dir: Path,
    num_cpus,
    cpus_per_trial: float,
    gpus_per_trial: float,
    quiet: bool = False,
) -> dict[str, dict]:
    """Train each population of `jobs` (run name -> overrides) under `out_dir`; their final metrics by name. One
    trains in this process; several are Ray trials, one population each (several GPUs, or a RAY_ADDRESS cluster).
    `quiet`: Ray's own console lines only on errors."""
    if len(jobs) == 1:
        ((name, over),) = jobs.items()
        return {name: train(compose(exp, [*over, f"out_dir={out_dir}", f"run_name={name}"]))}
    import torch
    from ray import tune

    from .ray_session import ray_session

    def population_trial(config: dict) -> None:
        m = train(compose(exp, [*config["overrides"], f"out_dir={out_dir}", f"run_name={config['name']}"]))
        tune.report({k: v for k, v in m.items() if k.startswith(("val/", "test/"))})

    gpus = gpus_per_trial if gpus_per_trial >= 0 else float(torch.cuda.is_available())
    space = {"job": tune.grid_search([{"name": n, "overrides": o} for n, o in jobs.items()])}
    trainable = tune.with_resources(
        lambda config: population_trial(config["job"]), {"cpu": cpus_per_trial, "gpu": gpus}
    )
    run_config = tune.RunConfig(name="populations", storage_path=str(out_dir.parent / "tune"), verbose=0)
    with ray_session(num_cpus, quiet, compose(exp, next(iter(jobs.values()))).plugins):
        results = tune.Tuner(trainable, param_space=space, run_config=run_config).fit()
    out = {}
    for r in results:
        if r.error:
            raise MTLError(f"A population failed: {str(r.error).splitlines()[0]}. Logs: {out_dir.parent / 'tune'}")
        out[r.config["job"]["name"]] = r.metrics
    return out


def run_population_pbt(exp: str, overrides: list[str], scfg, cfg, tasks: list[str], path: Path, sign: float) -> dict:
    K, n = len(tasks), scfg.population
    rng = random.Random(scfg.seed)  # the initial population, as Tune samples uniform(weight_low, 1) per weight
    raw = [list(v) for v in scfg.initial or []]
    if any(len(v) != K or min(v) <= 0 for v in raw) or len(raw) > n:
        raise MTLError(f"search.initial needs at most {n} vectors of {K} positive weights (tasks {tasks}).")
    raw += [[rng.uniform(scfg.weight_low, 1.0) for _ in range(K)] for _ in range(n - len(raw))]
    first = [[x / sum(v) for x in v] for v in raw]
    pbt = [
        "population.pbt=true",
        f"population.metric={scfg.metric}",
        f"population.perturbation_interval={scfg.perturbation_interval}",
        f"population.quantile_fraction={scfg.quantile_fraction}",
        f"population.resample_probability={scfg.resample_probability}",
        f"population.weight_low={scfg.weight_low}",
        f"population.pbt_seed={scfg.seed}",
    ]
    over = [*overrides, _weights_arg(raw), *pbt, "test=false", f"out_dir={path / 'runs'}", "run_name=population"]
    say(f"PBT: {n} members as one population, perturbed every {scfg.perturbation_interval} epoch(s)")
    metrics = train(compose(exp, over))
    run_dir = Path(metrics["run_dir"])
    state = _pbt_state(run_dir)
    scores = [metrics[f"{scfg.metric}/m{i}"] for i in range(n)]
    best = max(range(n), key=lambda i: sign * scores[i])
    schedule = state["schedules"][best]
    with open(path / "best_schedule.csv", "w") as f:
        f.write("epoch," + ",".join(tasks) + "\n")
        f.writelines(",".join(str(x) for x in row) + "\n" for row in schedule)
    _plot_schedule(schedule, tasks, path / "best_schedule.png")
    (path / "pbt_exploits.json").write_text(json.dumps(state["exploits"], indent=1))
    last = json.loads((run_dir / "members.json").read_text())
    final = [m["weights"] for m in last]
    return {
        "best_trial": f"member {best}",
        "best_value": float(scores[best]),
        "best_weights": schedule[-1][1:],
        "schedule": schedule,
        "initial_weights_mean": [sum(w[k] for w in first) / n for k in range(K)],
        "final_weights_mean": [sum(w[k] for w in final) / n for k in range(K)],
        "compute_trial_epochs": n * cfg.trainer.max_epochs,
        "exploits": len(state["exploits"]),
    }


def _pbt_state(run_dir: Path) -> dict:
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["callbacks"]["PopulationPBT"]
