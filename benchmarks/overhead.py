"""Steps/s of `experiments.run` against a bare PyTorch loop: same model, data, batch size, optimiser, schedule.

Both are timed over the same steady-state steps (after a warm-up), interleaved in one process, several rounds;
the ratio of medians is what BENCHMARKS.md records. One epoch spans all the steps (`data.epoch_size`), so the
per-epoch `last.ckpt` write, a cost that grows with model size and not with steps, stays out of the per-step
figure. The bare loop runs under the same autocast as `trainer.precision`. Usage:
    python benchmarks/overhead.py [--steps 150] [--warmup 20] [--rounds 5] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from mtl_lightning.config import compose
from mtl_lightning.data import create_datamodule
from mtl_lightning.model import cosine_with_warmup, param_groups
from mtl_lightning.multitask import MultiTaskModule
from mtl_lightning.train import train
from mtl_lightning.weighting import create_weighting


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepTimer(Callback):
    def __init__(self, warmup: int, device: str):
        self.warmup, self.device, self.t0, self.t1, self.steps = warmup, device, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            sync(self.device)
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        sync(self.device)
        self.t1, self.steps = time.perf_counter(), trainer.global_step - self.warmup


def framework(cfg, warmup: int, device: str) -> float:
    timer = StepTimer(warmup, device)
    train(cfg, callbacks=[timer])
    return timer.steps / (timer.t1 - timer.t0)


def bare(cfg, steps: int, warmup: int, device: str) -> float:
    torch.manual_seed(cfg.seed)
    dm = create_datamodule(cfg.data, cfg.seed)
    dm.setup()
    tasks = [t.name for t in dm.tasks]
    model = MultiTaskModule(
        dm.tasks, dm.in_chans, dm.img_size, cfg.model, cfg.optim, create_weighting(tasks, cfg.weighting)
    )
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(steps, cfg.optim.warmup))
    images, labels = dm.splits["train"].images, dm.splits["train"].labels
    bs, n = cfg.data.batch_size, len(labels)
    perm = torch.randperm(n)
    for step in range(steps):
        if step == warmup:
            sync(device)
            t0 = time.perf_counter()
        i = (step * bs) % n
        idx = perm[i : i + bs]
        x = images[idx].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        y = labels[idx].to(device, non_blocking=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.trainer.precision.startswith("bf16")):
            z = model.backbone(x)
            loss = sum(F.cross_entropy(h(z), y[:, k]) for k, h in enumerate(model.heads)) / len(tasks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    sync(device)
    return (steps - warmup) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--exp", default="digits_mtl")
    ap.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works (tests)")
    args, overrides = ap.parse_known_args()
    if args.smoke:
        args.steps, args.warmup, args.rounds = 3, 1, 1
        overrides += ["data.train_size=64", "data.batch_size=8", "model.depth=1", "model.width=16"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as out:
        cfg = compose(
            args.exp,
            [
                f"out_dir={out}",
                f"trainer.max_steps={args.steps}",
                "trainer.limit_val_batches=0",
                "test=false",
                *overrides,
            ],
        )
        cfg.data.epoch_size = args.steps * cfg.data.batch_size
        ours, ref = [], []
        for _ in range(args.rounds):
            ref.append(bare(cfg, args.steps, args.warmup, device))
            ours.append(framework(cfg, args.warmup, device))
    r, o = statistics.median(ref), statistics.median(ours)
    print(f"\ndevice={device} exp={args.exp} {' '.join(overrides)} steps={args.steps} (warm-up {args.warmup})")
    print(f"bare PyTorch loop : {r:8.2f} steps/s  (rounds: {', '.join(f'{v:.2f}' for v in ref)})")
    print(f"experiments.run   : {o:8.2f} steps/s  (rounds: {', '.join(f'{v:.2f}' for v in ours)})")
    print(f"overhead ratio (bare / ours): {r / o:.3f}")


if __name__ == "__main__":
    main()
