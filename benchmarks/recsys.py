"""The AliExpress loader at scale (issue 19): a generated log in MTReclib's layout, parsed once into the memory-mapped
cache, then rows/s into the model (the DataLoader's batches of 2048, shuffled, what training iterates) and the
process's peak resident memory against the data's size; and the tabular step it must keep fed (an embedding +
shared-bottom step at MTReclib's sizes) in rows/s, side by side in one run. The goal: >= 500k rows/s from the
loader, so it never bounds the step, and a peak memory well under the data.
Usage:
    python benchmarks/recsys.py [--rows 2000000] [--batches 200]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_log(folder: Path, rows: int, seed: int = 0) -> None:
    """AliExpress_NL/{train,test}.csv in MTReclib's layout (test: a tenth of train), written in blocks."""
    from mtl_lightning.data.aliexpress import CATEGORICAL, HEADER, NUMERICAL

    rng = np.random.default_rng(seed)
    d = folder / "AliExpress_NL"
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", rows), ("test", rows // 10)):
        with open(d / f"{split}.csv", "w") as f:
            f.write(",".join(HEADER) + "\n")
            for start in range(0, n, 100_000):
                m = min(100_000, n - start)
                ids = rng.integers(0, 1000, (m, CATEGORICAL))
                num = rng.random((m, NUMERICAL)).round(4)
                click = rng.random(m) < 0.1
                conv = click & (rng.random(m) < 0.1)
                block = np.column_stack([np.arange(start, start + m), ids, num, click, conv])
                np.savetxt(
                    f, block, fmt=["%d"] * (1 + CATEGORICAL) + ["%.4f"] * NUMERICAL + ["%d", "%d"], delimiter=","
                )


def _anon(key: str = "RssAnon") -> float:
    """This process's resident memory of one kind, in MB (Linux)."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status[key].split()[0]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    a = p.parse_args()
    if a.smoke:
        a.rows, a.batches = 3000, 1
    import torch

    from mtl_lightning.config import compose
    from mtl_lightning.data import create_datamodule
    from mtl_lightning.multitask import MultiTaskModule
    from mtl_lightning.weighting import create_weighting

    root = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    write_log(root, a.rows)
    size = sum(f.stat().st_size for f in root.rglob("*.csv"))
    took = time.perf_counter() - t0
    print(f"generated {a.rows:,} + {a.rows // 10:,} rows ({size / 2**20:.0f} MB of CSV) in {took:.0f} s")
    cfg = compose("aliexpress_mtl", [f"data.root={root}"])
    dm = create_datamodule(cfg.data, 0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    dm.check()
    parse = time.perf_counter() - t0
    cache = sum(f.stat().st_size for f in (root / ".cache").rglob("*.npy"))
    rate = a.rows * 1.1 / parse
    print(f"parsed once into the cache: {parse:.1f} s ({rate:,.0f} rows/s), {cache / 2**20:.0f} MB of .npy")
    anon0 = _anon()  # after parsing (what it left allocated is not the loader's)
    t0 = time.perf_counter()
    dm = create_datamodule(cfg.data, 0)
    dm.check()
    dm.setup()
    print(f"a later run opens the cache in {time.perf_counter() - t0:.2f} s")
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(a.batches):
        x, y = next(it)
        n += len(y)
    load = n / (time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"loader: {load:,.0f} rows/s (batches of {cfg.data.batch_size}, shuffled)")
    print(f"peak resident memory {peak:.0f} MB (after imports {rss0:.0f} MB) against {cache / 2**20:.0f} MB of data")
    # resident memory splits into the process's own (anonymous) pages and mapped file pages, which are the cache's
    # .npy files: the kernel's page cache, shared and evictable, not memory the loader holds
    anon, files = _anon(), _anon("RssFile")
    print(
        f"now: {anon:.0f} MB anonymous (the process's own; {anon0:.0f} MB before opening the cache: the loader holds "
        f"{anon - anon0:.0f} MB), {files:.0f} MB of mapped files (page cache)"
    )
    model = MultiTaskModule(
        dm.tasks, dm.in_chans, 0, cfg.model, cfg.optim, create_weighting(["ctr", "ctcvr"], cfg.weighting)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in range(6):
        if i == 1:
            t0 = time.perf_counter()
        opt.zero_grad()
        losses, _ = model.task_losses(model(x), y)
        losses.mean().backward()
        opt.step()
    step = len(y) * 5 / (time.perf_counter() - t0)
    threads = torch.get_num_threads()
    print(f"shared-bottom step (embedding 128, [512, 256], towers [128, 64]): {step:,.0f} rows/s, {threads} threads")
    print(f"loader / step throughput: {load / step:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
