"""The search's driver: the Tuner (in a `ray_session`), the summary."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..config import compose
from ..data import create_datamodule
from ..errors import MTLError
from ..model import default_monitor, higher_is_better
from ..tasks.delta_m import delta_flag
from ..train import train
from .asha import _asha_report, _asha_space
from .budget import budget_overrides, equal_steps
from .config import SearchConfig
from .grid import _grid_report, _grid_space
from .pbt import _initial_weights_callback, _pbt_report, _pbt_space
from .ray_session import quiet_tune, ray_session
from .space import check_space
from .trial import trial
from .trials import write_trials


def run_search(
    exp: str, overrides: list[str], scfg: SearchConfig, quiet: bool = False, check_only: bool = False
) -> dict:
    """Run the search; `quiet` (a study's search row) sends each trial's output to its run directory's console.log.
    `check_only` (`--check`) stops once the search and a trial's config have been checked: nothing starts."""
    from ray import tune

    quiet_tune()
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
        "sign": 1.0 if higher_is_better(scfg.metric, dm.tasks, delta_flag(cfg, has_delta), "search.metric") else -1.0,
        "runs_dir": str(storage / name / "runs"),  # every trial's run directory: runs/<exp>/<trial id>
        "quiet": quiet,
    }
    path = storage / name
    # a search of the weights trains fixed weights (each trial its own): what the space and a trial compose with
    fixed = ["weighting=fixed", f"weighting.weights=[{','.join(['1'] * K)}]"] if scfg.weights else []
    if check_only:  # a trial's data, weighting and network, as a trial builds them
        from ..train import build

        build(compose(exp, [*base["overrides"], *fixed]))
        if scfg.backend != "population":
            check_space(scfg.space, exp, [*overrides, *fixed])
        return {"search_dir": str(path)}
    if scfg.backend == "population":
        return _population_search(exp, base["overrides"], scfg, cfg, tasks, path, base["sign"])
    gpus = scfg.gpus_per_trial if scfg.gpus_per_trial >= 0 else float(torch.cuda.is_available())
    trainable = tune.with_resources(trial, {"cpu": scfg.cpus_per_trial, "gpu": gpus})
    run_config = tune.RunConfig(
        name=name,
        storage_path=str(storage),
        failure_config=tune.FailureConfig(max_failures=scfg.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=4),  # PBT donors need theirs kept
        callbacks=[_initial_weights_callback(storage / name / "initial_weights.json")],
        verbose=0,
    )
    dists = check_space(scfg.space, exp, [*overrides, *fixed])
    if scfg.name == "grid":  # equal budgets: the baselines train as many steps as the mixtures
        base["steps"] = equal_steps(compose(exp, base["overrides"]))
        base["overrides"] += budget_overrides(base["steps"])
        param_space, tune_config = _grid_space(scfg, cfg, tasks, base)
    elif scfg.name == "asha":
        param_space, tune_config = _asha_space(scfg, cfg, tasks, base, dists)
    else:
        param_space, tune_config = _pbt_space(scfg, cfg, tasks, base, dists)
    if scfg.resume:
        if not tune.Tuner.can_restore(str(path)):
            raise MTLError(f"search.resume=true found no search to continue in {path}; start it without resume.")
    elif path.exists():
        raise MTLError(f"{path} holds a search already: continue it with resume=true, or set search.name_suffix.")
    with ray_session(scfg.num_cpus, quiet, cfg.plugins):
        if scfg.resume:
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
        results = tuner.fit()
        errors = [str(r.error).splitlines()[0] for r in results if r.error]
        if errors and len(errors) == len(results):
            raise MTLError(f"Every trial failed; the first error: {errors[0]}. Logs: {path}")
        report = {"grid": _grid_report, "asha": _asha_report}.get(scfg.name, _pbt_report)
        out = report(results, scfg, tasks, path)
        if scfg.name != "grid":  # what each trial tried, how far it trained, and the metric against each key
            out["trials_record"] = write_trials(results, tasks, scfg.metric, base["sign"], cfg.trainer.max_epochs, path)
    out["failed_trials"] = errors
    out["compute_trial_epochs"] = sum(int(r.metrics.get("training_iteration", 0)) for r in results if r.metrics)
    out["search_dir"] = str(path)
    if "steps" in base:
        out["steps_per_trial"] = base["steps"]
    return _retrain(exp, overrides, scfg, out)


def _population_search(exp, overrides, scfg, cfg, tasks, path: Path, sign: float) -> dict:
    """search.backend=population: the grid or PBT as vectorised populations (search/population.py)."""
    from .population import run_population_grid, run_population_pbt

    if path.exists() and not scfg.resume:
        raise MTLError(f"{path} holds a search already: set search.name_suffix, or remove it.")
    if scfg.resume:
        raise MTLError(
            "search.resume=true restores Ray Tune trials; search.backend=population has none to restore: start it "
            "again (search.name_suffix=NEW)."
        )
    path.mkdir(parents=True)
    if scfg.name == "grid":
        out = run_population_grid(exp, overrides, scfg, cfg, tasks, path)
    else:
        out = run_population_pbt(exp, overrides, scfg, cfg, tasks, path, sign)
    out.update(failed_trials=[], search_dir=str(path))
    return _retrain(exp, [o for o in overrides if not o.startswith("data.train_fraction=")], scfg, out)


def _retrain(exp: str, overrides: list[str], scfg, out: dict) -> dict:
    """search.retrain: the best configuration (weights and/or space values) on the whole training split, tested."""
    from .space import overrides_of

    found = overrides_of(out.get("best_params") or {})
    if out.get("best_weights"):
        found += ["weighting=fixed", f"weighting.weights=[{','.join(map(str, out['best_weights']))}]"]
    if scfg.retrain and found:
        final = train(compose(exp, [*overrides, *found, "test=true"]))
        out.update({f"retrain/{k}": v for k, v in final.items() if k.startswith("test/")})
    return out
