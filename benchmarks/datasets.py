"""Images/s of each real-dataset DataModule's training loader on CPU, on fixtures in the official formats.

Writes the fixtures (tests/fixtures.py; JPEGs at the official datasets' sizes: CelebA 178x218, DomainNet-like
~300x400) into a temp dir, then for each DataModule times `setup` and full passes over the training loader, as the
Trainer would iterate it. JPEG datasets run three ways in the same process: decoded on access (`data.cache=false`,
0 and 2 workers) and from the decoded-image cache (`data.cache=true`; the one-off build is timed separately).
Usage:
    python benchmarks/datasets.py [--scale 1.0] [--passes 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures import write_celeba, write_cifar10, write_domainnet, write_stl10, write_svhn  # noqa: E402

from mtl_lightning.config import compose  # noqa: E402
from mtl_lightning.data import create_datamodule  # noqa: E402


def images_per_s(exp: str, root: Path, passes: int, *overrides: str) -> tuple[float, float]:
    """(setup seconds, training images/s over `passes` epochs)."""
    cfg = compose(exp, [f"data.root={root}", *overrides])
    dm = create_datamodule(cfg.data)
    t0 = time.perf_counter()
    dm.setup()
    setup = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    for epoch in range(passes):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for x, _ in loader:
            n += len(x)
    return setup, n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the fixture sizes")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    a = p.parse_args()
    if a.smoke:
        a.scale, a.passes = 0.002, 1
    s = lambda n: max(2, int(n * a.scale))  # noqa: E731
    root = Path(tempfile.mkdtemp()) / "data"
    t0 = time.perf_counter()
    write_cifar10(root, per_batch=s(2000), test=s(1000))
    write_stl10(root, train=s(1000), test=s(500))
    write_svhn(root, train=s(5000), test=s(1000))
    write_celeba(root, sizes=(s(2000), s(200), s(200)))
    write_domainnet(root, domains=("real", "sketch"), train=s(500), test=s(100), size=320)
    print(f"fixtures written in {time.perf_counter() - t0:.0f} s under {root}\n")
    rows = [
        ("cifar10", "in memory", []),
        ("svhn", "in memory", []),
        ("cifar_stl_mdl", "in memory (STL resized at setup)", []),
    ]
    for exp in ("celeba_mtl", "domainnet_mdl"):
        extra = ["data.tasks=[real,sketch]"] if exp == "domainnet_mdl" else []
        rows += [
            (exp, "decode on access, 0 workers", ["data.cache=false", *extra]),
            (exp, "decode on access, 2 workers", ["data.cache=false", "data.num_workers=2", *extra]),
            (exp, "cache build (first setup)", ["data.cache=true", *extra]),
            (exp, "cached, memory-mapped, 0 workers", ["data.cache=true", *extra]),
        ]
    print("| experiment | loader | setup s | train images/s |")
    print("|---|---|---|---|")
    base = {}
    for exp, how, over in rows:
        setup, rate = images_per_s(exp, root, a.passes, *over)
        key = (exp, how.startswith("cached"))
        base.setdefault(exp, rate)
        ratio = f" ({rate / base[exp]:.1f}x)" if key[1] or "2 workers" in how else ""
        print(f"| {exp} | {how} | {setup:.2f} | {rate:,.0f}{ratio} |", flush=True)


if __name__ == "__main__":
    main()
