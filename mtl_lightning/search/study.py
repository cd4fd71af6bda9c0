"""Studies: a paper's comparison as one command. Every cell (a method x a seed x a capacity ...) and every
single-task baseline is a Ray Tune trial running the search's trial code, all for the same number of optimiser
steps; the report (`mtl_lightning.search.report`) is rebuilt from the cells' results alone.

A study is a short YAML file in `experiments/studies/` (the typed `StudyConfig` below; a mistyped key fails):

    description: every weighting x 3 seeds on digits: uniform vs the optimisers
    exp: digits_mtl
    overrides: [trainer.max_epochs=3]
    axes:                               # crossed; `seed` pairs the cells of the paired tests
      weighting: [uniform, pcgrad, {name: cagrad, c: 0.2, label: cagrad-0.2}]
      seed: [0, 1, 2]
    baselines: true                     # single-task runs of every task, per seed (and capacity)
    searches: [{name: pbt, population: 4}]   # search the weights, retrain them per seed: a row "pbt"
    references: {uniform: {test/acc/left: 0.91}}   # published numbers, shown beside ours

Axis keys: `weighting` (a name, or a mapping with `name`, its options, an optional `label` and `overrides`, other
config keys that row sets, such as `[model.architecture=mmoe]`), `p` (the weight of
the first task, 1 - p on the second: two tasks), `capacity` ([depth, width]), `seed`, or any config key
(`optim.lr`, `data.tasks`, `model.kwargs.drop_rate` ...).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from ..checks import check_settings
from ..config import _schema, compose, flatten, write_atomic
from ..data import create_datamodule
from ..errors import MTLError
from ..loggers import wandb_mode
from ..model import metric_directions
from .budget import budget_overrides, equal_steps
from .config import compose_search, split_overrides
from .space import overrides_of

STUDY_DIR = Path(__file__).resolve().parents[2] / "experiments" / "studies"
SPECIAL_AXES = ("weighting", "p", "capacity", "seed")
BACKENDS = ("ray", "population")
CONTEXT_FREE = ("weighting", "p", "data.tasks", "seed")  # axes that do not change what the baselines train


@dataclass
class StudyConfig:
    name: str = ""  # the file's name
    description: str = ""  # one line, for --list
    exp: str = ""
    overrides: list[str] = field(default_factory=list)  # training overrides shared by every cell
    axes: dict[str, list[Any]] = field(default_factory=dict)
    baselines: bool = True  # single-task runs of every task, per seed and per value of the other context axes
    searches: list[dict[str, Any]] = field(default_factory=list)  # search configs whose found weights become rows
    # the budget of every tuned row (a weighting row with `tune: {space: ...}`): search.* keys of search=asha
    tune: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)  # default: every task's primary metric on test
    compare: str | None = "uniform"  # the row every other is tested against (paired by seed)
    references: dict[str, dict[str, float]] = field(default_factory=dict)  # row -> metric -> published number
    reference_source: str = ""  # where the references come from
    grad_cos_every: int = 0  # log the task gradients' pairwise cosines every N steps (the grad_cos_every key)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = -1.0  # -1: 1 with CUDA, else 0; fractions share a GPU
    num_cpus: int | None = None  # local Ray only; None: all
    max_failures: int = 0
    reuse_actors: bool = True  # a live Ray worker trains cell after cell (no new process, no re-import of torch)
    backend: str = "ray"  # ray: a Ray Tune trial per cell; population: cells that differ in weights and seed as one
    resume: bool = False  # continue: cells with results are not trained again; an axis may gain values
    # study folders whose cells, trained with this study's training config and the same overrides, are copied here
    # rather than trained again (a row run as a study of its own, then wanted in this one's table)
    cells_from: list[str] = field(default_factory=list)
    out_dir: str | None = None  # default: <the exp's out_dir>/studies/<name>


def study_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(STUDY_DIR.glob("*.yaml"))}


def list_studies() -> list[tuple[str, str]]:
    return [(n, str(OmegaConf.load(p).get("description", ""))) for n, p in study_files().items()]


def load_study(name: str, overrides: list[str]) -> tuple[StudyConfig, list[str]]:
    """The study NAME (or a YAML path), with `study.*`/`resume=` overrides applied; the rest are training overrides."""
    files = study_files()
    path = Path(name) if name.endswith((".yaml", ".yml")) else files.get(name)
    if path is None or not path.exists():
        raise MTLError(f"Unknown study {name!r}. Valid choices: {', '.join(files)} (or a path to a YAML file).")
    mine, rest = split_overrides(overrides, "study")
    schema = OmegaConf.structured(StudyConfig)
    try:
        given = OmegaConf.load(path)
    except yaml.YAMLError as e:  # the parser's own words, with the line: a bare `[a=[b]]` is the usual cause
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        raise MTLError(
            f"Bad study {path}{line}: {getattr(e, 'problem', None) or e} ({getattr(e, 'context', '') or 'YAML'}). "
            "A list item holding brackets or commas, such as plugins=[a.py,b.py], must be quoted in a YAML list: "
            "overrides: ['plugins=[a.py,b.py]', trainer.max_epochs=2]."
        ) from None
    try:
        merged = OmegaConf.merge(schema, given, OmegaConf.from_dotlist(mine))
        cfg = StudyConfig(**OmegaConf.to_container(merged, resolve=True))
    except Exception as e:
        msg = str(e).splitlines()[0]
        raise MTLError(f"Bad study {path}: {msg}. Valid keys: {', '.join(asdict(StudyConfig()))}.") from None
    cfg.name = cfg.name or path.stem
    if not cfg.exp:
        raise MTLError(f"Study {path} names no experiment: set exp (python -m experiments.run --list).")
    return cfg, rest


# -- cells --------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


def axis_value(key: str, value, tasks: list[str]) -> tuple[str, list[str]]:
    """(label, overrides) of one axis value."""
    if key == "weighting":
        if isinstance(value, str):
            return value, [f"weighting={value}"]
        if not isinstance(value, dict) or "name" not in value:
            raise MTLError(f"axes.weighting value {value!r} must be a weighting name or a mapping with `name`.")
        opts = {k: v for k, v in value.items() if k not in ("name", "label", "overrides", "tune")}
        extra = list(value.get("overrides", []))  # other keys the row sets (model.architecture=mmoe ...)
        label = value.get("label") or value["name"] + "".join(f" {k}={_fmt(v)}" for k, v in [*opts.items()])
        label += "".join(f" {o}" for o in extra) if not value.get("label") else ""
        return label, [f"weighting={value['name']}", *(f"weighting.{k}={_fmt(v)}" for k, v in opts.items()), *extra]
    if key == "p":
        if len(tasks) != 2:
            raise MTLError(
                f"axes.p sweeps the weight of the first of two tasks (1 - p on the second), but the study's "
                f"experiment has {len(tasks)} task(s) {tasks}: set data.tasks to two of them in the study's overrides."
            )
        if not 0 <= float(value) <= 1:
            raise MTLError(f"axes.p value {value} must lie within [0, 1].")
        p = float(value)
        return f"p={p:g}", ["weighting=fixed", f"weighting.weights=[{p},{1 - p}]"]
    if key == "capacity":
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise MTLError(f"axes.capacity value {value!r} must be a [depth, width] pair.")
        return f"{value[0]}x{value[1]}", [f"model.depth={value[0]}", f"model.width={value[1]}"]
    if key == "seed":
        return f"seed={value}", [f"seed={value}"]
    return f"{key}={_fmt(value)}", [f"{key}={_fmt(value)}"]


def slug(text: str) -> str:
    """A label as a file name."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")


def cell_id(label: str, seed) -> str:
    return slug(f"{label}__seed{seed}")


def native_context(cfg: StudyConfig, train_cfg, tasks: list[str]) -> list[str]:
    """Labels of the context axes (capacity ...) at the experiment's own values: a search runs there."""
    out = []
    for key in cfg.axes:
        if key in CONTEXT_FREE:
            continue
        if key == "capacity":
            value = [train_cfg.model.depth, train_cfg.model.width]
        else:
            value = OmegaConf.select(train_cfg, key)
            value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        out.append(axis_value(key, value, tasks)[0])
    return out


def make_cells(cfg: StudyConfig, tasks: list[str], base_seed: int, baseline_tasks: list[str] | None = None):
    """Every cell of the study: the crossed axes, then the single-task baselines (of `baseline_tasks`, default every
    task) per seed and context value."""
    if not cfg.axes:
        raise MTLError(f"Study {cfg.name} has no axes: give at least one (e.g. axes.weighting or axes.seed).")
    for key, values in cfg.axes.items():
        if not isinstance(values, list) or not values:
            raise MTLError(f"axes.{key} is empty: give it a list of at least one value.")
    seeds = cfg.axes.get("seed", [base_seed])
    keys = [k for k in cfg.axes if k != "seed"]
    labelled = {k: [axis_value(k, v, tasks) for v in cfg.axes[k]] for k in keys}
    cells = []
    for combo in itertools.product(*(labelled[k] for k in keys)) if keys else [()]:
        row = ", ".join(lbl for lbl, _ in combo) or "default"
        for s in seeds:
            over = [o for _, ov in combo for o in ov] + [f"seed={s}"]
            cell = {"id": cell_id(row, s), "row": row, "seed": s, "overrides": over, "kind": "method"}
            labels = {k: lbl for k, (lbl, _) in zip(keys, combo)}
            cells.append({**cell, "axes": {k: ov for k, (_, ov) in zip(keys, combo)}, "labels": labels})
    if cfg.baselines:  # per seed, and per value of the axes that change the model or the data, not the weighting
        context = [k for k in keys if k not in CONTEXT_FREE]
        for combo in itertools.product(*(labelled[k] for k in context)) if context else [()]:
            ctx = ", ".join(lbl for lbl, _ in combo)
            for t in tasks if baseline_tasks is None else baseline_tasks:
                row = f"single-task {t}" + (f", {ctx}" if ctx else "")
                for s in seeds:
                    over = [o for _, ov in combo for o in ov] + ["weighting=uniform", f"data.tasks=[{t}]", f"seed={s}"]
                    cells.append({"id": cell_id(row, s), "row": row, "seed": s, "overrides": over, "kind": "baseline"})
    ids = [c["id"] for c in cells]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise MTLError(f"Study {cfg.name}: axis values give the same cell twice ({dup[:3]}): label them apart.")
    return cells


def check_cells(cfg: StudyConfig, cells: list[dict], overrides: list[str]) -> None:
    """Compose every distinct cell config now: a mistyped axis key fails here, named, not inside a trial."""
    seen = set()
    for c in cells:
        over = tuple(o for o in c["overrides"] if not o.startswith("seed="))
        if over in seen:
            continue
        seen.add(over)
        try:
            check_settings(compose(cfg.exp, [*cfg.overrides, *overrides, *over]))
        except MTLError as e:
            axis = next(
                (k for k, ov in c.get("axes", {}).items() if any(f"'{o.split('=', 1)[0]}'" in str(e) for o in ov)),
                None,
            )
            where = f"axis {axis!r}" if axis else f"cell {c['row']!r}"
            raise MTLError(
                f"Study {cfg.name}: {where} gives a config the experiment rejects: {e} Axis keys are "
                f"{', '.join(SPECIAL_AXES)} or a config key."
            ) from None


# -- tuned rows ---------------------------------------------------------------------------------------------
TUNE_KEYS = ("scheduler", "trials", "grace_period", "reduction_factor", "algo", "train_fraction", "seed", "metric")


def tuned_rows(cfg: StudyConfig, tasks: list[str]) -> dict[str, dict]:
    """The weighting rows with `tune: {space: ...}`, by label: their overrides, space and budget (the study's `tune`,
    which a row may repeat but not change: every tuned row gets the same trials and epochs). A `space` in the study's
    `tune` tunes every row over it (a row's own space adds its method's keys)."""
    study = dict(cfg.tune or {})
    common = dict(study.pop("space", None) or {})
    out = {}
    for value in cfg.axes.get("weighting", []):
        if not common and not (isinstance(value, dict) and "tune" in value):
            continue
        label, over = axis_value("weighting", value, tasks)
        spec = dict((value.get("tune") if isinstance(value, dict) else None) or {})
        space = {**common, **dict(spec.pop("space", None) or {})}
        if not space:
            raise MTLError(
                f"Study {cfg.name}: row {label!r} has `tune` without a `space`: give the keys to tune, e.g. "
                "tune: {space: {optim.lr: loguniform(1e-4, 1e-2)}}."
            )
        out[label] = {"overrides": over, "space": space, "budget": {**study, **spec}}
    for label, row in out.items():
        bad = [k for k in row["budget"] if k not in TUNE_KEYS]
        if bad:
            raise MTLError(
                f"Study {cfg.name}: tune keys {bad} of row {label!r} are unknown. Valid keys: {', '.join(TUNE_KEYS)}."
            )
        if row["budget"].get("scheduler", "asha") != "asha":
            raise MTLError(
                f"Study {cfg.name}: row {label!r} tunes with scheduler={row['budget']['scheduler']!r}; a tuned row "
                "finds one configuration to retrain per seed, which is what search=asha gives (scheduler: asha)."
            )
    budgets = {json.dumps(r["budget"], sort_keys=True) for r in out.values()}
    if len(budgets) > 1:
        raise MTLError(
            f"Study {cfg.name}: every tuned row gets the same budget, but the rows give {sorted(budgets)}: put the "
            "budget (trials, grace_period ...) in the study's `tune` and only the space in each row."
        )
    return out


def tune_keys(row: dict) -> list[str]:
    """A tuned row as search overrides: ASHA over its space, with the row's own weighting (no weights searched)."""
    from .space import flat_space

    budget = {k: v for k, v in row["budget"].items() if k != "scheduler"}
    keys = ["search=asha", "search.weights=false", *(f"search.{k}={_fmt(v)}" for k, v in budget.items())]
    return keys + [f"search.space.{k}={_fmt(v)}" for k, v in flat_space(row["space"]).items()]


def _run_tuned_row(cfg: StudyConfig, label: str, row: dict, shared: list[str], out: Path) -> dict:
    """ASHA over a row's space on the held-out split; the best configuration is kept in searches/tune-<label>.json."""
    from .driver import run_search

    path = record_path(out, label, tuned=True)
    if path.exists():
        return json.loads(path.read_text())
    over = [*shared, *row["overrides"], *tune_keys(row), f"search.storage_path={out / 'searches'}"]
    over.append(f"search.name_suffix=tune-{slug(label)}")
    if cfg.num_cpus:
        over.append(f"search.num_cpus={cfg.num_cpus}")
    scfg, rest = compose_search(cfg.exp, over)
    print(f"tuning {label} ({scfg.trials} trials, ASHA; their output goes to their console.log)")
    res = run_search(cfg.exp, rest, scfg, quiet=True)
    trials = res.get("trials_record", {})
    record = {
        "found": res["best_params"],
        "compute_trial_epochs": res["compute_trial_epochs"],
        "trials": trials.get("trials"),
        "stopped_early": trials.get("stopped_early"),
        "search_dir": str(Path(res["search_dir"]).relative_to(out)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=1))
    return record


# -- running --------------------------------------------------------------------------------------------------
def study_dir(cfg: StudyConfig, train_cfg) -> Path:
    return Path(cfg.out_dir or Path(train_cfg.out_dir) / "studies" / cfg.name).expanduser().resolve()


def _cell_results_callback(out: Path, total: int, done: int):
    """Driver side: write each finished cell's last result to cells/<id>.json (atomically), the resume record, and
    show the study's progress on the console (cells done / total, the cell starting, time left, failures). The
    cells' own output goes to their run directories' console.log."""
    from ray import tune

    class CellResults(tune.Callback):
        def __init__(self):
            self.done, self.finished_here, self.started = done, 0, None

        def _left(self) -> str:
            if not self.finished_here:
                return ""
            per_cell = (time.monotonic() - self.started) / self.finished_here
            return f", about {_duration(per_cell * (total - self.done))} left"

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started = self.started or time.monotonic()  # Ray's start-up is not a cell's time
            print(f"[{self.done}/{total}] training {trial.config['cell']['id']}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            cell = trial.config["cell"]
            metrics = {k: v for k, v in r.items() if k.startswith(("val/", "test/", "grad_cos/"))}
            run_dir = Path(trial.config["runs_dir"]) / trial.config["exp"] / cell["id"]
            record = {
                **{k: cell[k] for k in ("id", "row", "seed", "kind", "overrides")},
                "metrics": metrics,
                "steps": r.get("step"),
                "epochs": max(0, int(r.get("training_iteration") or 1) - 1),  # less the final (test) report
                "seconds": r.get("time_total_s"),
                "run_dir": str(run_dir.relative_to(out)),  # relative to the study's folder, which can move
            }
            write_atomic(out / "cells" / f"{cell['id']}.json", json.dumps(record, indent=1))
            self.done, self.finished_here = self.done + 1, self.finished_here + 1
            print(f"[{self.done}/{total}] done {cell['id']} in {_duration(r.get('time_total_s') or 0)}{self._left()}")

        def on_trial_error(self, iteration, trials, trial, **info):
            cell = trial.config["cell"]
            log = Path(trial.config["runs_dir"]) / trial.config["exp"] / cell["id"] / "console.log"
            print(f"[{self.done}/{total}] FAILED {cell['id']}: {_first_line(trial)} (its output: {log})")

    return CellResults()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _first_line(trial) -> str:
    """The last line of a failed trial's error (the exception itself), from Tune's error file."""
    try:
        lines = [x for x in Path(trial.path, "error.txt").read_text().splitlines() if x.strip()]
        return lines[-1].strip()
    except (OSError, TypeError):
        return "see Tune's error.txt"


@dataclass
class Plan:
    """What a study will train and report, checked before anything trains."""

    train_cfg: Any  # the experiment's config with the study's and the command line's overrides
    tasks: list[str]
    cells: list[dict]  # the crossed axes and the baselines; search rows are added once their searches ran
    search_rows: dict[str, str]  # search label -> its row (the label at the experiment's own context)
    tuned: dict[str, dict]  # weighting label -> its tuned row (tuned_rows)
    metrics: list[str]
    directions: dict[str, bool]  # metric -> higher is better
    metric_tasks: dict[str, str]  # metric -> its task
    extra: list[str]  # training overrides the study itself adds (gradient-conflict logging)


def plan_study(cfg: StudyConfig, overrides: list[str]) -> Plan:
    """Compose and check every cell, metric and reference of the study: a bad study fails here, named."""
    train_cfg = compose(cfg.exp, [*cfg.overrides, *overrides])
    dm = create_datamodule(train_cfg.data, train_cfg.seed)
    tasks = [t.name for t in dm.tasks]
    metrics = cfg.metrics or [t.key("test", t.primary) for t in dm.tasks]
    directions = {**metric_directions(dm.tasks, "val", False), **metric_directions(dm.tasks, "test", False)}
    bad = [m for m in metrics if m not in directions]
    if bad:
        raise MTLError(f"Study {cfg.name}: metrics {bad} are not logged. Valid choices: {', '.join(directions)}.")
    # a task's baseline is trained only when a reported metric is its own (or an aggregate such as acc_mean)
    own = {
        t.name: {k for st in ("val", "test") for k in (f"{st}/loss/{t.name}", *(t.key(st, m) for m in t.metrics))}
        for t in dm.tasks
    }
    aggregate = any(all(m not in keys for keys in own.values()) for m in metrics)
    baseline_tasks = tasks if aggregate else [t for t in tasks if own[t] & set(metrics)]
    cells = make_cells(cfg, tasks, train_cfg.seed, baseline_tasks)
    context = native_context(cfg, train_cfg, tasks)  # a search runs at the experiment's own capacity ...
    search_rows = {}
    for spec in cfg.searches:
        if _search_name(spec) not in ("pbt", "pb2"):
            raise MTLError(f"Study {cfg.name}: searches are pbt or pb2, not {_search_name(spec)!r} (a grid is axes.p).")
        try:  # a bad search key, or a training override no search trial can take, fails now
            compose_search(cfg.exp, [*cfg.overrides, *overrides, *_search_keys(spec)])
        except MTLError as e:
            raise MTLError(f"Study {cfg.name}, search row {_search_label(spec)}: {e}") from None
        search_rows[_search_label(spec)] = ", ".join([_search_label(spec), *context])
    tuned = tuned_rows(cfg, tasks)
    for label, row in tuned.items():  # a bad space or budget fails now, named
        try:
            compose_search(cfg.exp, [*cfg.overrides, *overrides, *row["overrides"], *tune_keys(row)])
        except MTLError as e:
            raise MTLError(f"Study {cfg.name}, tuned row {label!r}: {e}") from None
    rows = list(dict.fromkeys([c["row"] for c in cells] + list(search_rows.values())))
    for row, refs in cfg.references.items():
        if row not in rows:
            raise MTLError(f"Study {cfg.name}: references.{row} names no row of the study. Rows: {', '.join(rows)}.")
        unknown = [m for m in refs if m not in metrics and m != "delta_m"]  # (a published Δm%, beside ours)
        if unknown:
            raise MTLError(
                f"Study {cfg.name}: references.{row} gives {unknown}, which the study does not report. "
                f"Reported metrics: {', '.join(metrics)}."
            )
    if cfg.grad_cos_every < 0:
        raise MTLError(f"study.grad_cos_every={cfg.grad_cos_every} must be >= 0 (0: off).")
    if cfg.backend not in BACKENDS:
        raise MTLError(f"Unknown study.backend={cfg.backend!r}. Valid choices: {', '.join(BACKENDS)}.")
    extra = [f"grad_cos_every={cfg.grad_cos_every}"] if cfg.grad_cos_every else []
    check_cells(cfg, cells, [*overrides, *extra])
    if cfg.backend == "population":  # every population the cells make passes its checks before anything trains
        from ..population import check_population

        jobs, _ = population_jobs(cells, tasks, [*cfg.overrides, *overrides, *extra])
        for job in jobs.values():
            try:
                check_population(compose(cfg.exp, job))
            except MTLError as e:
                raise MTLError(f"Study {cfg.name} with study.backend=population: {e}") from None
    metric_tasks = {m: t.name for m in metrics for t in dm.tasks if m in own[t.name]}
    return Plan(train_cfg, tasks, cells, search_rows, tuned, metrics, directions, metric_tasks, extra)


# what changes a study's results: a resumed study must match them (not num_cpus, references or the report's rows)
RESULT_KEYS = ("exp", "overrides", "axes", "baselines", "searches", "tune", "grad_cos_every", "backend")
# config keys that say where outputs go and how they are shown, not what trains
NOT_RESULTS = ("out_dir", "run_name", "resume", "logger", "wandb.", "trainer.enable_progress_bar")


def plan_record(cfg: StudyConfig, plan: Plan) -> dict:
    """What made a study folder: the study's result keys and the training config they compose to, flattened."""
    config = flatten(OmegaConf.to_container(plan.train_cfg, resolve=True))
    return {
        "study": {k: getattr(cfg, k) for k in RESULT_KEYS},
        "config": {k: v for k, v in config.items() if not k.startswith(NOT_RESULTS)},
    }


def typed_defaults(train_cfg) -> dict:
    """Each key's default in a plan record's sections: the study's, and the typed base's (for the mixture and method
    of `train_cfg`, flattened)."""
    config = flatten(OmegaConf.to_container(_schema(train_cfg.data.name, train_cfg.weighting.name)))
    return {"study": asdict(StudyConfig()), "config": config}


def check_reuse(out: Path, made_by: dict, resume: bool, defaults: dict | None = None) -> None:
    """A study folder is reused only with resume=true, and only by the study that made it: otherwise its searches
    and cells would be credited to another command. Refuses in one paragraph naming what differs."""
    held = [p for p in (out / "meta.json", *out.glob("cells/*.json"), *out.glob("searches/*.json")) if p.exists()]
    if not held:
        return
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    command = meta.get("command", "unknown")
    if not resume:
        raise MTLError(
            f"{out} holds a study already (made by `{command}`): continue it with resume=true and the same study and "
            "overrides, or write this one elsewhere with study.out_dir=PATH. Nothing was written."
        )
    old = meta.get("plan") or {"study": {k: v for k, v in meta.get("study", {}).items() if k in RESULT_KEYS}}
    gained = axes_gained(old.get("study", {}).get("axes"), made_by["study"]["axes"])
    diffs = plan_diffs(old, made_by, skip=("axes",) if gained is not None else (), defaults=defaults)
    if diffs:
        raise MTLError(
            f"resume=true continues the study in {out}, but this command describes another study: "
            f"{'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''}. Resume it with the command that made it "
            f"(`{command}`), or write this one elsewhere with study.out_dir=PATH (an axis may gain values: the "
            "cells it had are kept). Nothing was written."
        )
    for axis, values in (gained or {}).items():
        print(f"study.axes.{axis} gained {', '.join(map(_fmt, values))}: only the cells they add are trained")


def restore_search_records(out: Path) -> None:
    """A resumed study reuses its searches' and tuned rows' results: a folder that ships without searches/ (as
    reproduction/ does) has them in meta.json only, so they are written back to searches/ before meta.json is
    rewritten; otherwise the search would run again and its rows' cells be credited to weights it did not find."""
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    records = {record_path(out, label): rec for label, rec in (meta.get("searches") or {}).items()}
    records.update({record_path(out, label, tuned=True): rec for label, rec in (meta.get("tuned") or {}).items()})
    for path, rec in records.items():
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(rec, indent=1))


def record_path(out: Path, label: str, tuned: bool = False) -> Path:
    """Where a search row's result is kept (searches/<label>.json), or a tuned row's (searches/tune-<label>.json)."""
    return out / "searches" / (f"tune-{slug(label)}.json" if tuned else f"{label}.json")


def plan_diffs(there_plan: dict, here_plan: dict, skip=(), defaults: dict | None = None) -> list[str]:
    """What differs between two plan records (`plan_record`), as `key <there> there, <here> here`; study keys in
    `skip` are not compared. A key added since a folder was made, at its default (falsy, or `defaults[section][key]`)
    is no difference: a key is added with the default that trains as before."""
    diffs = []
    for section, here in here_plan.items():
        there = there_plan.get(section)
        if there is None:  # a study folder from before the config was recorded: its study keys only
            continue
        for k in [*here, *(k for k in there if k not in here)]:
            if section == "study" and k in skip:
                continue
            if k not in there and (not here.get(k) or (defaults or {}).get(section, {}).get(k, ...) == here.get(k)):
                continue
            if here.get(k) != there.get(k):
                diffs.append(
                    f"{'study.' if section == 'study' else ''}{k} {there.get(k)!r} there, {here.get(k)!r} here"
                )
    return diffs


def axes_gained(there: dict | None, here: dict) -> dict[str, list] | None:
    """The values each axis gained from `there` to `here` (a study given new rows or seeds), or None where the axes
    differ otherwise (an axis added, dropped, or a value gone: its cells would stay in the report)."""
    if there is None or set(there) != set(here):
        return None
    key = lambda v: json.dumps(v, sort_keys=True)  # noqa: E731  (a weighting value may be a mapping)
    gained = {}
    for axis, values in here.items():
        had = {key(v) for v in there[axis]}
        if not had <= {key(v) for v in values}:
            return None
        if new := [v for v in values if key(v) not in had]:
            gained[axis] = new
    return gained


# what trains a cell: a folder whose cells may be copied (`cells_from`) matches these and the composed config
CELL_KEYS = ("exp", "overrides", "grad_cos_every", "backend")


def cell_sources(cfg: StudyConfig, made_by: dict, steps: int, defaults: dict | None = None) -> list[Path]:
    """`study.cells_from`, checked before anything is written: each folder a study wrote with this study's training
    config (`CELL_KEYS`, the composed config and the steps); a folder made otherwise is refused in one paragraph
    naming what differs."""
    for folder in map(Path, cfg.cells_from):
        if not (folder / "meta.json").exists():
            raise MTLError(
                f"study.cells_from: {folder} is not a study folder (it has no meta.json): give a folder a study "
                "wrote, such as runs/studies/<name> or reproduction/<name>. Nothing was written."
            )
        meta = json.loads((folder / "meta.json").read_text())
        if "plan" not in meta:
            raise MTLError(
                f"study.cells_from: {folder} was made before studies recorded the training config their cells ran "
                "with (meta.json has no `plan`), so its cells cannot be checked against this study's: train them "
                "here (leave the folder out). Nothing was written."
            )
        there = {"study": {k: meta["plan"]["study"].get(k) for k in CELL_KEYS}, "config": meta["plan"]["config"]}
        here = {"study": {k: made_by["study"][k] for k in CELL_KEYS}, "config": made_by["config"]}
        diffs = plan_diffs(there, here, defaults=defaults)
        diffs += [f"steps {meta['steps']} there, {steps} here"] if meta["steps"] != steps else []
        if diffs:
            raise MTLError(
                f"study.cells_from: the cells in {folder} were trained otherwise than this study's: "
                f"{'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''}. Only cells trained with the same "
                "training config can share a table: train them here (leave the folder out). Nothing was written."
            )
    return [Path(f) for f in cfg.cells_from]


def copy_cells(sources: list[Path], pending: list[dict], out: Path) -> list[dict]:
    """Each pending cell that a source folder (`cell_sources`) holds with the same overrides is copied to
    cells/<id>.json, naming the folder it came from. Returns the cells left to train."""
    left = list(pending)
    for folder in sources:
        for c in list(left):
            src = folder / "cells" / f"{c['id']}.json"
            record = json.loads(src.read_text()) if src.exists() else None
            if record is None or record["overrides"] != c["overrides"]:
                continue
            record.update(copied_from=str(folder), run_dir=os.path.relpath(folder / record["run_dir"], out))
            write_atomic(out / "cells" / f"{c['id']}.json", json.dumps(record, indent=1))
            left.remove(c)
    if copied := len(pending) - len(left):
        print(f"{copied} cell(s) copied from {', '.join(map(str, sources))}: trained there with this training config")
    return left


def run_study(cfg: StudyConfig, overrides: list[str], command: str | None = None) -> Path:
    """Train every cell not yet done (each a Ray Tune trial), then write the report. Returns the study's folder.

    `command`: the command line that reproduces the study (the report shows it); by default the study's name with
    the training overrides."""
    from ray import tune

    from .ray_session import ray_session
    from .report import write_report
    from .trial import trial

    plan = plan_study(cfg, overrides)
    train_cfg, tasks, cells, metrics, extra = plan.train_cfg, plan.tasks, plan.cells, plan.metrics, plan.extra
    steps = equal_steps(train_cfg)
    out = study_dir(cfg, train_cfg)
    made_by, defaults = plan_record(cfg, plan), typed_defaults(train_cfg)
    check_reuse(out, made_by, cfg.resume, defaults)
    sources = cell_sources(cfg, made_by, steps, defaults)
    if cfg.resume:
        restore_search_records(out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "study": asdict(cfg),
        "plan": made_by,  # what a resume must match
        "command": command or "python -m experiments.study " + shlex.join([cfg.name, *overrides]),
        "tasks": tasks,
        "metrics": metrics,
        "directions": {m: plan.directions[m] for m in metrics},
        "metric_tasks": plan.metric_tasks,  # what Δm% averages per task first (LibMTL's convention)
        "delta_m": train_cfg.delta_m.convention,
        "steps": steps,
        "gpus_per_trial": None,
        "searches": {},
        "tuned": {},  # tuned row -> the options found, and what finding them cost
        "wandb": None,  # where the report's table and figures go, beside the cells' runs
    }
    if "wandb" in [n.strip() for n in train_cfg.logger.split(",")]:
        w = train_cfg.wandb
        meta["wandb"] = {"project": w.project, "entity": w.entity, "mode": wandb_mode(train_cfg)}
    gpus = cfg.gpus_per_trial if cfg.gpus_per_trial >= 0 else float(_cuda())
    meta["gpus_per_trial"] = gpus
    write_atomic(out / "meta.json", json.dumps(meta, indent=1))  # before any search: the folder says what made it
    shared = [*cfg.overrides, *overrides, *extra, "trainer.enable_progress_bar=false"]
    common = [*shared, *budget_overrides(steps)]
    for spec in cfg.searches:  # search the weights first; the found weights are retrained per seed like any row
        label, weights, record = _run_search_row(cfg, spec, shared, out)
        meta["searches"][label] = record
        row = plan.search_rows[label]  # Δm against the baselines it ran beside
        for s in cfg.axes.get("seed", [train_cfg.seed]):
            over = ["weighting=fixed", f"weighting.weights={_fmt(weights)}", f"seed={s}"]
            cells.append({"id": cell_id(row, s), "row": row, "seed": s, "overrides": over, "kind": "search"})
    for label, row in plan.tuned.items():  # tune each tuned row's options, then train them per seed
        record = _run_tuned_row(cfg, label, row, shared, out)
        meta["tuned"][label] = record
        for c in cells:
            if c.get("labels", {}).get("weighting") == label:
                c["overrides"] = [*c["overrides"], *overrides_of(record["found"])]
    write_atomic(out / "meta.json", json.dumps(meta, indent=1))
    pending = [c for c in cells if not (cells_dir / f"{c['id']}.json").exists()]
    pending = copy_cells(sources, pending, out)
    if pending and cfg.backend == "population":
        _population_cells(cfg, plan, pending, common, out, len(cells), steps)
    elif pending:
        tune_run = f"cells-{time.strftime('%Y%m%d-%H%M%S')}"  # one per attempt: a resumed study's cells start afresh
        base = {
            "exp": cfg.exp,
            "overrides": common,
            "num_tasks": len(tasks),
            "search": cfg.name,  # the W&B group of every cell's run
            "metric": metrics[0],
            "sign": 1.0,
            "final_report": True,
            "runs_dir": str(out / "tune" / tune_run / "runs"),  # each cell's run directory: runs/<exp>/<cell id>
            "quiet": True,  # the cell's output goes to console.log in its run directory; the console shows progress
        }
        space = {**base, "cell": tune.grid_search(pending)}
        space["extra"] = tune.sample_from(lambda config: config["cell"]["overrides"])
        trainable = tune.with_resources(trial, {"cpu": cfg.cpus_per_trial, "gpu": gpus})
        run_config = tune.RunConfig(
            name=tune_run,
            storage_path=str(out / "tune"),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[_cell_results_callback(out, len(cells), len(cells) - len(pending))],
            verbose=0,
        )
        tune_config = tune.TuneConfig(reuse_actors=cfg.reuse_actors)
        with ray_session(
            cfg.num_cpus, quiet=True, plugins=train_cfg.plugins
        ):  # the console shows the cells' progress (above) and problems
            tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config).fit()
    done = [c for c in cells if (cells_dir / f"{c['id']}.json").exists()]
    if not done:
        raise MTLError(f"Every cell of study {cfg.name} failed; see the trials' logs in {out / 'tune'}.")
    failed = [c["id"] for c in cells if c not in done]
    if failed:
        print(f"{len(failed)} cell(s) failed (rerun with resume=true to retry them): {', '.join(failed[:5])}")
    write_report(out)
    return out


def _as_member(cell: dict, tasks: list[str]) -> tuple[list[str], list[float], int, str | None]:
    """(context overrides, weights, seed, baseline task) of a cell a population can train as a member; a cell of
    another weighting stops the study with the reason and the alternative."""
    ctx, weights, seed, task, name = [], None, 0, None, "uniform"
    for o in cell["overrides"]:
        key, _, value = o.partition("=")
        if key == "weighting":
            name = value
        elif key == "weighting.weights":
            weights = [float(x) for x in value.strip("[]").split(",")]
        elif key == "seed":
            seed = int(value)
        elif key == "data.tasks" and cell["kind"] == "baseline":
            task = value.strip("[]")
        elif key.startswith("weighting.") or (key == "data.tasks"):
            name = f"{name} with {key}"
        else:
            ctx.append(o)
    if name not in ("uniform", "fixed"):
        raise MTLError(
            f"study.backend=population trains cells that differ in scalarization weights and seed as members of one "
            f"model; cell {cell['id']!r} uses weighting={name}, which a population cannot run per member. Use "
            "study.backend=ray."
        )
    if task is not None:  # a single-task baseline: the member that weights only its task
        weights = [1.0 if t == task else 0.0 for t in tasks]
    elif weights is None:
        weights = [1.0] * len(tasks)
    return ctx, [w / sum(weights) for w in weights], seed, task


def population_jobs(cells: list[dict], tasks: list[str], common: list[str]) -> tuple[dict[str, list[str]], list]:
    """study.backend=population: `cells` grouped by everything but their weights and seed (capacity ...), each group
    one population. Returns each population's overrides by run name, and each group's (cell, weights, seed, baseline
    task) members; a cell no population can train stops with the reason."""
    from .population import _weights_arg

    groups: dict[tuple, list] = {}
    for c in cells:
        ctx, w, seed, task = _as_member(c, tasks)
        groups.setdefault(tuple(ctx), []).append((c, w, seed, task))
    jobs = {}
    for g, (ctx, members) in enumerate(groups.items()):
        seeds = ",".join(str(m[2]) for m in members)
        jobs[f"population-{g}"] = [*common, *ctx, _weights_arg([m[1] for m in members]), f"population.seeds=[{seeds}]"]
        jobs[f"population-{g}"] += ["population.normalize=false", "test=true"]
    return jobs, list(groups.values())


def _population_cells(
    cfg: StudyConfig, plan: Plan, pending: list[dict], common: list[str], out: Path, total: int, steps: int
) -> None:
    """study.backend=population: each group of pending cells one population (`population_jobs`); every member's
    final metrics become its cell's record, as a Ray cell's would."""
    from ..data import create_datamodule
    from .population import run_populations

    tasks = create_datamodule(plan.train_cfg.data, plan.train_cfg.seed).tasks
    own = {
        t.name: {k for st in ("val", "test") for k in (f"{st}/loss/{t.name}", *(t.key(st, m) for m in t.metrics))}
        for t in tasks
    }
    jobs, groups = population_jobs(pending, plan.tasks, common)
    print(f"{len(pending)} cells as {len(jobs)} population(s) of {', '.join(str(len(m)) for m in groups)}")
    start = time.monotonic()
    runs = out / "populations" / time.strftime("%Y%m%d-%H%M%S")
    results = run_populations(cfg.exp, jobs, runs, cfg.num_cpus, cfg.cpus_per_trial, cfg.gpus_per_trial, quiet=True)
    seconds = time.monotonic() - start
    done = total - len(pending)
    for (name, metrics), members in zip(results.items(), groups):
        for i, (c, _, _, task) in enumerate(members):
            mine = {k[: -len(f"/m{i}")]: v for k, v in metrics.items() if k.endswith(f"/m{i}")}
            if task is not None:  # a baseline reports its own task only, as a single-task run would
                mine = {k: v for k, v in mine.items() if k in own[task]}
            record = {
                **{k: c[k] for k in ("id", "row", "seed", "kind", "overrides")},
                "metrics": mine,
                "steps": steps,
                "epochs": plan.train_cfg.trainer.max_epochs,  # the budget equal_steps derives the steps from
                "seconds": seconds / len(pending),  # the populations' wall time, shared among their members
                "run_dir": str((runs / cfg.exp / name).relative_to(out)),
            }
            write_atomic(out / "cells" / f"{c['id']}.json", json.dumps(record, indent=1))
            done += 1
    print(f"[{done}/{total}] done, {len(jobs)} population(s) in {_duration(seconds)}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _search_name(spec: dict) -> str:
    return spec.get("name", "pbt")


def _search_label(spec: dict) -> str:
    """A search's row label: its `label`, else its name."""
    return spec.get("label", _search_name(spec))


def _search_keys(spec: dict) -> list[str]:
    """A study's search entry ({name: pbt, population: 4, label: ...}) as `search.*` overrides."""
    opts = (f"search.{k}={_fmt(v)}" for k, v in spec.items() if k not in ("name", "label"))
    return [f"search={_search_name(spec)}", *opts]


def _run_search_row(cfg: StudyConfig, spec: dict, shared: list[str], out: Path) -> tuple[str, list[float], dict]:
    """A search (PBT, PB2) whose best weights become a row; its result is kept in searches/<label>.json."""
    from .driver import run_search

    label = _search_label(spec)
    path = record_path(out, label)
    if path.exists():
        record = json.loads(path.read_text())
        return label, record["best_weights"], record
    # PBT's clock is the epoch: the search trains the experiment's epochs, its retrained rows the study's steps
    over = [*shared, *_search_keys(spec), f"search.storage_path={out / 'searches'}", f"search.name_suffix={label}"]
    if cfg.num_cpus and "num_cpus" not in spec:  # the study's local Ray size, for its search too
        over.append(f"search.num_cpus={cfg.num_cpus}")
    scfg, rest = compose_search(cfg.exp, over)
    print(f"searching the weights with {label} ({scfg.population} trials; their output goes to their console.log)")
    res = run_search(cfg.exp, rest, scfg, quiet=True)
    record = {
        "best_weights": list(res["best_weights"]),
        "compute_trial_epochs": res["compute_trial_epochs"],
        "search_dir": str(Path(res["search_dir"]).relative_to(out)),  # relative to the study's folder
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=1))
    return label, record["best_weights"], record


__all__ = ["StudyConfig", "list_studies", "load_study", "make_cells", "run_study"]
