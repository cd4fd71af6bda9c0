"""Wall-clock per step and peak memory of ForkMerge relative to joint training, 2 and 4 branches.

The synthetic mixture with 4 tasks (target task0), the same ViT and batch as benchmarks/methods.py; joint training is
`weighting=uniform`. ForkMerge's figures include its merges (one every `--interval` steps, each scoring the grid on
`weighting.val_batches` validation batches), averaged over the timed steps.

`--whole` times whole runs instead, at the reference's NYUv2 setting (200 epochs, a merge every 10, pruning 10
epochs per auxiliary, validation a quarter the size of training: 159 / 636) with fewer epochs: `--epochs` of joint
training against ForkMerge with the pruned top-k branches [0, 1, 3], pruning `--epochs`/20 epochs per auxiliary,
merging every 10 epochs with best-of-round scoring; it reports the pruning phase, the merges and the best-of-round
scoring as shares of the run. Usage:
    python benchmarks/forkmerge.py [--steps 20] [--warmup 2] [--interval 10] [key=value ...]
    python benchmarks/forkmerge.py --whole [--epochs 20] [key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict

from methods import low_level_malloc, timed_run

import mtl_lightning.train as T
from mtl_lightning.config import compose
from mtl_lightning.forkmerge import ForkMerge


def timed(spent: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - t0

    return wrapper


def whole(a) -> None:
    spent = defaultdict(float)
    T.rank_auxiliaries = timed(spent, "pruning", T.rank_auxiliaries)  # as train.py calls it
    ForkMerge.merge = timed(spent, "merge", ForkMerge.merge)
    ForkMerge.track = timed(spent, "best-of-round scoring", ForkMerge.track)
    E = a.epochs
    base = ["data.num_tasks=4", "model.depth=4", "model.width=128", "data.img_size=8", "data.batch_size=64"]
    base += ["data.train_size=1024", "data.val_size=256", f"trainer.max_epochs={E}"]  # val = train / 4, as NYUv2
    base += ["trainer.enable_progress_bar=false", "test=false", "logger=csv", *a.overrides]
    fm = ["weighting=forkmerge", "weighting.target=[task0]", "weighting.topk=[0,1,3]"]
    fm += [f"weighting.pruning_epochs={max(1, E // 20)}", "weighting.interval_epochs=10"]
    runs = {}
    for name, extra in [("joint (uniform)", ["weighting=uniform"]), ("ForkMerge, top-k [0, 1, 3]", fm)]:
        spent.clear()
        t0 = time.perf_counter()
        T.train(compose("synthetic_mtl", [f"out_dir={tempfile.mkdtemp()}", *base, *extra]))
        runs[name] = (time.perf_counter() - t0, dict(spent))
    joint = runs["joint (uniform)"][0]
    print("| run | wall-clock s | vs joint | pruning | merges | best-of-round scoring |")
    print("|---|---|---|---|---|---|")
    for name, (t, parts) in runs.items():
        shares = [
            f"{parts.get(k, 0) / joint:.2f}× joint ({parts.get(k, 0) / t:.0%})"
            for k in ("pruning", "merge", "best-of-round scoring")
        ]
        print(f"| {name} | {t:.1f} | {t / joint:.2f}× | " + " | ".join(shares) + " |", flush=True)


def main() -> None:
    low_level_malloc()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--whole", action="store_true")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    a = p.parse_args()
    if a.smoke:  # a tiny model, a merge every step, one timed step; --whole: one epoch of little data
        a.steps, a.warmup, a.interval, a.epochs = 1, 1, 1, 1
        a.overrides += [
            "model.depth=1",
            "model.width=16",
            "data.train_size=64",
            "data.val_size=32",
            "data.batch_size=16",
        ]
    if a.whole:
        return whole(a)
    base = ["data.num_tasks=4", "model.depth=4", "model.width=128", "data.img_size=8", "data.batch_size=64"]
    base += ["data.train_size=4096", *a.overrides]
    fm = ["weighting=forkmerge", "weighting.target=[task0]", f"weighting.interval_steps={a.interval}"]
    fm += ["weighting.val_batches=2"]
    rows = [
        ("joint (uniform)", ["weighting=uniform"]),
        ("ForkMerge, 2 branches", fm),
        ("ForkMerge, 4 branches (one per auxiliary task)", [*fm, "weighting.per_auxiliary=true"]),
        ("ForkMerge, 2 branches, offload=true", [*fm, "weighting.offload=true"]),
        ("ForkMerge, 4 branches, offload=true", [*fm, "weighting.per_auxiliary=true", "weighting.offload=true"]),
    ]
    timed_run("synthetic_mtl", [*base, *fm], 1, 1)  # warm-up: one-off initialisation stays out of the figures
    print("| run | s/step | peak MiB | time vs joint | memory vs joint |")
    print("|---|---|---|---|---|")
    ref = None
    for name, extra in rows:
        t, m = timed_run("synthetic_mtl", [*base, *extra], a.warmup, a.steps)
        ref = ref or (t, m)
        # max(.., 1): a tiny run can allocate nothing new on top of the warm-up (a 0 MiB reference)
        print(f"| {name} | {t:.3f} | {m:.0f} | {t / ref[0]:.2f}× | {m / max(ref[1], 1):.2f}× |", flush=True)


if __name__ == "__main__":
    main()
