"""What every Ray search records of its trials: `trials.csv` (what each tried, how many epochs it trained, whether
the scheduler stopped it early, its last value of the search's metric) and `trials.png` (the metric against each
searched key), and the best trial's configuration."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from .plots import _pyplot
from .trial import _config_weights


def trial_rows(results, tasks: list[str], metric: str, max_epochs: int) -> list[dict]:
    rows = []
    for r in results:
        if not r.metrics:
            continue
        c, m = r.config, r.metrics
        weights = _config_weights(c)
        row = {"trial": Path(r.path).name}
        if weights is not None:  # the weights used, normalised (the raw values are PBT's search coordinates)
            row.update({f"w/{t}": w / sum(weights) for t, w in zip(tasks, weights)})
        if c.get("lr") is not None:
            row["optim.lr"] = c["lr"]
        row.update(c.get("params", {}))
        epochs = int(m.get("training_iteration", 0))
        row.update({"epochs": epochs, "stopped_early": epochs < max_epochs, metric: m.get(metric, math.nan)})
        rows.append(row)
    return rows


def write_trials(results, tasks: list[str], metric: str, sign: float, max_epochs: int, path: Path) -> dict:
    """trials.csv and trials.png in `path`; returns the best configuration (by the last value, among the trials
    that trained the most epochs) and how many trials the scheduler stopped early."""
    rows = trial_rows(results, tasks, metric, max_epochs)
    if not rows:
        return {}
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    keys = [k for k in fields if k not in ("trial", "epochs", "stopped_early", metric)]
    _plot(rows, keys, metric, path / "trials.png")
    scored = [r for r in rows if not math.isnan(float(r[metric]))] or rows
    longest = max(r["epochs"] for r in scored)  # a trial stopped at a rung has an earlier epoch's value
    best = max((r for r in scored if r["epochs"] == longest), key=lambda r: sign * float(r[metric]))
    return {
        "best_config": {k: best[k] for k in keys if k in best and not k.startswith("w/")},
        "best_trial_value": best[metric],
        "trials": len(rows),
        "stopped_early": sum(bool(r["stopped_early"]) for r in rows),
    }


def _plot(rows: list[dict], keys: list[str], metric: str, png: Path) -> None:
    numeric = [k for k in keys if all(isinstance(r.get(k), (int, float)) for r in rows)]
    if not numeric:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(numeric), figsize=(3.6 * len(numeric), 3.2), squeeze=False)
    for ax, k in zip(axes[0], numeric):
        for stopped, marker in ((False, "o"), (True, "x")):
            pts = [(r[k], r[metric]) for r in rows if bool(r["stopped_early"]) == stopped]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label="stopped early" if stopped else "ran to the end")
        values = [r[k] for r in rows if r[k] > 0]
        if len(values) == len(rows) and max(values) / min(values) > 50:
            ax.set_xscale("log")
        ax.set(xlabel=k, ylabel=metric)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
