"""PBT against a grid sweep on the synthetic mixture whose best weights are known, in one run.

Two tasks; task1's training labels are noise, so the best weights put everything on task0 (p = 1). The grid trains
one trial per p in {0, 0.1, ..., 1}; PBT trains a population of 4. Both rank on the held-out 30% of the training
split. Reported: the best rank-split mean accuracy each reaches, its weight on task0, and the compute it spent in
trial-epochs. Usage:
    python benchmarks/search.py [--epochs 6] [--population 4] [key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile

from mtl_lightning.search import compose_search, run_search


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--population", type=int, default=4)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    out = tempfile.mkdtemp()
    data = ["data.num_tasks=2", "data.label_noise=[0,1.0]", "data.train_size=1000", "data.batch_size=128"]
    common = [*data, f"trainer.max_epochs={a.epochs}", "optim.lr=3e-3", f"out_dir={out}", "logger=csv", *a.overrides]
    rows = []
    for name, extra in (("grid", ["search.baselines=false"]), ("pbt", [f"search.population={a.population}"])):
        scfg, rest = compose_search("synthetic_mtl", [f"search={name}", *extra, *common])
        r = run_search("synthetic_mtl", rest, scfg)
        rows.append((name, r["best_acc"], r["best_weights"][0], r["compute_trial_epochs"]))
    print("| search | best rank-split acc_mean | its weight on task0 (optimum 1) | compute (trial-epochs) |")
    print("|---|---|---|---|")
    for name, acc, w0, c in rows:
        print(f"| {name} | {acc:.4f} | {w0:.2f} | {c} |")
    (g, ga, _, gc), (_, pa, _, pc) = rows
    print(f"\nPBT / grid: accuracy {pa / ga:.3f}, compute {pc / gc:.2f}")


if __name__ == "__main__":
    main()
