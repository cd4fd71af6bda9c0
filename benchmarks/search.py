"""PBT and PB2 against a grid sweep on the synthetic mixture whose best weights are known, in one run.

Two generated domains drawn as a sampled mixture (`data.mixing=sample`); domain1's training labels are noise, so
every batch slot spent on it is wasted and the best sampling weights put everything on domain0 (p = 1). The grid
trains one trial per p in {0, 0.1, ..., 1}; PBT and PB2 a population of 4 started at p = 0.1, 0.3, 0.7, 0.9
(perturbation every epoch). All rank on the held-out 30% of the training split. Reported: the best rank-split mean
accuracy each reaches, the best trial's final weight on domain0, the population's mean final weight on domain0
(started at 0.5), and the compute spent in trial-epochs. Then the same PBT search's wall time with each exploit
restarting the trial in its live worker (`search.reuse_actors=true`, the default) against a fresh worker process.
Usage:
    python benchmarks/search.py [--epochs 6] [key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from mtl_lightning.search import compose_search, run_search
from mtl_lightning.search.ray_session import ray_session

DATA = ["data.num_tasks=2", "data.sizes=null", "data.label_noise=[0,1.0]", "data.train_size=3000"]
DATA += ["data.num_classes=2", "data.latent_dim=8"]
START = "search.initial=[[0.1,0.9],[0.3,0.7],[0.7,0.3],[0.9,0.1]]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    a = p.parse_args()
    start, size = START, 4
    if a.smoke:  # two trials of one epoch on little data, a one-point grid
        a.epochs, start, size = 1, "search.initial=[[0.3,0.7],[0.7,0.3]]", 2
        a.overrides += ["data.train_size=64", "data.val_size=32", "data.test_size=32", "search.grid=[0.5]"]
        a.overrides += ["model.depth=1", "model.width=16"]
    out = tempfile.mkdtemp()
    common = [*DATA, f"trainer.max_epochs={a.epochs}", f"out_dir={out}", "logger=csv", *a.overrides]
    population = [start, f"search.population={size}", "search.cpus_per_trial=0.5"]
    rows = []
    runs = [("grid", ["search.baselines=false"]), ("pbt", population), ("pb2", population)]
    if a.smoke:  # the script's two paths (a grid, a population search); PB2 is PBT's path with another scheduler
        runs = runs[:2]
    for reuse in () if a.smoke else ("true", "false"):  # the same search twice: not what a smoke run checks
        runs.append(("pbt", [*population, f"search.reuse_actors={reuse}", f"search.name_suffix=reuse-{reuse}"]))
    wall = []
    with ray_session(2 if a.smoke else None):  # one local Ray for every search: its start-up is in none of the times
        for name, extra in runs:
            scfg, rest = compose_search("synthetic_mdl", [f"search={name}", *extra, *common])
            t0 = time.perf_counter()
            r = run_search("synthetic_mdl", rest, scfg)
            wall.append(time.perf_counter() - t0)
            mean = r.get("final_weights_mean", [float("nan")])[0]
            rows.append((name, r["best_value"], r["best_weights"][0], mean, r["compute_trial_epochs"]))
    print("| search | best rank-split acc_mean | best trial's p (optimum 1) | population mean p | trial-epochs |")
    print("|---|---|---|---|---|")
    for name, acc, w0, mean, c in rows[:3]:
        print(f"| {name} | {acc:.4f} | {w0:.2f} | {mean:.2f} | {c} |")
    (_, ga, _, _, gc) = rows[0]
    for name, acc, _, _, c in rows[1:3]:
        print(f"\n{name.upper()} / grid: accuracy {acc / ga:.3f}, compute {c / gc:.2f}")
    if a.smoke:
        return
    reuse, fresh = wall[3:]
    print(f"\nPBT wall time, reused workers / fresh processes: {reuse:.0f} s / {fresh:.0f} s = {reuse / fresh:.2f}")


if __name__ == "__main__":
    main()
