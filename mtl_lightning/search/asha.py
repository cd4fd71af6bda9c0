"""ASHA (Li et al. 2020, arXiv:1810.05934): `search.trials` configurations, each trained epoch by epoch, the worst
stopped at every rung (after `grace_period`, then every x`reduction_factor` epochs, only the best 1/reduction_factor
go on), so a budget of trials costs about as much as a few full runs. The configurations are drawn at random, or
proposed by Optuna's TPE (`search.algo=optuna`, Bergstra et al. 2011) through Ray Tune's `OptunaSearch`, seeded by
`search.seed`. The space: `search.space` (any key) and, with `search.weights`, the task weights as PBT draws them.
"""

from __future__ import annotations

from ..errors import MTLError
from .trial import trial_dirname


def optuna_searcher(seed: int):
    """Optuna's TPE sampler (seeded), as a Ray Tune searcher; a missing extra is one paragraph."""
    try:
        import optuna
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise MTLError(
            'search.algo=optuna needs Optuna, which is not installed: pip install -e ".[tune]" (in .[dev] already).'
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study and trial on the console
    return OptunaSearch(sampler=TPESampler(seed=seed))


def _asha_space(scfg, cfg, tasks, base, dists):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = dict(base)
    if scfg.weights:
        space.update({f"w{k}": tune.uniform(scfg.weight_low, 1.0) for k in range(len(tasks))})
    if scfg.search_lr:
        space["lr"] = tune.loguniform(*scfg.lr_bounds)
    if dists:
        space["params"] = {k: d.tune() for k, d in dists.items()}
    sched = ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(1, int(cfg.trainer.max_epochs)),
        grace_period=scfg.grace_period,
        reduction_factor=scfg.reduction_factor,
    )
    search_alg = optuna_searcher(scfg.seed) if scfg.algo == "optuna" else None
    tc = tune.TuneConfig(
        metric="score",
        mode="max",
        trial_dirname_creator=trial_dirname,
        scheduler=sched,
        num_samples=scfg.trials,
        search_alg=search_alg,
        reuse_actors=scfg.reuse_actors,
    )
    return space, tc


def _asha_report(results, scfg, tasks, path) -> dict:
    # the best of the trials that trained to the end: a trial stopped at a rung has an earlier epoch's value
    done = [r for r in results if r.metrics and r.metrics.get("score") == r.metrics.get("score")]
    longest = max(int(r.metrics["training_iteration"]) for r in done)
    best = max((r for r in done if int(r.metrics["training_iteration"]) == longest), key=lambda r: r.metrics["score"])
    out = {"best_trial": best.path.rstrip("/").split("/")[-1], "best_value": float(best.metrics[scfg.metric])}
    out["best_params"] = dict(best.config.get("params", {}))
    if scfg.weights:
        w = [best.config[f"w{k}"] for k in range(len(tasks))]
        out["best_weights"] = [x / sum(w) for x in w]
    if best.config.get("lr") is not None:
        out["best_params"]["optim.lr"] = best.config["lr"]
    return out
