"""Dense prediction costs, in one process run (ratios side by side):

1. Loaders: training images/s of the NYUv2 and Taskonomy DataModules on fixtures in their official formats
   (NYUv2 288x384 .npy arrays; Taskonomy 512x512 PNGs of the five tasks, resized to 256), 0 and 2 workers.
2. A dense step against a classification step on the same backbone and batch: the shapes scenes' four dense heads
   vs four linear heads (the synthetic mixture at the same image size), for a ViT and a ResNet.
3. Gradient methods on dense tasks: per-step time and peak memory against uniform, `rep` and `param` mode, for 3
   and 5 Taskonomy tasks (fixtures at 64x64).
4. The references' networks on NYUv2 at 288x384, batch 2 (fixtures): per-step time and peak memory of SegNet and
   SegNet-MTAN (with MTAN's conv heads) and of the dilated ResNet-50 with a DeepLab head per task, against the
   dilated ResNet-50 with our light decoders (nyuv2_mtl's network).
Time and memory as in benchmarks/methods.py (CPU: peak resident set; GPU: peak allocated). Usage:
    python benchmarks/dense.py [--steps 5] [--warmup 2] [--parts loaders steps methods heads]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures import write_nyuv2, write_taskonomy  # noqa: E402
from methods import cell, low_level_malloc, timed_run  # noqa: E402

from mtl_lightning.config import compose  # noqa: E402
from mtl_lightning.data import create_datamodule  # noqa: E402

VIT = ["model.depth=4", "model.width=128", "model.patch_size=4"]
NOT_VIT = ["model.depth=null", "model.width=null", "model.num_heads=null", "model.patch_size=null"]
METHODS = ["pcgrad", "cagrad", "mgda", "imtl_g", "upgrad", "nash_mtl", "graddrop", "gradnorm"]


def loader_rate(exp: str, root: Path, workers: int, *over: str) -> float:
    dm = create_datamodule(compose(exp, [f"data.root={root}", f"data.num_workers={workers}", *over]).data)
    dm.setup()
    n, t0 = 0, time.perf_counter()
    for x, _ in dm.train_dataloader():
        n += len(x)
    return n / (time.perf_counter() - t0)


def loaders(a, root: Path) -> None:
    write_nyuv2(root, train=2 if a.smoke else 64, val=1)
    write_taskonomy(root, views=1 if a.smoke else 16, size=64 if a.smoke else 512)  # 2 train buildings x 16 views
    print("| loader | 0 workers img/s | 2 workers img/s |\n|---|---|---|")
    for exp, over in (("nyuv2_mtl", ["data.batch_size=8"]), ("taskonomy_mtl", ["data.batch_size=8"])):
        rates = [loader_rate(exp, root, w, *over) for w in (0, 2)]
        print(f"| {exp} | {rates[0]:.0f} | {rates[1]:.0f} |", flush=True)


def steps(a) -> None:
    common = ["data.batch_size=32", "data.train_size=512", "model.pretrained=false"]
    if a.smoke:
        common = ["data.batch_size=2", "data.train_size=8", "data.val_size=8", "data.test_size=8"]
        common += ["model.pretrained=false"]
    rows = [
        ("ViT depth 4, width 128, /4", VIT),
        ("ResNet-18 (features_only, /32)", ["model.backbone=resnet18", *NOT_VIT]),
    ]
    if a.smoke:  # timm's 0.4 M-parameter test_resnet: the same path (features_only) at a tenth of the cost
        rows[1] = (rows[1][0], ["model.backbone=test_resnet", *NOT_VIT])
    print("| backbone | classification step | dense step | time | peak memory |\n|---|---|---|---|---|")
    for label, model in rows:
        cls = timed_run("synthetic_mtl", [*common, *model, "data.num_tasks=4", "data.img_size=32"], a.warmup, a.steps)
        dense = timed_run("shapes_dense", [*common, *model, "data.img_size=32"], a.warmup, a.steps)
        print(
            f"| {label} | {cls[0] * 1000:.0f} ms, {cls[1]:.0f} MiB | {dense[0] * 1000:.0f} ms, {dense[1]:.0f} MiB "
            f"| {dense[0] / cls[0]:.2f}× | {dense[1] / max(cls[1], 1):.2f}× |",
            flush=True,
        )


def methods(a, root: Path) -> None:
    write_taskonomy(root, views=1 if a.smoke else 16, size=64)
    five = "segment_semantic,depth_zbuffer,normal,keypoints2d,edge_texture"
    sets = {3: "data.tasks=[segment_semantic,depth_zbuffer,normal]", 5: f"data.tasks=[{five}]"}
    common = [f"data.root={root}", "data.img_size=64", "data.batch_size=16", *VIT]
    if a.smoke:
        common = [f"data.root={root}", "data.img_size=16", "data.batch_size=2", "model.depth=1", "model.width=16"]
        common += ["model.patch_size=4"]
    print("| method | mode | K=3 time, mem | K=5 time, mem |\n|---|---|---|---|")
    timed_run("taskonomy_mtl", [*common, sets[3], "weighting=pcgrad"], a.warmup, a.steps)  # warm-up, discarded
    ref = {k: timed_run("taskonomy_mtl", [*common, s], a.warmup, a.steps) for k, s in sets.items()}
    print("| uniform | loss | " + " | ".join(cell(t, m) for t, m in ref.values()) + " |")
    for mode in ("rep", "param"):
        for name in METHODS[:1] if a.smoke else METHODS:
            cells = []
            for k, s in sets.items():
                t, m = timed_run(
                    "taskonomy_mtl", [*common, s, f"weighting={name}", f"weighting.mode={mode}"], a.warmup, a.steps
                )
                cells.append(cell(t, m, ref[k]))
            print(f"| {name} | {mode} | " + " | ".join(cells) + " |", flush=True)


HEADS = {  # the networks of the published dense tables, against nyuv2_mtl's
    "dilated ResNet-50, light decoders (nyuv2_mtl)": ["model.head=light"],
    "dilated ResNet-50, DeepLab heads (nyuv2_deeplab)": ["model.head=deeplab"],
    "SegNet, conv heads": ["model.backbone=none", "model.architecture=segnet", "model.head=conv"],
    "SegNet-MTAN, conv heads (nyuv2_mtan)": ["model.backbone=none", "model.architecture=mtan", "model.head=conv"],
}


def heads(a, root: Path) -> None:
    write_nyuv2(root, train=5, val=1)
    common = [f"data.root={root}", "data.batch_size=2", "model.pretrained=false", "data.augment=false"]
    common += ["data.drop_last=true"]  # whole batches of 2, as the DeepLab heads' BatchNorm needs
    common += ["model.backbone=resnet50", "model.kwargs={output_stride: 8}"]
    if a.smoke:  # a narrow SegNet and a small undilated ResNet
        common += ["model.widths=[2,4,4,4,4]", "model.backbone=test_resnet", "model.kwargs={output_stride: 32}"]
    print("| network | s/step | peak MiB | time vs light | memory vs light |\n|---|---|---|---|---|")
    ref = None
    # the smoke run: the reference and SegNet-MTAN (the DeepLab heads and SegNet train in every experiment's smoke test)
    for label, over in list(HEADS.items())[:: 3 if a.smoke else 1]:
        t, m = timed_run("nyuv2_mtl", [*common, *over], a.warmup, a.steps)
        ref = ref or (t, m)
        print(f"| {label} | {t:.2f} | {m:.0f} | {t / ref[0]:.2f}× | {m / max(ref[1], 1):.2f}× |", flush=True)


def main() -> None:
    low_level_malloc()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--parts", nargs="+", default=["loaders", "steps", "methods", "heads"])
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    a = p.parse_args()
    if a.smoke:
        a.steps, a.warmup = 1, 1
    with tempfile.TemporaryDirectory() as d:
        if "loaders" in a.parts:
            loaders(a, Path(d) / "loaders")
        if "steps" in a.parts:
            steps(a)
        if "methods" in a.parts:
            methods(a, Path(d) / "methods")
        if "heads" in a.parts:
            heads(a, Path(d) / "heads")


if __name__ == "__main__":
    main()
