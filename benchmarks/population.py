"""Populations (issue 18): a vectorised N-member population against N separate models, side by side in one run.

1. `--steps`: per-step time and peak memory of one training step (forward, backward, AdamW) of an N-member
   population against stepping N separate models one after another in one process, on one shared batch, for the
   digits ViT (3 x 64, 16 x 16 inputs, patch 4) and ViT-S/4-shaped models (depth 6, widths 48 and 96, 32 x 32).
   Each (model, N, mode) runs in its own process, so the peak resident memory is its own.
2. `--grid`: wall-clock of the 11-point weight grid of digits_mdl (plus the two single-task baselines) at equal
   steps, `search.backend=population` against the Ray grid (reused workers), both through the search command.
3. `--pbt`: in-process PBT against Ray PBT on digits_mdl, same population and budget: best rank-split accuracy
   and wall time.
Usage:
    python benchmarks/population.py --steps [--members 1 2 4 8 16 32] [--fused] [--chunk 4] [--models ...]
    python benchmarks/population.py --grid [--epochs 3]
    python benchmarks/population.py --pbt [--epochs 6] [--population 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

BACKENDS = ("population", "ray")  # --grid and --pbt: the same search through each
IN_PROCESS = False  # --smoke: every measurement in this process (no figure is kept, the paths are what is checked)
MODELS = {  # name: (depth, width, patch, image size, in_chans)
    "digits ViT 3x64": (3, 64, 4, 16, 1),
    "ViT-S/4 6x48": (6, 48, 4, 32, 3),
    "ViT-S/4 6x96": (6, 96, 4, 32, 3),
}


def one(
    model: str, n: int, mode: str, steps: int, batch: int, fused: bool, chunk: int = 0, device: str = "cpu"
) -> dict:
    """Time `steps` training steps (after 2 warm-up steps) of `n` members, vectorised or one model after another, on
    `device`. Peak memory: the process's resident peak on CPU (so one (model, N, mode) per process), the allocated
    peak of these steps on CUDA (benchmarks/gpu.py calls this in one process)."""
    import torch
    from omegaconf import OmegaConf

    from mtl_lightning.config import ModelConfig, OptimConfig
    from mtl_lightning.model import param_groups
    from mtl_lightning.network import build_network
    from mtl_lightning.population import PopulationModule
    from mtl_lightning.tasks import Classification

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    depth, width, patch, size, chans = MODELS[model]
    mcfg = OmegaConf.structured(
        ModelConfig(backbone="vit_small_patch16_224", depth=depth, width=width, patch_size=patch)
    )
    ocfg = OmegaConf.structured(OptimConfig())
    tasks = [Classification("a", 10), Classification("b", 10)]
    dev = torch.device(device)
    x = torch.randn(batch, chans, size, size, device=dev)
    y = torch.randint(0, 10, (batch, 2), device=dev)
    targets = [y[:, 0], y[:, 1]]
    if mode == "population":
        m = PopulationModule(tasks, chans, size, mcfg, ocfg, torch.full((n, 2), 0.5), list(range(n))).to(dev)
        m.fused_attn = "on" if fused else "off"
        m.setup("fit")
        opt = torch.optim.AdamW(m.param_groups(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            for i in range(0, n, chunk or n):  # as PopulationModule's training step: a backward per chunk
                sl = slice(i, min(n, i + (chunk or n)))
                losses, _ = m._vmap(sl, x, targets)
                (m.member_weights[sl] * losses).sum().backward()
            opt.step()

    else:
        nets = []
        for s in range(n):
            torch.manual_seed(s)
            backbone, arch, heads = build_network(tasks, chans, size, mcfg)
            for mod in backbone.modules():
                if hasattr(mod, "fused_attn"):
                    mod.fused_attn = fused
            nets.append(torch.nn.ModuleDict({"backbone": backbone, "arch": arch, "heads": heads}).to(dev))
        opts = [torch.optim.AdamW(param_groups(net, 0.05), lr=1e-3) for net in nets]

        def step():
            for net, opt in zip(nets, opts):
                opt.zero_grad(set_to_none=True)
                reps = net["arch"](net["backbone"](x))
                loss = sum(0.5 * t.loss(h(r), tgt)[0] for t, h, r, tgt in zip(tasks, net["heads"], reps, targets))
                loss.backward()
                opt.step()

    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None  # CUDA runs ahead of the host: time finished work
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"step_s": dt, "peak_mb": peak}


def steps_table(members: list[int], steps: int, batch: int, fused: bool, chunk: int, models: list[str]) -> None:
    print("| model | N | population step (ms) | N separate (ms) | ratio | population peak MB | separate peak MB |")
    print("|---|---|---|---|---|---|---|")
    for model in models:
        for n in members:
            r = {}
            for mode in ("population", "separate"):
                if IN_PROCESS:
                    r[mode] = one(model, n, mode, steps, batch, fused, chunk)
                    continue
                cmd = [sys.executable, __file__, "--one", model, str(n), mode, str(steps), str(batch), str(int(fused))]
                cmd.append(str(chunk))
                r[mode] = json.loads(
                    subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
                )
            p, s = r["population"], r["separate"]
            ratio = p["step_s"] / s["step_s"]
            print(
                f"| {model} | {n} | {p['step_s'] * 1e3:.1f} | {s['step_s'] * 1e3:.1f} | {ratio:.2f}x "
                f"| {p['peak_mb']:.0f} | {s['peak_mb']:.0f} |",
                flush=True,
            )


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    if IN_PROCESS:  # the search command's own entry point, its printed lines captured
        import contextlib
        import io

        from experiments.search import main as search_main

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = search_main(cmd[3:])
        if code:
            raise RuntimeError(f"{' '.join(cmd)} exited with {code}")
        return time.perf_counter() - t0, buf.getvalue()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t0, out


def search(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "experiments.search", "exp=digits_mdl", *argv, "logger=csv"]


def grid(epochs: int, overrides: list[str]) -> None:
    tmp = tempfile.mkdtemp()
    common = [f"trainer.max_epochs={epochs}", "search=grid", "trainer.enable_progress_bar=false", *overrides]
    walls = {}
    for backend in BACKENDS:
        walls[backend], out = timed(search([*common, f"search.backend={backend}", f"out_dir={tmp}/{backend}"]))
        rows = open(f"{tmp}/{backend}/search/digits_mdl-grid/grid.csv").read().splitlines()
        print(f"{backend}: {walls[backend]:.1f} s, {len(rows) - 1} rows; " + out.strip().splitlines()[-2])
    if "ray" in walls:
        ratio = walls["population"] / walls["ray"]
        print(f"population / ray wall time: {ratio:.2f}x ({1 / ratio:.1f}x faster)")


def pbt(epochs: int, population: int, overrides: list[str]) -> None:
    tmp = tempfile.mkdtemp()
    common = [f"trainer.max_epochs={epochs}", "search=pbt", f"search.population={population}"]
    common += ["trainer.enable_progress_bar=false", *overrides]
    for backend in BACKENDS:
        wall, out = timed(search([*common, f"search.backend={backend}", f"out_dir={tmp}/{backend}"]))
        best = [x for x in out.splitlines() if x.startswith("best validation")][0]
        print(f"{backend}: {wall:.1f} s; {best}")


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        model, n, mode, steps, batch, fused, chunk = sys.argv[2:9]
        print(json.dumps(one(model, int(n), mode, int(steps), int(batch), fused == "1", int(chunk))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", action="store_true")
    p.add_argument("--grid", action="store_true")
    p.add_argument("--pbt", action="store_true")
    p.add_argument("--members", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--timed-steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--fused", action="store_true", help="timm's fused attention on (on CPU: no vmap rule)")
    p.add_argument("--chunk", type=int, default=0, help="members per vectorised pass (population.chunk_size)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    a = p.parse_args()
    over = []
    if a.smoke:  # one member, the smallest model, one step; the population backend's searches on little data (the
        # Ray backend runs the same search command, which tests/test_search.py covers)
        global BACKENDS, IN_PROCESS
        BACKENDS, IN_PROCESS = ("population",), True
        a.members, a.models, a.timed_steps, a.batch, a.epochs, a.population = [1], [next(iter(MODELS))], 1, 4, 1, 2
        over = ["data.train_size=64", "data.val_size=32", "data.test_size=32", "search.grid=[0.5]", "search.num_cpus=2"]
    if a.steps:
        steps_table(a.members, a.timed_steps, a.batch, a.fused, a.chunk, a.models)
    if a.grid:
        grid(a.epochs, over)
    if a.pbt:
        pbt(a.epochs, a.population, over)


if __name__ == "__main__":
    main()
