"""Per-step time and peak memory of training a backbone in part against full fine-tuning (issue 39): linear probing
(`model.freeze_backbone=true`), shared LoRA (`model.adapter=lora`, rank 8 in every block's attention and MLP),
per-task LoRA (`model.lora.share=task`: a backbone pass per task, so at most 8 tasks) and MTLoRA's split
(`model.lora.share=mtlora`, likewise), on a ViT-S and a ViT-B (random weights: the cost does not depend on them) at 2
to 40 tasks, with uniform weights and with a gradient method in `param` mode (PCGrad: K backward passes over the
trainable shared parameters, which adapters make small; at most 8 tasks, since full fine-tuning's Jacobian of a ViT-B
at K=40 would need 14 GB). Ratios are against full fine-tuning of the same ViT at the same K and method, measured in
this run. Then a population of N members (`population.weights`) of full models against N LoRA sets on one trunk
from a file (held once): step time and the bytes of the model's tensors.
    python benchmarks/adapters.py [--tasks 2 8 40] [--members 4 8] [--steps 5] [--warmup 2] [key=value ...]
    python benchmarks/adapters.py --tasks 2 8 --modes lora-task mtlora --members   # some layouts (full: always)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import cell, low_level_malloc, timed_run  # noqa: E402

VITS = {"ViT-S": ["model.width=384", "model.depth=12"], "ViT-B": ["model.width=768", "model.depth=12"]}
LORA = ["model.adapter=lora", "model.lora.rank=8"]
MODES = {"full": [], "probe": ["model.freeze_backbone=true"], "lora": LORA}
MODES.update({"lora-task": [*LORA, "model.lora.share=task"], "mtlora": [*LORA, "model.lora.share=mtlora"]})
PER_TASK = ("lora-task", "mtlora")  # a backbone pass per task: 40 of a ViT-B a step is past a benchmark's budget
METHODS = {"uniform": ["weighting=uniform"], "pcgrad": ["weighting=pcgrad", "weighting.mode=param"]}


def main() -> None:
    low_level_malloc()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 40])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--members", type=int, nargs="*", default=[4, 8], help="population sizes (none: no populations)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="layouts (full: always)")
    p.add_argument("--vits", nargs="+", choices=list(VITS), default=list(VITS))
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.img_size=64")
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    a = p.parse_args()
    vits = {v: VITS[v] for v in a.vits}
    base = ["data.img_size=32", "model.patch_size=8", "data.batch_size=16", "data.train_size=512", *a.overrides]
    if a.smoke:  # one tiny ViT, one K, one timed step
        a.tasks, a.steps, a.warmup = [2], 1, 1
        vits = {"tiny": ["model.width=16", "model.depth=2"]}
        base += ["data.train_size=64"]
        a.members = [2]
    print("| backbone | method | trained | " + " | ".join(f"K={k} time, mem" for k in a.tasks) + " |")
    print("|---|---|---|" + "---|" * len(a.tasks))
    warm = [*base, *next(iter(vits.values())), "data.num_tasks=2"]
    timed_run("synthetic_mtl", warm, a.warmup, a.steps)  # one-off initialisation stays out of the figures
    for vit, shape in vits.items():
        for method, m_over in METHODS.items():
            ref = {}
            for mode, over in MODES.items():
                if mode != "full" and mode not in a.modes:
                    continue
                if method == "pcgrad" and mode == "probe":
                    continue  # no trainable shared parameter: refused
                cells = []
                if method == "pcgrad" and mode == "lora-task":
                    continue  # no trainable shared parameter: refused
                for K in a.tasks:
                    if (method == "pcgrad" or mode in PER_TASK) and K > 8:
                        cells.append("n/a")
                        continue
                    t, mem = timed_run(
                        "synthetic_mtl", [*base, *shape, *m_over, *over, f"data.num_tasks={K}"], a.warmup, a.steps
                    )
                    if mode == "full":  # the reference of the ratios
                        ref[K] = (t, mem)
                    cells.append(cell(t, mem, None if mode == "full" else ref[K]))
                print(f"| {vit} | {method} | {mode} | " + " | ".join(cells) + " |", flush=True)
    if a.members:
        populations(a, base, *next(iter(vits.items())))


def tensor_bytes(module) -> int:
    """The bytes of a module's parameters and buffers, each storage once (a trunk the members share is one)."""
    seen = {}
    for t in (*module.parameters(), *module.buffers()):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def populations(a, base: list[str], vit: str, shape: list[str]) -> None:
    """N members trained as one vectorised model: full models against LoRA sets on one trunk from a file."""
    import tempfile

    import torch

    from mtl_lightning.config import compose
    from mtl_lightning.train import build

    trunk = Path(tempfile.mkdtemp()) / "trunk.pth"
    cfg = compose("synthetic_mtl", [*base, *shape, "data.num_tasks=2"])
    torch.save(build(cfg).model.backbone.state_dict(), trunk)
    print(f"\n| {vit} population | trained | " + " | ".join(f"N={n} time, model tensors" for n in a.members) + " |")
    print("|---|---|" + "---|" * len(a.members))
    ref = {}
    for mode, over in (("full", []), ("lora", LORA)):
        cells = []
        for n in a.members:
            weights = "population.weights=[" + ",".join(["[0.5,0.5]"] * n) + "]"
            run = [*base, *shape, *over, "data.num_tasks=2", f"model.checkpoint={trunk}", weights]
            t, _ = timed_run("synthetic_mtl", run, a.warmup, a.steps)
            size = tensor_bytes(build(compose("synthetic_mtl", run)).model) / 2**20
            if mode == "full":
                ref[n] = (t, size)
            cells.append(f"{t * 1000:.0f} ms, {size:.0f} MiB" if mode == "full" else cell(t, size, ref[n]))
        print(f"| {vit} | {mode} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
