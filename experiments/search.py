"""Search the scalarization weights of an experiment with Ray Tune.

    python -m experiments.search exp=synthetic_mtl search=pbt search.population=8 trainer.max_epochs=20
    python -m experiments.search exp=digits_mtl search=grid search.capacities=[[3,32],[3,64]]
    python -m experiments.search exp=celeba_mtl search=pb2 ... resume=true      # continue an interrupted search
    python -m experiments.search exp=digits_mtl search=asha search.trials=16 search.weights=false \
        weighting=cagrad search.space.weighting.c='uniform(0.1,0.9)' search.space.optim.lr='loguniform(1e-4,1e-2)'

`search.*` keys are in mtl_lightning/search/config.py (SearchConfig); every other key=value configures the trials as in
`experiments.run`. With RAY_ADDRESS set, the trials run on that Ray cluster (search.storage_path must then be on
storage every node shares). Prints a summary; outputs go to <out_dir>/search/<exp>-<search>/. `--check` checks the
search and a trial's config (keys, data, weighting, network, the search space) and stops before Ray starts.
"""

from __future__ import annotations

import sys

from mtl_lightning.errors import MTLError
from mtl_lightning.search import compose_search, run_search


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    exps = [a.split("=", 1)[1] for a in argv if a.startswith("exp=")]
    try:
        if len(exps) != 1:
            raise MTLError("give exactly one exp=NAME (python -m experiments.run --list lists them).")
        unknown = [a for a in argv if a.startswith("--") and a != "--check"]
        if unknown:
            raise MTLError(f"unknown option {unknown[0]}. Options: --check, --help.")
        scfg, overrides = compose_search(exps[0], [a for a in argv if not a.startswith(("exp=", "--"))])
        if "--check" in argv:
            out = run_search(exps[0], overrides, scfg, check_only=True)
            print(f"check passed: search {scfg.name} of {exps[0]}, nothing started ({out['search_dir']})")
            return 0
        out = run_search(exps[0], overrides, scfg)
    except MTLError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    print(f"\nsearch: {scfg.name}, results in {out['search_dir']}")
    print(f"best trial: {out['best_trial']}")
    metric = "val/acc_mean" if scfg.name == "grid" else scfg.metric
    print(f"best validation (rank split) {metric}: {out['best_value']:.4f}")
    if out.get("best_weights"):
        print(f"best weights: {[round(w, 4) for w in out['best_weights']]}")
    if out.get("best_params"):
        print(
            "best options: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in out["best_params"].items())
        )
    record = out.get("trials_record") or {}
    if record:
        print(f"{record['trials']} trials, {record['stopped_early']} stopped early: trials.csv, trials.png")
    if "final_weights_mean" in out:
        start, end = ([round(w, 4) for w in out[k]] for k in ("initial_weights_mean", "final_weights_mean"))
        print(f"population mean weights: {start} at the start, {end} at the end")
    for k, v in out.items():
        if k.startswith("retrain/"):
            print(f"{k}: {v:.4f}")
    print(f"compute: {out['compute_trial_epochs']} trial-epochs")
    if "steps_per_trial" in out:
        print(f"every trial, single-task baselines included, trained {out['steps_per_trial']} optimiser steps")
    if out["failed_trials"]:
        print(f"{len(out['failed_trials'])} trial(s) failed; the first: {out['failed_trials'][0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
