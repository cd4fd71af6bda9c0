"""The cost of a merge against one training epoch (issue 37): each merging method on the task vectors of T models
of the digits main job's ViT and of a ViT-S/16, in time and peak memory, each in a fresh process; AdaMerging per
step of its coefficient training; the same network's training epoch on the embedded digits, for scale. Usage:
    python benchmarks/merging.py [--tasks 2 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

MODELS = {  # the digits main job's ViT, and ViT-S/16 at 224 (22 M parameters)
    "digits ViT 3x64": ["model.depth=3", "model.width=64"],
    "ViT-S/16": ["model.depth=12", "model.width=384", "model.num_heads=6", "model.patch_size=16", "data.img_size=224"],
}


def network(over: list[str]):
    from mtl_lightning.config import compose
    from mtl_lightning.train import build

    return build(compose("digits_mtl", over)).model


def one(model: str, T: int, method: str, rounds: int) -> dict:
    """In this process: the merge's median time and the peak RSS it added."""
    from mtl_lightning.merging import create_merging
    from mtl_lightning.merging.base import task_vectors

    torch.manual_seed(0)
    state = {k: v for k, v in network(MODELS[model]).state_dict().items() if not k.startswith("heads.")}
    models = [{k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}] * T
    theta0, tau, keys = task_vectors(state, models)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m = create_merging(method)
    kwargs = {"ties": {"keep": 0.2, "lam": 1.0}, "task_arithmetic": {"lam": 0.3}}.get(method, {})
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        m.merge(theta0, tau, **kwargs)
        times.append(time.perf_counter() - t0)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"s": statistics.median(times), "mb": peak, "params": theta0.numel(), "tau_mb": tau.numel() * 4 / 2**20}


def step_times(model: str, steps: int, batch: int) -> tuple[float, float]:
    """(a training step, an AdaMerging step) of this network at this batch size, seconds."""
    from mtl_lightning.merging.adamerging import AdaMerging, prediction_entropy
    from mtl_lightning.merging.base import task_vectors, to_state_dict

    net = network(MODELS[model])
    size = 224 if model == "ViT-S/16" else 16
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 10, (batch, 2))  # the digits: one channel
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def train_step():
        outs = net(x)
        loss = sum(torch.nn.functional.cross_entropy(o, y[:, k]) for k, o in enumerate(outs))
        opt.zero_grad()
        loss.backward()
        opt.step()

    shared = {k: v for k, v in net.state_dict().items() if not k.startswith("heads.")}
    theta0, tau, keys = task_vectors(shared, [shared, shared])
    ada = AdaMerging(AdaMerging.Config(steps=steps))
    sizes = [shared[k].numel() for k in keys]

    def entropy(theta, batch):
        outs = torch.func.functional_call(net, to_state_dict(theta, shared, keys), (batch,))
        return sum(prediction_entropy("classification", o) for o in outs)

    def timed(f, n):
        f()  # warm-up
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n

    batches = iter(lambda: x, None)
    return timed(train_step, steps), timed(lambda: ada.learn(theta0, tau, sizes, batches, entropy), 1) / steps


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        model, T, method, rounds = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        print(json.dumps(one(model, T, method, rounds)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed training and AdaMerging steps")
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    a = p.parse_args()
    models = list(MODELS)
    if a.smoke:
        a.tasks, a.rounds, a.steps, models = [2], 1, 1, models[:1]
    from mtl_lightning.merging import MERGINGS

    methods = [n for n in MERGINGS.names() if n != "adamerging"]
    print("| model | parameters | T | " + " | ".join(f"{m} (ms, MiB)" for m in methods) + " | task vectors MiB |")
    print("|---|---|---|" + "---|" * (len(methods) + 1))
    for model in models:
        for T in a.tasks:
            r = {}
            for m in methods:
                if a.smoke:  # in this process: the figures are not kept, the code paths are what is checked
                    r[m] = one(model, T, m, a.rounds)
                    continue
                cmd = [sys.executable, __file__, "--one", model, str(T), m, str(a.rounds)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r[m] = json.loads(out.splitlines()[-1])
            cells = " | ".join(f"{r[m]['s'] * 1e3:.0f}, {r[m]['mb']:.0f}" for m in methods)
            first = r[methods[0]]
            print(f"| {model} | {first['params'] / 1e6:.2f} M | {T} | {cells} | {first['tau_mb']:.0f} |", flush=True)
    batch = 32
    print(f"\n| model | training step (batch {batch}) | AdaMerging step (batch {batch}) | ratio |")
    print("|---|---|---|---|")
    for model in models:
        train_s, ada_s = step_times(model, a.steps, batch)
        print(f"| {model} | {train_s * 1e3:.0f} ms | {ada_s * 1e3:.0f} ms | {ada_s / train_s:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
