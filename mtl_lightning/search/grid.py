"""The grid sweep of Royer et al.: p = the weight of task 0 (1 - p on task 1) x model capacities, with the
single-task baselines, every trial trained for the same number of optimiser steps."""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import MTLError
from .plots import _pyplot
from .trial import trial_dirname


def _grid_space(scfg, cfg, tasks, base):
    from ray import tune

    if any(not 0 <= p <= 1 for p in scfg.grid):
        raise MTLError(f"search.grid={list(scfg.grid)} must hold values of p within [0, 1].")
    caps = [list(c) for c in scfg.capacities] or [[cfg.model.depth, cfg.model.width]]
    if any(len(c) != 2 for c in caps):
        raise MTLError(f"search.capacities={caps} must be [depth, width] pairs.")
    variants = [["mix", p] for p in scfg.grid] + ([["single", t] for t in tasks] if scfg.baselines else [])
    space = {**base, "variant": tune.grid_search(variants), "capacity": tune.grid_search(caps)}
    space["extra"] = tune.sample_from(lambda config: _grid_overrides(config))
    tc = tune.TuneConfig(
        metric="score", mode="max", reuse_actors=scfg.reuse_actors, trial_dirname_creator=trial_dirname
    )
    return space, tc


def _grid_overrides(config: dict) -> list[str]:
    (kind, value), (depth, width) = config["variant"], config["capacity"]
    extra = [f"model.depth={depth}", f"model.width={width}"] if depth is not None else []
    if kind == "single":
        return [*extra, f"data.tasks=[{value}]"]
    return [*extra, "weighting=fixed", f"weighting.weights=[{value},{1 - value}]"]


def _final_metrics(result) -> dict:
    return {k: v for k, v in (result.metrics or {}).items() if k.startswith("val/") or k == "score"}


def _grid_report(results, scfg, tasks, path: Path) -> dict:
    rows = []
    for r in results:
        if not r.metrics:
            continue
        (kind, value), (depth, width) = r.config["variant"], r.config["capacity"]
        rows.append(grid_row(kind, value, depth, width, r.metrics, "", tasks))
    return write_grid_report(rows, tasks, path)


def grid_row(kind: str, value, depth, width, metrics: dict, suffix: str, tasks: list[str]) -> dict:
    """One row of grid.csv: a mixture p or a single-task baseline, from its `val/...{suffix}` metrics."""
    row = {"kind": kind, "p": value if kind == "mix" else "", "task": value if kind == "single" else ""}
    row.update({"depth": depth, "width": width, "steps": metrics.get("step")})
    if kind == "single":  # a baseline reports its own task
        row["acc_mean"] = metrics.get(f"val/acc/{value}{suffix}")
    else:
        row["acc_mean"] = metrics.get(f"val/acc_mean{suffix}")
    for t in tasks:
        row[f"acc/{t}"] = metrics.get(f"val/acc/{t}{suffix}", "") if kind == "mix" or t == value else ""
    return row


def write_grid_report(rows: list[dict], tasks: list[str], path: Path) -> dict:
    """grid.csv, its plots, and the best mixture: what every grid backend reports."""
    with open(path / "grid.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot_grid(rows, tasks, path)
    mix = [r for r in rows if r["kind"] == "mix"]
    best = max(mix, key=lambda r: r["acc_mean"])
    return {
        "table": str(path / "grid.csv"),
        "best_trial": f"p={best['p']}, depth {best['depth']}, width {best['width']}",
        "best_p": best["p"],
        "best_value": best["acc_mean"],
        "best_weights": [best["p"], 1 - best["p"]],
    }


def _plot_grid(rows, tasks, path: Path) -> None:
    plt = _pyplot()

    caps = sorted({(r["depth"], r["width"]) for r in rows}, key=lambda c: (c[0] or 0, c[1] or 0))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for c in caps:
            pts = sorted((r["p"], r[f"acc/{t}"]) for r in rows if r["kind"] == "mix" and (r["depth"], r["width"]) == c)
            ax.plot([p for p, _ in pts], [a for _, a in pts], marker="o", label=f"depth {c[0]}, width {c[1]}")
        ax.set(xlabel=f"p (weight of {tasks[0]})", ylabel=f"val acc {t}", title=t)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path / "grid_acc_vs_p.png", dpi=120)
    plt.close(fig)
    labels = [f"{d}x{w}" for d, w in caps]
    best_p, gaps = [], {t: [] for t in tasks}
    for c in caps:
        mix = [r for r in rows if r["kind"] == "mix" and (r["depth"], r["width"]) == c]
        best = max(mix, key=lambda r: r["acc_mean"])
        best_p.append(best["p"])
        for t in tasks:
            single = [
                r[f"acc/{t}"]
                for r in rows
                if r["kind"] == "single" and r["task"] == t and (r["depth"], r["width"]) == c
            ]
            gaps[t].append(best[f"acc/{t}"] - single[0] if single and single[0] != "" else float("nan"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    a1.plot(labels, best_p, marker="o")
    a1.set(xlabel="capacity (depth x width)", ylabel="best p", ylim=(-0.05, 1.05), title="best weight vs capacity")
    for t in tasks:
        a2.plot(labels, gaps[t], marker="o", label=t)
    a2.axhline(0, color="grey", lw=0.8)
    a2.set(xlabel="capacity (depth x width)", ylabel="MTL - single-task acc", title="gap vs capacity")
    a2.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path / "grid_capacity.png", dpi=120)
    plt.close(fig)
