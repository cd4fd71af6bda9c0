"""The cost of tasks that own their view (issue 20): a training step of the supervised task alone against the same
step with rotation (four rotated copies of every image through the backbone), exemplar-MT (the EMA teacher on the
plain images and the student on an augmented copy) and both, side by side in one run, on ARML's WRN-28-2 at 32 x 32
and on the digits ViT. Shown per task as the ratio to the supervised step.
Usage:
    python benchmarks/semi_supervised.py [--batch 64] [--steps 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtl_lightning.config import compose
from mtl_lightning.multitask import MultiTaskModule
from mtl_lightning.tasks import Classification, Exemplar, Rotation
from mtl_lightning.weighting import create_weighting

MODELS = {  # (experiment whose model section is measured, input channels, image size)
    "WRN-28-2, 32x32": ("cifar10_ssl", 3, 32),
    "digits ViT 3x64, 16x16": ("digits_ssl", 1, 16),
}


def make_step(exp, chans, size, tasks, batch):
    """One training step of the module on a fixed batch: forward (every task's own views), backward, Adam, EMA."""
    cfg = compose(exp, [])
    names = [t.name for t in tasks]
    model = MultiTaskModule(tasks, chans, size, cfg.model, cfg.optim, create_weighting(names, cfg.weighting))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, chans, size, size)
    y = torch.stack([torch.randint(0, 10, (batch,)), *[torch.zeros(batch, dtype=torch.long)] * (len(tasks) - 1)], 1)

    def step():
        opt.zero_grad()
        losses, _, _ = model.batch_losses(x, y)
        losses.sum().backward()
        opt.step()
        model.after_update()

    step()  # warm-up
    return step


def timed(step, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is shown")
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    a = p.parse_args()
    if a.smoke:
        a.batch, a.steps, a.rounds = 2, 1, 1
    print(f"batch {a.batch}, {torch.get_num_threads()} threads")
    print("| model | supervised (ms) | + rotation | + exemplar | + both |")
    print("|---|---|---|---|---|")
    for name, (exp, chans, size) in MODELS.items():
        sets = {
            "supervised": [Classification("y", 10)],
            "rotation": [Classification("y", 10), Rotation()],
            "exemplar": [Classification("y", 10), Exemplar()],
            "both": [Classification("y", 10), Rotation(), Exemplar()],
        }
        fns = {k: make_step(exp, chans, size, v, a.batch) for k, v in sets.items()}
        rounds = [{k: timed(f, a.steps) for k, f in fns.items()} for _ in range(a.rounds)]  # interleaved
        t = {k: statistics.median(r[k] for r in rounds) for k in fns}
        s = t["supervised"]
        cells = [f"{t[k] * 1e3:.0f} ({t[k] / s:.2f}x)" for k in ("rotation", "exemplar", "both")]
        print(f"| {name} | {s * 1e3:.0f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
