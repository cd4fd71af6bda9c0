"""A study's wall time with its cells trained in live Ray workers (`study.reuse_actors=true`, the default) against a
fresh worker process per cell, side by side in one run, and whether the cells' results are the same either way.

The study: two weightings x `--seeds` seeds on two synthetic tasks, with the single-task baselines (the test suite's
tiny study, at `--epochs` epochs). A cell this small costs less to train than a new worker costs to start (a Python
process importing torch, Lightning and timm), which is the case the option is for: a study of many short cells.
Usage:
    python benchmarks/study.py [--epochs 2] [--seeds 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from experiments.study import main as study
from mtl_lightning.search.ray_session import ray_session

STUDY = """
exp: synthetic_mtl
overrides: [data.num_tasks=2, data.train_size=300, data.val_size=100, data.test_size=100, trainer.max_epochs={epochs}]
axes:
  weighting: [uniform, pcgrad]
  seed: {seeds}
num_cpus: 2
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    a = p.parse_args()
    if a.smoke:
        a.epochs, a.seeds = 1, 1
        a.overrides += ["data.train_size=64", "model.depth=1", "model.width=16"]
        a.overrides += ["study.axes.weighting=[uniform]", "study.baselines=false"]  # one cell
    tmp = Path(tempfile.mkdtemp())
    (tmp / "bench.yaml").write_text(STUDY.format(epochs=a.epochs, seeds=list(range(a.seeds))))
    wall, cells = {}, {}
    with ray_session(2, quiet=True):  # one local Ray for both studies: its start-up is in neither time
        for reuse in ("true",) if a.smoke else ("true", "false"):  # the same study twice: not what a smoke run checks
            out = tmp / f"reuse-{reuse}"
            t = time.perf_counter()
            argv = [str(tmp / "bench.yaml"), f"study.out_dir={out}", f"study.reuse_actors={reuse}", "logger=csv"]
            assert study([*argv, *a.overrides]) == 0
            wall[reuse] = time.perf_counter() - t
            cells[reuse] = {p.stem: json.loads(p.read_text())["metrics"] for p in (out / "cells").glob("*.json")}
    print(f"\n{len(cells['true'])} cells, {a.epochs} epochs each")
    print(f"reuse_actors=true  {wall['true']:.1f} s")
    if a.smoke:
        return
    same = cells["true"].keys() == cells["false"].keys() and all(
        {k: v for k, v in cells["true"][c].items() if isinstance(v, float)}
        == {k: v for k, v in cells["false"][c].items() if isinstance(v, float)}
        for c in cells["true"]
    )
    print(f"reuse_actors=false {wall['false']:.1f} s")
    print(f"ratio {wall['true'] / wall['false']:.2f}x; every cell's metrics identical: {same}")


if __name__ == "__main__":
    main()
