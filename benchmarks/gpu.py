"""Every GPU claim in one unattended run (issue 29): one Markdown table per section, each row a ratio measured side by
side in this run, with the device, torch and CUDA versions in the header.

Sections (each in its own process with its own time cap, at --tiny sizes all in one; one that fails or runs out of
time says "skipped: why" and the others still run):
- paths: a short training run of each step mode on the device, against the same run on the CPU (final parameters
  and validation loss to a tolerance). On a machine without CUDA the device is the CPU (a determinism check).
- vit: ViT-S/4 on 64x64 inputs (CelebA's setting), one training step (forward, backward, AdamW) at batch --batch:
  images/s and model FLOP utilisation, eager vs compiled, fp32 vs bf16 vs fp16.
- population: N = 1, 8, 32 digits ViTs as one vectorised population against N separate runs one after the other.
- pbt: 4 PBT trials sharing the device (search.gpus_per_trial=0.25) against the same trials one at a time.
- methods: per-step time of PCGrad, MGDA, Nash-MTL and CAGrad against uniform at 40 tasks (CelebA's count).
Usage:
    python benchmarks/gpu.py                       # the full sizes (about 8 minutes on one GPU)
    python benchmarks/gpu.py --tiny                # tiny sizes: what tests/test_benchmarks.py runs on a CPU
    python benchmarks/gpu.py --sections vit methods --cap 120
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmarks it reuses: methods, population
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: experiments.search runs from it
CAPS = {"paths": 150, "vit": 120, "population": 90, "pbt": 120, "methods": 60}  # seconds, at full size
PEAK_TFLOPS = {  # dense bf16/fp16 tensor-core peaks (vendor sheets): MFU's denominator
    "H200": 989,
    "H100": 989,
    "A100": 312,
    "A10": 125,
    "L4": 121,
    "V100": 125,
    "T4": 65,
    "RTX 4090": 165,
}
MODES = {  # paths: the step modes, each a short run of an embedded experiment
    "sampled mixture": ("digits_mdl", ["data.mixing=sample"]),
    "loss-level (uncertainty)": ("digits_mtl", ["weighting=uncertainty"]),
    "gradient, rep (mgda_ub)": ("digits_mtl", ["weighting=mgda_ub"]),
    "gradient, param (pcgrad)": ("digits_mtl", ["weighting=pcgrad", "weighting.mode=param"]),
    "ForkMerge": ("digits_forkmerge", ["weighting.interval_steps=4", "weighting.val_batches=1"]),
    "population (3 members)": ("digits_mtl", ["population.weights=[[0.5,0.5],[0.9,0.1],[0.2,0.8]]"]),
    "view task (rotation)": ("digits_ssl", ["data.labels_per_class=4"]),
}


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def short_run(exp: str, over: list[str], accelerator: str, tiny: bool) -> dict:
    from mtl_lightning.config import compose
    from mtl_lightning.train import train

    size = ["data.train_size=128", "data.val_size=64", "data.batch_size=32"] if tiny else ["data.train_size=1024"]
    args = [*size, "trainer.max_epochs=1", "test=false", "logger=csv", "trainer.enable_progress_bar=false"]
    args += [f"trainer.accelerator={accelerator}", f"out_dir={tempfile.mkdtemp()}", "data.num_workers=0", *over]
    t = time.perf_counter()
    out = train(compose(exp, args))
    return {"loss": next(v for k, v in out.items() if k.startswith("val/loss/")), "s": time.perf_counter() - t}


def paths(a) -> list[str]:
    dev = device()
    rows = [
        "| step mode | CPU val loss | "
        + dev
        + " val loss | abs. difference | within 0.05 | time ratio CPU / "
        + dev
        + " |",
        "|---|---|---|---|---|---|",
    ]
    for label, (exp, over) in MODES.items():
        try:
            cpu, other = short_run(exp, over, "cpu", a.tiny), short_run(exp, over, dev, a.tiny)
        except Exception as e:  # one mode's failure is its row, not the section's end
            rows.append(f"| {label} | failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} | | | NO | |")
            continue
        diff = abs(cpu["loss"] - other["loss"])
        ok = "yes" if diff < 0.05 else "NO"
        rows.append(
            f"| {label} | {cpu['loss']:.4f} | {other['loss']:.4f} | {diff:.2e} | {ok} | {cpu['s'] / other['s']:.2f}× |"
        )
    return rows


def vit_model(tiny: bool):
    import timm

    if tiny:
        return timm.create_model(
            "vit_small_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2, num_classes=40
        ), 16
    return timm.create_model("vit_small_patch16_224", img_size=64, patch_size=4, num_classes=40), 64


def vit_step_flops(model, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x).float().logsumexp(1).mean().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def vit_rate(dev: str, dtype, compiled: bool, tiny: bool, batch: int) -> tuple[float, float]:
    """(images/s, FLOPs of one step) of one ViT training step: forward, backward, AdamW (with a GradScaler in fp16)."""
    import torch

    torch.manual_seed(0)
    model, size = vit_model(tiny)
    model = model.to(dev)
    x = torch.randn(batch, 3, size, size, device=dev)
    flops = vit_step_flops(model, x)
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(dev, enabled=dtype == torch.float16)

    def step():
        with torch.autocast(dev, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = step_model(x).float().logsumexp(1).mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(3):  # warm-up (and compiling)
        step()
    sync()
    n, t = (3 if tiny else 20), time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return n * batch / (time.perf_counter() - t), flops


def vit(a) -> list[str]:
    import torch

    dev = device()
    peak = next((v for k, v in PEAK_TFLOPS.items() if dev == "cuda" and k in torch.cuda.get_device_name()), None)
    rows = ["| ViT-S/4 step | images/s | vs eager fp32 | MFU |", "|---|---|---|---|"]
    base = None
    for compiled in (False, True):
        if compiled and a.no_compile:
            rows.append("| compiled | skipped: --no-compile | | |")
            continue
        for name, dtype in {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}.items():
            batch = 8 if a.tiny else a.batch
            rate, flops = vit_rate(dev, dtype, compiled, a.tiny, batch)
            base = base or rate
            mfu = f"{100 * rate / batch * flops / (peak * 1e12):.1f}%" if peak and dtype is not None else "n/a"
            rows.append(f"| {'compiled' if compiled else 'eager'} {name} | {rate:.0f} | {rate / base:.2f}× | {mfu} |")
    if dev != "cuda":
        rows.append("\nMFU: n/a without a GPU (no tensor-core peak to divide by); fp32 has none either.")
    return rows


def population(a) -> list[str]:
    """N digits ViTs (3 x 64) as one vectorised module against N modules stepped one after the other, one batch:
    benchmarks/population.py's step timing, on this device."""
    from population import one

    dev, batch, steps = device(), (8 if a.tiny else 128), 3
    cuda = dev == "cuda"
    rows = ["| N | population step (ms) | N separate (ms) | speed-up | peak MiB: population / separate |"]
    rows.append("|---|---|---|---|---|")
    for n in [1, 2] if a.tiny else [1, 8, 32]:
        # fused attention where it has a batching rule (CUDA); vmap on CPU needs the unfused path
        p, s = (one("digits ViT 3x64", n, mode, steps, batch, cuda, device=dev) for mode in ("population", "separate"))
        mem = f"{p['peak_mb']:.0f} / {s['peak_mb']:.0f}" if cuda else "n/a (CPU: one process, see population.py)"
        rows.append(
            f"| {n} | {p['step_s'] * 1e3:.1f} | {s['step_s'] * 1e3:.1f} | {s['step_s'] / p['step_s']:.2f}× | {mem} |"
        )
    return rows


def pbt_searches(tiny: bool, cuda: bool) -> dict[str, list[str]]:
    """The two PBT searches' overrides: 4 trials one at a time (a whole device each), and sharing the device."""
    base = ["search=pbt", "search.population=4", "trainer.max_epochs=2", "logger=csv", "data.num_workers=0"]
    base += ["data.train_size=128", "data.val_size=64", "model.depth=1", "model.width=16"] if tiny else []
    if cuda:
        alone, share = (
            ["search.gpus_per_trial=1", "search.num_cpus=8"],
            ["search.gpus_per_trial=0.25", "search.num_cpus=8"],
        )
    else:  # the CPU's analogue: both cores for one trial, or half a core each
        alone, share = (
            ["search.cpus_per_trial=2", "search.num_cpus=2"],
            ["search.cpus_per_trial=0.5", "search.num_cpus=2"],
        )
    return {"one at a time": [*base, *alone], "sharing the device": [*base, *share]}


def pbt(a) -> list[str]:
    rows = ["| 4 PBT trials | wall time (s) | vs one at a time |", "|---|---|---|"]
    times = {}
    for label, over in pbt_searches(a.tiny, device() == "cuda").items():
        t = time.perf_counter()
        argv = [sys.executable, "-m", "experiments.search", "exp=digits_mtl", *over, f"out_dir={tempfile.mkdtemp()}"]
        subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
        times[label] = time.perf_counter() - t
    for label, s in times.items():
        rows.append(f"| {label} | {s:.1f} | {times['one at a time'] / s:.2f}× |")
    return rows


def methods(a) -> list[str]:
    from methods import timed_run  # the methods benchmark's timing through the real training step

    k = 4 if a.tiny else 40
    over = [f"data.num_tasks={k}", f"trainer.accelerator={device()}", "data.num_workers=0"]
    over += ["model.depth=1", "model.width=16", "data.train_size=64", "data.batch_size=16"] if a.tiny else []
    steps, warm = (2, 1) if a.tiny else (10, 3)
    ref, _ = timed_run("synthetic_mtl", ["weighting=uniform", *over], warm, steps)
    rows = [f"| method at K={k} | ms/step | vs uniform |", "|---|---|---|", f"| uniform | {ref * 1000:.1f} | 1.00× |"]
    for name in ("pcgrad", "mgda", "nash_mtl", "cagrad"):
        t, _ = timed_run("synthetic_mtl", [f"weighting={name}", *over], warm, steps)
        rows.append(f"| {name} | {t * 1000:.1f} | {t / ref:.2f}× |")
    return rows


SECTIONS = {"paths": paths, "vit": vit, "population": population, "pbt": pbt, "methods": methods}


def header() -> str:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores), no CUDA"
    return (
        f"# GPU check: {name}\n\ntorch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}; command: `python benchmarks/{os.path.basename(__file__)} "
        f"{' '.join(sys.argv[1:])}`\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU check that the script works)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows (compiling costs minutes on CPU)")
    p.add_argument("--batch", type=int, default=256, help="the ViT section's batch size")
    p.add_argument("--cap", type=int, default=0, help="each section's time cap in seconds (default: its own)")
    p.add_argument("--out", default="", help="also write the tables to this file")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:  # sections, each its time and rows, as JSON on the last line
        print(json.dumps(run_sections(a.child.split(","), a)))
        return
    text = [header()]
    # each section in a process of its own with its own cap; at --tiny sizes (the tests' CPU check) this process runs
    # them all, uncapped: no second import of torch and Lightning
    groups = [list(a.sections)] if a.tiny else [[name] for name in a.sections]
    for group in groups:
        done = run_sections(group, a) if a.tiny else run_child(group, a)
        for name in group:
            secs, rows = done[name]
            text.append(f"## {name} ({secs:.0f} s)\n\n" + "\n".join(rows) + "\n")
            print(text[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(text))


def run_sections(names: list[str], a) -> dict:
    """The sections run in this process: {name: [its seconds, its rows]}."""
    out = {}
    for name in names:
        t = time.perf_counter()
        rows = SECTIONS[name](a)
        out[name] = [time.perf_counter() - t, rows]
    return out


def run_child(group: list[str], a) -> dict:
    """`run_sections` in a child process under the group's cap; a section that fails or runs over it is skipped."""
    cap = a.cap or sum(CAPS[name] for name in group)
    argv = [sys.executable, os.path.abspath(__file__), "--child", ",".join(group), f"--batch={a.batch}"]
    argv += ["--no-compile"] * a.no_compile
    t = time.perf_counter()
    # its own session: at the cap the whole section goes, the searches and Ray workers it started included
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {name: [cap, [f"skipped: over its {cap} s cap"]] for name in group}
    if proc.returncode == 0:
        return json.loads(out.strip().splitlines()[-1])
    last = err.strip().splitlines()[-1] if err.strip() else "no output"
    return {name: [time.perf_counter() - t, [f"skipped: failed ({last})"]] for name in group}


if __name__ == "__main__":
    main()
