"""Per-step time and peak memory of every weighting method relative to uniform, for 2..40 tasks, both modes.

Same model (a ViT), same batch, the synthetic mixture with K tasks; each configuration trains `--warmup` + `--steps`
steps through `train()` (the real training step, surrogate backward included), timed over the last `--steps`.
Peak memory: CUDA's peak allocated bytes on a GPU; on CPU the process's peak resident set (Linux VmHWM, reset
before each configuration through /proc/self/clear_refs), minus the resident set before it. So that the resident
set follows the live tensors, the script re-executes itself with glibc returning every allocation over 64 KiB to
the system on free (MALLOC_MMAP_THRESHOLD_). Ratios are against uniform at the same K, measured in the same
process run after one discarded warm-up configuration. Usage:
    python benchmarks/methods.py [--tasks 2 4 8 16 40] [--steps 5] [--warmup 2] [--methods NAME ...] [key=value ...]
`--methods` times only those (uniform, the reference, always). A method that refuses a mode shows "n/a".
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import tempfile
import time

import torch
from lightning.pytorch.callbacks import Callback

from mtl_lightning.config import compose
from mtl_lightning.errors import MTLError
from mtl_lightning.train import train
from mtl_lightning.weighting import WEIGHTINGS

# every registered method (a new one is timed without editing this file), uniform first (the reference); not fixed
# (uniform with other numbers), ForkMerge (benchmarks/forkmerge.py) or mgda_ub (mgda in rep mode, which is timed)
_GRAD = {n for n, c in WEIGHTINGS.items() if getattr(c, "gradient_based", False)}
LOSS_LEVEL = ["uniform", *(n for n in WEIGHTINGS.names() if n not in _GRAD | {"uniform", "fixed", "forkmerge"})]
GRADIENT = [n for n in WEIGHTINGS.names() if n in _GRAD - {"mgda_ub"}]


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


class Meter(Callback):
    """Times steps after the warm-up and records the peak memory of the steps."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.steps, self.base, self.peak = warmup, 0.0, 0.0, 0, 0, 0

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_start(self, trainer, pl_module):
        gc.collect()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident set (VmHWM)
            self.base = _status("VmRSS")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self._sync(pl_module)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.t1, self.steps = time.perf_counter(), trainer.global_step - self.warmup

    def on_train_end(self, trainer, pl_module):
        cuda = pl_module.device.type == "cuda"
        self.peak = (torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")) - self.base


def timed_run(exp: str, overrides: list[str], warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per step after `warmup` steps, peak MiB of the training steps) of `exp` with `overrides`."""
    args = [
        f"out_dir={tempfile.mkdtemp()}",
        f"trainer.max_steps={warmup + steps}",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "test=false",
        "logger=csv",
        *overrides,
    ]
    meter = Meter(warmup)
    train(compose(exp, args), callbacks=[meter])
    return (meter.t1 - meter.t0) / meter.steps, meter.peak / 2**20


def cell(t: float, mem: float, ref: tuple[float, float] | None = None) -> str:
    """A table cell: the reference's time and memory, or (with `ref`) their ratios to it."""
    if ref is None:
        return f"{t * 1000:.0f} ms, {mem:.0f} MiB"
    return f"{t / ref[0]:.2f}×, {mem / max(ref[1], 1):.2f}×"


def low_level_malloc() -> None:
    """Re-execute with glibc returning allocations over 64 KiB to the system on free (read at start-up only)."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def measure(name: str, mode: str | None, K: int, a, overrides: list[str]) -> tuple[float, float]:
    mode_arg = [f"weighting.mode={mode}"] if mode else []
    if WEIGHTINGS.get(name).auxiliary:
        mode_arg.append("weighting.target=task0")
    if name == "post_train":
        mode_arg.append("weighting.joint_epochs=1")
    if name == "bayesagg_mtl":  # its own steps from the first, not its warm-up's summed losses
        mode_arg.append("weighting.warmup_epochs=0")
    return timed_run(
        "synthetic_mtl", [f"weighting={name}", f"data.num_tasks={K}", *mode_arg, *overrides], a.warmup, a.steps
    )


def main() -> None:
    low_level_malloc()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16, 40])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.width=256")
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    a = p.parse_args()
    if a.smoke:  # uniform and one gradient method in both modes, one timed step of a tiny model
        a.tasks, a.steps, a.warmup, a.methods = [2], 1, 1, a.methods or ["pcgrad"]
        a.overrides += ["model.depth=1", "model.width=16", "data.train_size=64", "data.batch_size=16"]
    base = [
        "model.depth=4",
        "model.width=128",
        "data.img_size=8",
        "data.batch_size=64",
        "data.train_size=2048",
        *a.overrides,
    ]
    configs = [(m, None) for m in LOSS_LEVEL] + [(m, mode) for mode in ("rep", "param") for m in GRADIENT]
    if a.methods:
        configs = [c for c in configs if c[0] in ("uniform", *a.methods)]
    print("| method | mode | " + " | ".join(f"K={k} time, mem" for k in a.tasks) + " |")
    print("|---|---|" + "---|" * len(a.tasks))
    measure("pcgrad", "param", a.tasks[0], a, base)  # warm-up: one-off initialisation stays out of the figures
    ref = {}
    for K in a.tasks:  # uniform first at every K: the reference of the ratios
        ref[K] = measure("uniform", None, K, a, base)
    for name, mode in configs:
        cells = []
        for K in a.tasks:
            try:
                t, m = ref[K] if name == "uniform" else measure(name, mode, K, a, base)
            except MTLError:  # e.g. Excess-MTL in rep mode
                cells.append("n/a")
                continue
            cells.append(cell(t, m, None if name == "uniform" else ref[K]))
        print(f"| {name} | {mode or 'loss'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
