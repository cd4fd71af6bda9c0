"""Δm%, the standard multi-task score (Maninis et al., CVPR 2019, arXiv:1904.08918), in two conventions
(`delta_m.convention`):

- `libmtl` (default; LibMTL and ForkMerge): Δm = 1/T Σ_t 1/|M_t| Σ_{m in M_t} ± (M_{t,m} - B_{t,m}) / B_{t,m} × 100,
  + where higher is better and - where lower is better: each task's metrics averaged first; higher is better.
- `nashmtl` (Nash-MTL, FAMO and the tables that reprint them): the flat mean over every metric of ∓ (M - B) / B ×
  100, - where higher is better: lower is better (a method better than the baselines has a negative Δm).

B are base results (single-task baselines). Metrics are named as logged without the stage: `acc/left`,
`seg/miou`, `depth/abs_err`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..console import warn
from ..errors import MTLError
from .base import Task

CONVENTIONS = ("libmtl", "nashmtl")


def delta_m(
    results: Mapping[str, float], base: Mapping[str, float], tasks: Sequence[Task], convention: str = "libmtl"
) -> float:
    """Δm% of `results` against `base` over `tasks`, over the metrics `base` has (all of them with single-task runs;
    papers often publish only some, e.g. ForkMerge's NYUv2 table), in `convention` (the module docstring)."""
    per_task = []
    for t in tasks:
        terms = []
        for m, higher in t.metrics.items():
            name = t.metric_name(m)
            if name in base:
                b, r = base[name], results[name]
                terms.append((1 if higher else -1) * (r - b) / b)
        per_task.append(terms)
    if convention == "nashmtl":
        flat = [x for terms in per_task for x in terms]
        return -100.0 * sum(flat) / len(flat)
    return 100.0 * sum(sum(terms) / len(terms) for terms in per_task) / len(per_task)


def delta_flag(cfg, has_base: bool) -> bool | str:
    """What `metric_directions` takes for Δm: False without base results, else the convention (its direction)."""
    return cfg.delta_m.convention if has_base else False


def check_base(base: Mapping[str, float], tasks: Sequence[Task], source: str) -> list[str]:
    """Refuse a base without any value for some task, or with a zero; return the metrics Δm leaves out."""
    names = [t.metric_name(m) for t in tasks for m in t.metrics]
    bare = [t.name for t in tasks if not any(t.metric_name(m) in base for m in t.metrics)]
    zero = [n for n in names if base.get(n) == 0]
    if bare or zero:
        what = f"no value for any metric of task(s) {bare}" if bare else f"a zero (Δm divides by it) for {zero}"
        raise MTLError(
            f"delta_m: the base results from {source} have {what}. Δm needs a non-zero base value for at least one "
            f"metric of every task, by name: {names}."
        )
    return [n for n in names if n not in base]


def read_base(numbers: Mapping[str, float], runs: Sequence[str], stage: str) -> dict[str, float]:
    """Base results: the given numbers, overridden by the `<stage>/...` metrics of single-task runs (their
    `metrics.json`): one's own baselines win over an experiment's published ones."""
    base = {k: float(v) for k, v in numbers.items()}
    for run in runs:
        path = Path(run).expanduser() / "metrics.json"
        if not path.is_file():
            raise MTLError(
                f"delta_m.runs names {run}, which holds no metrics.json: give the run directory of a finished "
                "single-task run (train() writes metrics.json there when it ends)."
            )
        prefix = f"{stage}/"
        for k, v in json.loads(path.read_text()).items():
            if k.startswith(prefix) and isinstance(v, int | float):
                base[k[len(prefix) :]] = float(v)
    return base


def delta_bases(cfg, tasks) -> dict[str, dict[str, float]]:
    """Per stage, the base results Δm% compares against; {} when none are configured. Validation must be covered;
    test/delta_m is left out, with a warning, when the base runs were not evaluated on the test split."""
    if cfg.delta_m.convention not in CONVENTIONS:
        raise MTLError(f"Unknown delta_m.convention={cfg.delta_m.convention!r}. Valid: {', '.join(CONVENTIONS)}.")
    if not cfg.delta_m.runs and not cfg.delta_m.base:
        return {}
    bases = {}
    for stage in ("val", "test"):
        base = read_base(cfg.delta_m.base, cfg.delta_m.runs, stage)
        source = f"delta_m.runs={list(cfg.delta_m.runs)} / delta_m.base ({stage} split)"
        try:
            left = check_base(base, tasks, source)
        except MTLError:
            if stage == "val":
                raise
            warn(f"No test/delta_m: the base results have no test-split values for every task ({source}).")
            continue
        if left:
            warn(f"{stage}/delta_m leaves out {left}: the base results give no value for them.")
        bases[stage] = base
    return bases
