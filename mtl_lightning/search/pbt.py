"""PBT and PB2 (Ray Tune's schedulers) over the K task weights, and what they report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from ..errors import MTLError
from .plots import _pyplot
from .trial import _config_weights, trial_dirname


def _explore(config: dict) -> dict:
    """Rescale the raw weights so the largest is 1: same normalised weights, raw values kept in bounds."""
    ks = sorted(k for k in config if k[:1] == "w" and k[1:].isdigit())
    if not ks:  # search.weights=false: nothing to rescale
        return config
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


def _pbt_space(scfg, cfg, tasks, base, dists):
    from ray import tune

    from .schedulers import PB2, PBT

    K = len(tasks) if scfg.weights else 0
    space = {**base, **{f"w{k}": tune.uniform(scfg.weight_low, 1.0) for k in range(K)}}
    bounds = {f"w{k}": [scfg.weight_low, 1.0] for k in range(K)}
    mutations = {k: tune.uniform(*b) for k, b in bounds.items()}
    if scfg.search_lr:
        space["lr"] = tune.loguniform(*scfg.lr_bounds)
        bounds["lr"] = list(scfg.lr_bounds)
        mutations["lr"] = tune.uniform(*scfg.lr_bounds)
    if dists:  # search.space: PBT mutates (or resamples) every key, PB2 fits them as continuous ranges
        space["params"] = {k: d.tune() for k, d in dists.items()}
        mutations["params"] = dict(space["params"])
        bounds["params"] = {k: d.bounds() for k, d in dists.items()}
    last = int(cfg.trainer.max_epochs)  # no exploit at the last epoch (schedulers.py)
    if scfg.name == "pbt":
        sched = PBT(
            last_epoch=last,
            time_attr="training_iteration",
            perturbation_interval=scfg.perturbation_interval,
            hyperparam_mutations=mutations,
            quantile_fraction=scfg.quantile_fraction,
            resample_probability=scfg.resample_probability,
            custom_explore_fn=_explore,
        )
    else:
        sched = PB2(
            last_epoch=last,
            time_attr="training_iteration",
            perturbation_interval=scfg.perturbation_interval,
            hyperparam_bounds=bounds,
            quantile_fraction=scfg.quantile_fraction,
        )
    points = None
    if scfg.initial and not scfg.weights:
        raise MTLError("search.initial gives starting weight vectors; search.weights=false searches none.")
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
    tc.trial_dirname_creator = trial_dirname  # named by what varies
    return space, tc


def _pbt_report(results, scfg, tasks, path: Path) -> dict:
    best = results.get_best_result(metric="score", mode="max", scope="last")
    out = {
        "best_trial": Path(best.path).name,
        "best_value": float(best.metrics[scfg.metric]),
        "best_params": dict(best.config.get("params", {})),
    }
    if not scfg.weights:
        return out
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
        **out,
        "best_weights": schedule[-1][1:],
        "schedule": schedule,
        "initial_weights_mean": initial_mean,
        "final_weights_mean": final_mean,
    }


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
