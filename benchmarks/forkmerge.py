"""Wall-clock per step and peak memory of ForkMerge relative to joint training, 2 and 4 branches.

The synthetic mixture with 4 tasks (target task0), the same ViT and batch as benchmarks/methods.py; joint training is
`weighting=uniform`. ForkMerge's figures include its merges (one every `--interval` steps, each scoring the grid on
`weighting.val_batches` validation batches), averaged over the timed steps. Usage:
    python benchmarks/forkmerge.py [--steps 20] [--warmup 2] [--interval 10] [key=value ...]
"""

from __future__ import annotations

import argparse

from methods import low_level_malloc, timed_run


def main() -> None:
    low_level_malloc()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
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
        print(f"| {name} | {t:.3f} | {m:.0f} | {t / ref[0]:.2f}× | {m / ref[1]:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
