"""A study's report, rebuilt from its folder alone (meta.json and cells/*.json): report.md, results.csv, PNGs.

Per row (a method, a weight, a capacity ...): each metric's mean ± sd over seeds; Δm% against the single-task
baselines of the same context; the mean rank over metrics; a paired t-test against the `compare` row, paired by
seed, on the row's score (Δm% when there are baselines, else the mean of the direction-signed metrics), with the
difference's 95% confidence interval; every row against its single-task baselines, metric by metric, paired by seed;
the published number beside ours where the study gives one; each tuned row's found options and tuning cost; and the
compute spent. With gradient conflict logged, the Pearson correlation of each cell's mean task-gradient cosine with
its score, with a 95% confidence interval.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .plots import _pyplot

ALPHA = 0.05


def load(folder: Path) -> tuple[dict, list[dict]]:
    meta = json.loads((folder / "meta.json").read_text())
    cells = [json.loads(p.read_text()) for p in sorted((folder / "cells").glob("*.json"))]
    return meta, cells


def paired_test(a: list[float], b: list[float]) -> tuple[float, float]:
    """Two-sided paired t-test of a against b: (mean difference, p-value); p is NaN below two pairs or with no
    spread in the differences."""
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2 or np.allclose(d, d[0]):
        return float(d.mean()) if len(d) else float("nan"), float("nan")
    return float(d.mean()), float(stats.ttest_rel(a, b).pvalue)


def paired_ci(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float]:
    """The `level` confidence interval of the mean paired difference a - b (Student's t); NaNs below two pairs."""
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


def pearson(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Pearson r and its 95% confidence interval (Fisher z); NaNs below four points."""
    from scipy import stats

    if len(x) < 4 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan"), float("nan"), float("nan")
    r = stats.pearsonr(x, y)
    ci = r.confidence_interval(0.95)
    return float(r.statistic), float(ci.low), float(ci.high)


def delta_m(
    values: dict[str, float], base: dict[str, float], directions: dict[str, bool], tasks_of: dict | None = None
) -> float:
    """Δm% (Maninis et al.), higher is better: the signed relative change against the base, in %, averaged per task
    first when `tasks_of` (metric -> task) is known (LibMTL's convention), else flat over the metrics (Nash-MTL's,
    whose sign `shown` flips; a study made before the tasks were recorded)."""
    terms = defaultdict(list)
    for m in values:
        if m in base and base[m] != 0 and not math.isnan(values[m]):
            key = (tasks_of or {}).get(m, m)
            terms[key].append((1 if directions[m] else -1) * (values[m] - base[m]) / abs(base[m]) * 100)
    flat = [t for ts in terms.values() for t in ts]
    if not flat:
        return float("nan")
    return float(np.mean([np.mean(ts) for ts in terms.values()])) if tasks_of else sum(flat) / len(flat)


def shown(meta: dict, value: float) -> float:
    """A score-side Δm% as the study's convention shows it: Nash-MTL's is lower-is-better."""
    return -value if meta.get("delta_m") == "nashmtl" else value


def _context(row_of_single: str) -> str:
    """The part of a baseline's row label after the task: what a method's row must share with it (capacity ...)."""
    return row_of_single.split(", ", 1)[1] if ", " in row_of_single else ""


def analyse(meta: dict, cells: list[dict]) -> dict:
    metrics, directions = meta["metrics"], meta["directions"]
    by_row: dict[str, list[dict]] = defaultdict(list)
    for c in cells:
        by_row[c["row"]].append(c)
    # baselines: the single-task metric of each task, by context and by seed (each task's own metrics)
    base: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        if c["kind"] == "baseline":
            ctx = _context(c["row"])
            for m in metrics:
                if m in c["metrics"]:
                    base[ctx][m].append(c["metrics"][m])
    base_mean = {ctx: {m: float(np.mean(v)) for m, v in ms.items()} for ctx, ms in base.items()}

    def ctx_of(row: str) -> str:
        parts = set(row.split(", "))
        return next((ctx for ctx in base_mean if ctx and set(ctx.split(", ")) <= parts), "")

    def score(c: dict) -> float:
        vals = {m: c["metrics"].get(m, float("nan")) for m in metrics}
        b = base_mean.get(ctx_of(c["row"]))
        if b and c["kind"] != "baseline":
            per_task = meta.get("metric_tasks") if meta.get("delta_m", "libmtl") == "libmtl" else None
            return delta_m(vals, b, directions, per_task)
        signed = [(1 if directions[m] else -1) * v for m, v in vals.items() if not math.isnan(v)]
        return sum(signed) / len(signed) if signed else float("nan")

    rows = {}
    for row, cs in by_row.items():
        stats_ = {}
        for m in metrics:
            v = [c["metrics"][m] for c in cs if m in c["metrics"]]
            stats_[m] = (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) if v else None
        scores = {c["seed"]: score(c) for c in cs}
        rows[row] = {
            "kind": cs[0]["kind"],
            "stats": stats_,
            "seeds": sorted(scores, key=str),
            "scores": scores,
            "delta_m": None if cs[0]["kind"] == "baseline" or not base_mean.get(ctx_of(row)) else scores,
        }
    # mean rank over metrics among the non-baseline rows (1 = best)
    methods = [r for r in rows if rows[r]["kind"] != "baseline"]
    ranks = defaultdict(list)
    for m in metrics:
        have = [r for r in methods if rows[r]["stats"][m] is not None]
        order = sorted(have, key=lambda r: rows[r]["stats"][m][0], reverse=directions[m])
        for i, r in enumerate(order):
            ranks[r].append(i + 1)
    for r in methods:
        rows[r]["rank"] = float(np.mean(ranks[r])) if ranks[r] else float("nan")
    # paired tests against the compare row
    ref = meta["study"].get("compare")
    tests = {}
    if ref in rows:
        for r in methods:
            if r == ref:
                continue
            seeds = [s for s in rows[r]["scores"] if s in rows[ref]["scores"]]
            a = [rows[r]["scores"][s] for s in seeds]
            b = [rows[ref]["scores"][s] for s in seeds]
            diff, p = paired_test(a, b)
            low, high = paired_ci(a, b)
            tests[r] = {"diff": diff, "p": p, "n": len(seeds), "low": low, "high": high}
    conflict = None
    pts = [(c["metrics"]["grad_cos/mean"], score(c)) for c in cells if "grad_cos/mean" in c["metrics"]]
    if pts:
        r, lo, hi = pearson([p[0] for p in pts], [p[1] for p in pts])
        conflict = {"r": r, "low": lo, "high": hi, "n": len(pts)}
    compute = {
        "cells": len(cells),
        "trial_epochs": sum(int(c.get("epochs") or 0) for c in cells)
        + sum(s.get("compute_trial_epochs", 0) for s in meta.get("searches", {}).values())
        + sum(s.get("compute_trial_epochs", 0) for s in (meta.get("tuned") or {}).values()),
        "hours": sum(float(c.get("seconds") or 0) for c in cells) / 3600,
    }
    compute["gpu_hours"] = compute["hours"] * float(meta.get("gpus_per_trial") or 0)
    steps = sorted({c.get("steps") for c in cells if c.get("steps") is not None})
    single = versus_single(meta, cells)
    return {
        "rows": rows,
        "tests": tests,
        "single": single,
        "conflict": conflict,
        "compute": compute,
        "steps": steps,
        "scores": score,
    }


def versus_single(meta: dict, cells: list[dict]) -> dict[str, dict[str, dict]]:
    """Every method row against the single-task baseline of each reported metric's task (same context), paired by
    seed: row -> metric -> {diff (signed so that > 0 is better), low, high (95% CI), p, n}."""
    tasks_of = meta.get("metric_tasks") or {  # older studies' meta: a metric's task is the part of its key it names
        m: t for m in meta.get("metrics", []) for t in meta.get("tasks", []) if t in m.split("/")
    }
    baseline: dict[tuple[str, str], dict] = {}  # (task, context) -> seed -> metrics
    for c in cells:
        if c["kind"] == "baseline":
            task = c["row"].split(", ", 1)[0].removeprefix("single-task ")
            baseline.setdefault((task, _context(c["row"])), {})[c["seed"]] = c["metrics"]
    contexts = {ctx for _, ctx in baseline if ctx}
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    by_row = defaultdict(dict)
    for c in cells:
        if c["kind"] != "baseline":
            by_row[c["row"]][c["seed"]] = c["metrics"]
    for row, seeds in by_row.items():
        parts = set(row.split(", "))
        ctx = next((x for x in contexts if set(x.split(", ")) <= parts), "")
        for m, task in tasks_of.items():
            base = baseline.get((task, ctx), {})
            pairs = [(seeds[s][m], base[s][m]) for s in seeds if s in base and m in seeds[s] and m in base[s]]
            if not pairs:
                continue
            sign = 1.0 if meta["directions"][m] else -1.0
            a, b = [sign * x for x, _ in pairs], [sign * y for _, y in pairs]
            diff, p = paired_test(a, b)
            low, high = paired_ci(a, b)
            out[row][m] = {"diff": diff, "low": low, "high": high, "p": p, "n": len(pairs)}
    return dict(out)


def verdict(diff: float, p: float) -> str:
    if math.isnan(p):
        return "not testable (fewer than 2 seeds or identical differences)"
    if p >= ALPHA:
        return "no significant difference"
    return "better" if diff > 0 else "worse"


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_report(folder: Path) -> Path:
    folder = Path(folder)
    meta, cells = load(folder)
    a = analyse(meta, cells)
    metrics, study = meta["metrics"], meta["study"]
    refs = study.get("references") or {}
    # results.csv: one line per cell
    axes = sorted({k for c in cells for k in ("row", "seed", "kind")})
    fields = [
        "id",
        *axes,
        "steps",
        "epochs",
        "seconds",
        *metrics,
        *sorted({k for c in cells for k in c["metrics"] if k.startswith("grad_cos/")}),
    ]
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for c in sorted(cells, key=lambda c: c["id"]):
            w.writerow({**c, **c["metrics"]})
    ref_row = study.get("compare")
    lines = [f"# Study `{study['name']}`", "", study.get("description", ""), "", f"Command: `{meta['command']}`", ""]
    if len(a["steps"]) == 1:
        lines.append(f"Every cell, single-task baselines included, trained {a['steps'][0]} optimiser steps.")
    else:
        lines.append(f"Cells trained different numbers of steps: {a['steps']} (a cell stopped early?).")
    c = a["compute"]
    lines += [
        f"Compute: {c['cells']} cells, {c['trial_epochs']} trial-epochs (searches included), {c['hours']:.2f} "
        f"hours of training, {c['gpu_hours']:.2f} GPU-hours.",
    ]
    copied = Counter(cell["copied_from"] for cell in cells if cell.get("copied_from"))
    if copied:  # cells another study trained with this training config (study.cells_from), counted above
        whence = ", ".join(f"{n} from `{folder}`" for folder, n in sorted(copied.items()))
        lines.append(
            f"Of these, {sum(copied.values())} cells were trained by another study with this training config and the "
            f"same overrides, and copied here (`study.cells_from`): {whence}."
        )
    lines += [
        "",
        "## Results (mean ± sd over seeds)",
        "",
    ]
    tested = ref_row in a["rows"]
    dm_head = {"nashmtl": "Δm% vs single-task (flat, lower is better)", "libmtl": "Δm% vs single-task (per task)"}
    head = ["row", "n", *metrics, dm_head.get(meta.get("delta_m"), "Δm% vs single-task"), "mean rank"]
    head += [f"vs {ref_row}: Δ score [95% CI], p", "verdict"] if tested else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ordered = sorted(a["rows"], key=lambda r: (a["rows"][r]["kind"] == "baseline", a["rows"][r].get("rank", 99), r))
    for r in ordered:
        row = a["rows"][r]
        if not any(row["stats"].values()):  # a baseline of a task the study does not report
            continue
        cellv = []
        for m in metrics:
            s = row["stats"][m]
            v = "" if s is None else f"{s[0]:.4f} ± {s[1]:.4f}"
            if m in refs.get(r, {}):
                v += f" (paper {refs[r][m]:g})"
            cellv.append(v)
        dm = [shown(meta, v) for v in (row["delta_m"] or {}).values()]
        dm_s = f"{np.mean(dm):+.2f} ± {np.std(dm, ddof=1) if len(dm) > 1 else 0:.2f}" if dm else ""
        if "delta_m" in refs.get(r, {}):
            dm_s += f" (paper {refs[r]['delta_m']:+g})"
        t = a["tests"].get(r)
        ci = "" if t is None or math.isnan(t.get("low", math.nan)) else f" [{t['low']:+.3f}, {t['high']:+.3f}]"
        test_s = "" if t is None else f"{t['diff']:+.3f}{ci}, p = {_fmt(t['p'], 3) or 'n/a'}"
        verd = "" if t is None else verdict(t["diff"], t["p"])
        n = max((s[2] for s in row["stats"].values() if s), default=0)
        tail = [test_s, verd] if tested else []
        lines.append("| " + " | ".join([r, str(n), *cellv, dm_s, _fmt(row.get("rank"), 2), *tail]) + " |")
    score_kind = (
        "Δm% against the single-task baselines"
        if any(a["rows"][r]["delta_m"] for r in a["rows"])
        else ("the mean of the direction-signed metrics")
    )
    if meta.get("delta_m") == "nashmtl" and score_kind.startswith("Δm"):
        score_kind = "minus its Δm% (Nash-MTL's Δm is lower-is-better; the score, like every other, higher)"
    lines += ["", f"Rows are ranked by each metric's mean; a row's score is {score_kind}."]
    if tested:
        lines.append(
            f"The paired tests compare each row's score with `{ref_row}`'s, paired by seed (two-sided t-test, "
            f"α = {ALPHA}); with few seeds only large differences can show."
        )
    if refs:
        lines.append(f"Published numbers: {study.get('reference_source') or 'the papers'}.")
    for label, rec in (meta.get("searches") or {}).items():  # what a search row retrained, and what it cost
        weights = ", ".join(f"{w:.3f}" for w in rec["best_weights"])
        lines.append(
            f"`{label}` searched for {rec['compute_trial_epochs']} trial-epochs; its best weights [{weights}] "
            f"(tasks {', '.join(meta['tasks'])}) were retrained per seed as its row."
        )
    for label, rec in (meta.get("tuned") or {}).items():  # what a tuned row found, and what finding it cost
        found = ", ".join(f"{k}={_num(v)}" for k, v in rec["found"].items())
        lines.append(
            f"`{label}` was tuned for {rec['compute_trial_epochs']} trial-epochs ({rec.get('trials')} trials, "
            f"{rec.get('stopped_early')} stopped early by ASHA) on the held-out part of the training split; it "
            f"found {found}, retrained per seed as its row."
        )
    if a["single"]:
        lines += [
            "",
            "## Against single-task (paired by seed)",
            "",
            "Each row's metric minus its task's single-task baseline of the same seed (signed so that > 0 is better), "
            "with its 95% confidence interval and the paired t-test's p.",
            "",
        ]
        ms = [m for m in metrics if any(m in v for v in a["single"].values())]
        lines += ["| row | " + " | ".join(ms) + " |", "|" + "---|" * (len(ms) + 1)]
        for r in ordered:
            if r not in a["single"]:
                continue
            vals = []
            for m in ms:
                t = a["single"][r].get(m)
                ci = "" if t is None or math.isnan(t["low"]) else f" [{t['low']:+.4f}, {t['high']:+.4f}]"
                vals.append("" if t is None else f"{t['diff']:+.4f}{ci}, p = {_fmt(t['p'], 3) or 'n/a'}")
            lines.append(f"| {r} | " + " | ".join(vals) + " |")
    if a["conflict"]:
        k = a["conflict"]
        lines += [
            "",
            "## Gradient conflict vs performance",
            "",
            f"Pearson r between each cell's mean pairwise task-gradient cosine and its score: r = {_fmt(k['r'], 3)} "
            f"(95% CI [{_fmt(k['low'], 3)}, {_fmt(k['high'], 3)}], {k['n']} cells). Royer et al. report r = 0.06.",
        ]
    pngs = plot(folder, meta, cells, a)
    if pngs:
        lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    log_wandb(folder, meta, pngs)
    return folder / "report.md"


def plot(folder: Path, meta: dict, cells: list[dict], a: dict) -> list[Path]:
    plt = _pyplot()
    metrics, rows, out = meta["metrics"], a["rows"], []
    names = sorted(rows, key=lambda r: (rows[r]["kind"] == "baseline", r))
    width = max(6, 0.5 * len(names)) * len(metrics) / 1.5
    fig, axes = plt.subplots(1, len(metrics), figsize=(width, 4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        have = [r for r in names if rows[r]["stats"][m]]
        ax.bar(range(len(have)), [rows[r]["stats"][m][0] for r in have], yerr=[rows[r]["stats"][m][1] for r in have])
        ax.set_xticks(range(len(have)), have, rotation=70, ha="right", fontsize="small")
        ax.set(title=m, ylabel=m)
    fig.tight_layout()
    fig.savefig(folder / "bars.png", dpi=110)
    plt.close(fig)
    out.append(folder / "bars.png")
    p_rows = {r: float(part[2:]) for r in rows for part in r.split(", ") if part.startswith("p=")}
    if p_rows:  # a weight grid: each metric vs p per capacity, the single-task result dashed; best p per capacity

        def ctx(r):
            return ", ".join(x for x in r.split(", ") if not x.startswith("p="))

        ctxs = sorted({ctx(r) for r in p_rows})
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
        best = {}
        for ax, m in zip(axes[0], metrics):
            for i, c in enumerate(ctxs):
                pts = sorted(
                    (p, rows[r]["stats"][m][0]) for r, p in p_rows.items() if ctx(r) == c and rows[r]["stats"][m]
                )
                color = f"C{i}"
                ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", color=color, label=c or "model")
                single = [
                    rows[r]["stats"][m][0]
                    for r in rows
                    if rows[r]["kind"] == "baseline" and rows[r]["stats"][m] and _context(r) == c
                ]
                if single:
                    ax.axhline(single[0], color=color, ls="--", lw=1)
            ax.set(xlabel=f"p (weight of {meta['tasks'][0]})", ylabel=m, title=m)
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(folder / "metric_vs_p.png", dpi=110)
        plt.close(fig)
        out.append(folder / "metric_vs_p.png")
        for c in ctxs:  # best p by the score (Δm% or the signed metrics' mean)
            best[c] = max((np.mean(list(rows[r]["scores"].values())), p) for r, p in p_rows.items() if ctx(r) == c)[1]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(list(best), list(best.values()), marker="o")
        ax.set(xlabel="capacity", ylabel="best p", ylim=(-0.05, 1.05), title="best weight vs capacity")
        fig.tight_layout()
        fig.savefig(folder / "best_p.png", dpi=110)
        plt.close(fig)
        out.append(folder / "best_p.png")
    if len(meta["tasks"]) == 2 and len(metrics) == 2:  # the Pareto front of task A vs task B
        ma, mb = metrics
        sa, sb = (1 if meta["directions"][m] else -1 for m in metrics)
        pts = [
            (rows[r]["stats"][ma][0], rows[r]["stats"][mb][0], r)
            for r in rows
            if rows[r]["kind"] != "baseline" and rows[r]["stats"][ma] and rows[r]["stats"][mb]
        ]

        def dominated(p):
            return any(sa * q[0] >= sa * p[0] and sb * q[1] >= sb * p[1] and q[:2] != p[:2] for q in pts)

        front = [p for p in pts if not dominated(p)]
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color="grey")
        for x, y, r in pts:
            ax.annotate(r, (x, y), fontsize=6)
        front.sort()
        ax.plot([p[0] for p in front], [p[1] for p in front], color="C3", marker="o", label="Pareto front")
        ax.set(xlabel=ma, ylabel=mb, title="task A vs task B")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(folder / "pareto.png", dpi=110)
        plt.close(fig)
        out.append(folder / "pareto.png")
    return out


def log_wandb(folder: Path, meta: dict, pngs: list[Path]) -> None:
    """With a wandb logger in the study's training config, log results.csv as a wandb.Table and the figures to one
    run in the study's group (the cells' W&B group), in the cells' project and mode."""
    w = meta.get("wandb")
    if not w:
        return
    import wandb

    rows = list(csv.reader(open(folder / "results.csv")))
    name = meta["study"]["name"]
    run = wandb.init(
        project=w["project"],
        entity=w.get("entity"),
        mode=w["mode"],
        group=name,
        name=f"{name}-report",
        job_type="report",
        dir=str(folder),
    )
    run.log({"results": wandb.Table(columns=rows[0], data=rows[1:]), **{p.stem: wandb.Image(str(p)) for p in pngs}})
    run.finish()
