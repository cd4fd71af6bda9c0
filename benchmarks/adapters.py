"""Per-step time and peak memory of training a backbone in part against full fine-tuning (issue 39): linear probing
(`model.freeze_backbone=true`) and shared LoRA (`model.adapter=lora`, rank 8 in every block's attention and MLP), on a
ViT-S and a ViT-B (random weights: the cost does not depend on them) at 2 to 40 tasks, with uniform weights and with
a gradient method in `param` mode (PCGrad: K backward passes over the trainable shared parameters, which adapters
make small; at most 8 tasks, since full fine-tuning's Jacobian of a ViT-B at K=40 would need 14 GB). Ratios are
against full fine-tuning of the same ViT at the same K and method, measured in this run.
    python benchmarks/adapters.py [--tasks 2 8 40] [--steps 5] [--warmup 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import cell, low_level_malloc, timed_run  # noqa: E402

VITS = {"ViT-S": ["model.width=384", "model.depth=12"], "ViT-B": ["model.width=768", "model.depth=12"]}
MODES = {"full": [], "probe": ["model.freeze_backbone=true"], "lora": ["model.adapter=lora", "model.lora.rank=8"]}
METHODS = {"uniform": ["weighting=uniform"], "pcgrad": ["weighting=pcgrad", "weighting.mode=param"]}


def main() -> None:
    low_level_malloc()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 40])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.img_size=64")
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    a = p.parse_args()
    vits = VITS
    base = ["data.img_size=32", "model.patch_size=8", "data.batch_size=16", "data.train_size=512", *a.overrides]
    if a.smoke:  # one tiny ViT, one K, one timed step
        a.tasks, a.steps, a.warmup = [2], 1, 1
        vits = {"tiny": ["model.width=16", "model.depth=1"]}
        base += ["data.train_size=64"]
    print("| backbone | method | trained | " + " | ".join(f"K={k} time, mem" for k in a.tasks) + " |")
    print("|---|---|---|" + "---|" * len(a.tasks))
    warm = [*base, *next(iter(vits.values())), "data.num_tasks=2"]
    timed_run("synthetic_mtl", warm, a.warmup, a.steps)  # one-off initialisation stays out of the figures
    for vit, shape in vits.items():
        for method, m_over in METHODS.items():
            ref = {}
            for mode, over in MODES.items():
                if method == "pcgrad" and mode == "probe":
                    continue  # no trainable shared parameter: refused
                cells = []
                for K in a.tasks:
                    if method == "pcgrad" and K > 8:
                        cells.append("n/a")
                        continue
                    t, mem = timed_run(
                        "synthetic_mtl", [*base, *shape, *m_over, *over, f"data.num_tasks={K}"], a.warmup, a.steps
                    )
                    if mode == "full":  # the reference of the ratios
                        ref[K] = (t, mem)
                    cells.append(cell(t, mem, None if mode == "full" else ref[K]))
                print(f"| {vit} | {method} | {mode} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
