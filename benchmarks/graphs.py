"""QM9's reference network on CPU (issue 27): graphs per second through the loader (PyG batching and the complete-
graph transform, what every training batch pays) and through a training step (NNConv + GRU x 3 at width 64,
Set2Set, uniform weighting, Adam) and an evaluation forward, on one thread and on two, side by side in one run; the
loader's share of a step; and a whole QM9 epoch (110,831 training graphs, 20,000 to validate and test) estimated
from them. The graphs are generated with QM9's features and its size (9-27 atoms: 18 on average, as QM9's with their
hydrogens), so no dataset is needed; the network has 4 heads instead of 11 (a linear layer each: negligible).
Usage:
    python benchmarks/graphs.py [--graphs 2400] [--batches 10]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time


def rate(fn, batches, repeat: int) -> float:
    """Graphs per second of `fn(batch)` over `batches`, the best of `repeat` passes (after one warm-up batch)."""
    fn(batches[0])
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        best = min(best, time.perf_counter() - t0)
    return sum(b[0].num_graphs for b in batches) / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graphs", type=int, default=2400, help="graphs generated (the training split: 80%)")
    p.add_argument("--batches", type=int, default=10, help="batches of 120 timed per figure")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    a = p.parse_args()
    batch, width = 120, 64  # QM9's references
    if a.smoke:  # the same code paths at a fraction of the cost (a width-64 step on 120 graphs: seconds here)
        a.graphs, a.batches, a.repeat, batch, width = 100, 2, 1, 12, 8
    import torch

    from mtl_lightning.config import compose
    from mtl_lightning.train import build

    over = [f"data.size={a.graphs}", f"data.val_size={a.graphs // 10}", f"data.test_size={a.graphs // 10}"]
    over += ["data.atoms=[9,27]", f"data.batch_size={batch}", f"model.width={width}", "optim.lr=1e-3", "logger=csv"]
    built = build(compose("synthetic_graphs", over))
    dm, model = built.dm, built.model
    dm.setup()
    loader = dm.train_dataloader()
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) == a.batches:
            break
    nodes = sum(int(b[0].num_nodes) for b in batches) / sum(b[0].num_graphs for b in batches)
    edges = sum(int(b[0].num_edges) for b in batches) / sum(b[0].num_graphs for b in batches)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def load(_):  # the loader's work for one batch: fetch, transform (complete graph + distances), collate
        dm.splits["train"].__getitems__(torch.randint(len(dm.splits["train"]), (batch,)).tolist())

    def step(batch):
        x, y = batch
        opt.zero_grad()
        losses, _ = model.task_losses(model(x), y)
        losses.sum().backward()
        opt.step()

    def forward(batch):
        with torch.no_grad():
            model(batch[0])

    print(f"QM9-sized generated graphs: {nodes:.1f} atoms and {edges:.0f} directed edges (complete graph) on average")
    print("| threads | loader graphs/s | train step graphs/s | eval forward graphs/s | loader share of a step |")
    print("|---|---|---|---|---|")
    estimates = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        model.train()
        ld, st = rate(load, batches, a.repeat), rate(step, batches, a.repeat)
        model.eval()
        ev = rate(forward, batches, a.repeat)
        share = (1 / ld) / (1 / ld + 1 / st)
        print(f"| {threads} | {ld:,.0f} | {st:,.0f} | {ev:,.0f} | {share:.0%} |")
        # an epoch: the training graphs through loader and step in turn (num_workers=0), 20k through loader + forward
        estimates[threads] = 110_831 * (1 / ld + 1 / st) + 20_000 * (1 / ld + 1 / ev)
    for threads, sec in estimates.items():
        print(f"a QM9 epoch on {threads} thread(s): about {sec / 60:.1f} min; 300 epochs: {sec * 300 / 3600:.0f} h")
    print(f"two threads against one: {estimates[1] / estimates[2]:.2f}x")
    # NNConv's edge network makes a width x width matrix per edge: 4096 floats x 340 edges x 120 graphs a layer
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB")


if __name__ == "__main__":
    sys.exit(main())
