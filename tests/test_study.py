"""Studies: a tiny study end to end on Ray (cells, baselines, equal steps, report, rebuild, resume), the statistics on
hand-made tables, gradient-conflict logging, and bad study files."""

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from fixtures import stand_in_start

from experiments.run import run
from experiments.study import main
from mtl_lightning.config import compose
from mtl_lightning.errors import MTLError
from mtl_lightning.search.report import analyse, paired_test, pearson, write_report
from mtl_lightning.search.study import load_study, native_context, plan_study, run_study, study_files

ray = pytest.importorskip("ray")
RAY = pytest.mark.xdist_group("ray")  # every Ray test on one xdist worker, in turn (conftest.py says why)

TINY = """
description: two weightings x two seeds on two synthetic tasks
exp: synthetic_mtl
overrides: [data.num_tasks=2, data.train_size=300, data.val_size=100, data.test_size=100, trainer.max_epochs=2]
axes:
  weighting: [uniform, pcgrad]
  seed: [0, 1]
grad_cos_every: 2
references: {uniform: {test/acc/task0: 0.5}}
num_cpus: 2
"""


def write(tmp_path, text, name="tiny.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@RAY
def test_a_tiny_study_killed_resumed_and_reported(shared_ray, tmp_path, capfd):
    study = write(tmp_path, TINY)
    out = tmp_path / "st"
    args = [study, f"study.out_dir={out}", "logger=csv"]
    # the whole study (driver, Ray, trial workers) is killed once its first cell has finished
    cmd = [sys.executable, "-m", "experiments.study", *args]
    log = tmp_path / "killed-study.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not list((out / "cells").glob("*.json")):  # only a finished cell ends the wait: not a fast exit
        said = lambda: log.read_text()[-4000:]  # noqa: E731
        assert proc.poll() is None, f"the study ended (exit {proc.returncode}) before a cell finished:\n{said()}"
        assert time.time() < deadline, f"no cell finished within 300 s; the study printed:\n{said()}"
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended between the check and the kill: what it printed says why
        pytest.fail(f"the study ended on its own (exit {proc.poll()}) instead of being killed:\n{log.read_text()}")
    proc.wait()
    kept = {p.name: p.read_bytes() for p in (out / "cells").glob("*.json")}
    assert 1 <= len(kept) < 8, f"{len(kept)} cells had finished when the study was killed"
    with pytest.raises(MTLError, match="holds a study already"):
        run_study(*load_study(study, [f"study.out_dir={out}"]))
    capfd.readouterr()
    assert main([*args, "resume=true"]) == 0
    console = capfd.readouterr()
    lines = (console.out + console.err).splitlines()
    # progress and the report's path, not the cells' Lightning and Ray output (that goes to their console.log)
    assert "[8/8] done" in console.out and "training" in console.out and "left" in console.out
    # no cell's Lightning or Ray output (its worker's lines, its epoch lines, Tune's checkpoint lines) ...
    noise = r"\((ImplicitFunc|pid=)|epoch \d|exp=synthetic_mtl|Checkpoint successfully created"
    assert not [x for x in lines if re.search(noise, x)], lines
    # ... and each missing cell started and finished once (a bound on all lines, 2 per cell + 4, failed once in a
    # full suite with 25 lines for 7 cells, lines pytest did not show: these checks name what they reject)
    progress = [x for x in lines if re.match(r"\[\d/8\] (training|done) ", x)]
    assert len(progress) == 2 * (8 - len(kept)), lines
    runs = sorted((out / "tune").glob("cells-*"))
    assert len(runs) == 2 and len(list(runs[-1].glob("trial_*"))) == 8 - len(kept)  # only the missing cells
    assert all((out / "cells" / n).read_bytes() == b for n, b in kept.items())  # finished cells kept as they were
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    # 2 weightings x 2 seeds, and the single-task baseline of each task per seed
    assert sorted(cells) == sorted(
        f"{r}__seed{s}" for r in ("uniform", "pcgrad", "single-task_task0", "single-task_task1") for s in (0, 1)
    )
    assert len({c["steps"] for c in cells.values()}) == 1  # equal budgets, baselines included
    # every cell's own run directory (config, logs), also for the cells that followed another in a reused worker
    # (named relative to the study's folder) with the cell's console output
    assert all(json.loads((out / c["run_dir"] / "metrics.json").read_text()) for c in cells.values())
    assert all("epoch 1, step" in (out / c["run_dir"] / "console.log").read_text() for c in cells.values())
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8
    for r in rows:
        mine = ["test/acc/task0", "test/acc/task1"] if r["kind"] == "method" else [f"test/acc/{r['row'][-5:]}"]
        assert all(0 <= float(r[m]) <= 1 for m in mine)
        if r["kind"] == "method":
            assert -1 <= float(r["grad_cos/mean"]) <= 1  # gradient conflict, logged every 2 steps
    report = (out / "report.md").read_text()
    # the command that reproduces it: every override given, less resume
    assert f"Command: `python -m experiments.study {study} study.out_dir={out} logger=csv`" in report
    assert f"trained {cells['uniform__seed0']['steps']} optimiser steps" in report
    table = [line for line in report.splitlines() if line.startswith("| pcgrad")][0].split(" | ")
    assert len(table) == 8 and all(x.strip() for x in table)  # every column of a method's row filled
    assert "(paper 0.5)" in report and "Gradient conflict vs performance" in report
    assert all((out / png).stat().st_size > 0 for png in ("bars.png", "pareto.png"))

    before = (out / "report.md").read_bytes()  # --report rebuilds the same report from the results alone
    (out / "report.md").unlink()
    assert main(["--report", str(out)]) == 0 and (out / "report.md").read_bytes() == before


def test_paired_test_has_the_known_p_value():
    # differences 1, 2, 3: t = 2 / (1 / sqrt 3) with 2 degrees of freedom, whose two-sided p is 1 - t / sqrt(t^2 + 2)
    b = [0.3, 0.1, 0.7]
    diff, p = paired_test([x + d for x, d in zip(b, [1, 2, 3])], b)
    t = 2 * math.sqrt(3)
    assert diff == pytest.approx(2.0) and p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-6)
    assert math.isnan(paired_test([1.0], [0.0])[1])  # one pair: no test
    r, lo, hi = pearson([0, 1, 2, 3, 4], [1, 3, 5, 7, 9.5])
    assert r > 0.99 and lo < r < hi


def test_report_statistics_on_a_hand_made_table():
    directions = {"test/acc/a": True, "test/err/b": False}
    meta = {"metrics": list(directions), "directions": directions, "tasks": ["a", "b"], "study": {"compare": "u"}}

    def cell(row, kind, seed, **m):
        metrics = {f"test/{k.replace('_', '/')}": v for k, v in m.items()}
        return {"row": row, "kind": kind, "seed": seed, "metrics": metrics}

    cells = [cell("single-task a", "baseline", s, acc_a=0.8) for s in (0, 1)]
    cells += [cell("single-task b", "baseline", s, err_b=2.0) for s in (0, 1)]
    cells += [cell("u", "method", 0, acc_a=0.8, err_b=2.0), cell("u", "method", 1, acc_a=0.8, err_b=2.0)]
    cells += [cell("m", "method", 0, acc_a=0.88, err_b=1.8), cell("m", "method", 1, acc_a=0.84, err_b=1.9)]
    a = analyse(meta, cells)
    # Δm% of m: mean of (+10%, +10%) at seed 0 and (+5%, +5%) at seed 1
    assert a["rows"]["m"]["scores"] == pytest.approx({0: 10.0, 1: 5.0})
    assert a["rows"]["u"]["scores"] == pytest.approx({0: 0.0, 1: 0.0})
    assert a["rows"]["m"]["stats"]["test/acc/a"][:2] == pytest.approx((0.86, 0.0283), abs=1e-4)
    assert a["rows"]["m"]["rank"] == 1.0 and a["rows"]["u"]["rank"] == 2.0  # better on both metrics
    assert a["tests"]["m"]["diff"] == pytest.approx(7.5)


def test_a_search_row_is_scored_against_the_baselines_at_its_own_capacity(tmp_path):
    # a search trains at the experiment's own capacity, so its row must share that context with the baselines
    path = write(tmp_path, "exp: digits_mdl\naxes: {p: [0.5], capacity: [[1, 16], [3, 64]], data.val_size: [50]}\n")
    cfg, _ = load_study(path, [])
    assert native_context(
        cfg, compose(cfg.exp, ["model.depth=1", "model.width=16", "data.val_size=70"]), ["a", "b"]
    ) == [
        "1x16",
        "data.val_size=70",
    ]
    meta = {"metrics": ["test/acc/a"], "directions": {"test/acc/a": True}, "tasks": ["a"], "command": "c"}
    meta["study"] = {"name": "s", "compare": None}
    meta["searches"] = {"pbt": {"best_weights": [0.25], "compute_trial_epochs": 12}}
    meta["wandb"] = {"project": "p", "entity": None, "mode": "offline"}  # the table and figures go to W&B too
    cells = [
        {"id": c, "row": f"single-task a, {c}", "kind": "baseline", "seed": 0, "metrics": {"test/acc/a": v}}
        for c, v in (("1x16", 0.4), ("3x64", 0.8))
    ]
    cells.append({"id": "p", "row": "pbt, 3x64", "kind": "search", "seed": 0, "metrics": {"test/acc/a": 0.6}})
    assert analyse(meta, cells)["rows"]["pbt, 3x64"]["delta_m"] == pytest.approx({0: -25.0})
    (tmp_path / "cells").mkdir()
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    for c in cells:
        (tmp_path / "cells" / f"{c['id']}.json").write_text(json.dumps(c))
    report = write_report(tmp_path).read_text()
    assert "| pbt, 3x64 | 1 | 0.6000 ± 0.0000 | -25.00 ± 0.00 |" in report
    assert "`pbt` searched for 12 trial-epochs; its best weights [0.250] (tasks a)" in report
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    tables = list(run.glob("files/media/table/results_*.table.json"))
    table = json.loads(tables[0].read_text())
    assert len(tables) == 1 and {r[table["columns"].index("row")] for r in table["data"]} == {c["row"] for c in cells}


def test_gradient_conflict_is_logged_every_n_steps(make_cfg):
    over = ["data.train_size=256", "data.batch_size=64", "trainer.max_steps=8", "grad_cos_every=3"]
    m = run(make_cfg("digits_mtl", *over))
    assert -1 <= m["grad_cos/left-right"] <= 1 and m["grad_cos/mean"] == m["grad_cos/left-right"]
    log = next(p for p in os.scandir(os.path.join(m["run_dir"], "csv")) if p.is_dir()).path + "/metrics.csv"
    rows = [r for r in csv.DictReader(open(log)) if r.get("train/grad_cos/left-right")]
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    with pytest.raises(MTLError, match="grad_cos_every"):
        run(make_cfg("digits_mtl", "grad_cos_every=-1"))


BAD = [
    ("axes: {weighting: [uniform], optim.lrr: [0.1]}", "axis 'optim.lrr'.*Axis keys are weighting, p, capacity, seed"),
    ("axes: {weighting: []}", "axes.weighting is empty"),
    ("axes: {weighting: [uniform]}\nreferences: {uniform: {test/acc/task9: 0.9}}", "test/acc/task9.*does not report"),
    ("axes: {weighting: [uniform]}\nreferences: {unifrom: {test/acc/task0: 0.9}}", "unifrom names no row.*uniform"),
    ("axes: {seed: [0]}\nsearches: [{name: grid}]", "searches are pbt or pb2, not 'grid'"),
    ("axes: {seed: [0]}\nsearches: [{name: pbt, populaton: 4}]", "Valid keys: search.name"),
    ("axes: {p: [0.5]}", "axes.p sweeps the weight of the first of two tasks.*3 task"),
    ("axes: {weighting: [uniform]}\nmetrics: [val/acc/nope]", "metrics \\['val/acc/nope'\\] are not logged"),
    ("axes: {seed: [0]}\nbaseline: true", "Bad study.*Valid keys: name, description, exp"),
]


@pytest.mark.parametrize("body, message", BAD)
def test_bad_study_files_name_the_key(tmp_path, body, message):
    path = write(tmp_path, f"exp: synthetic_mtl\noverrides: [data.num_tasks=3]\n{body}\n")
    with pytest.raises(MTLError, match=message):
        run_study(*load_study(path, [f"study.out_dir={tmp_path / 'st'}"]))


def test_study_names_and_list(capsys):
    with pytest.raises(MTLError, match="Unknown study 'nope'. Valid choices: .*digits_methods"):
        load_study("nope", [])
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("digits_methods", "digits_capacity", "forkmerge_negative_transfer", "royer_celeba_methods"):
        assert name in listed


@pytest.mark.parametrize("name", sorted(study_files()))
def test_every_shipped_study_composes_every_cell(name, tmp_path):
    cfg, rest = load_study(name, [])
    start = stand_in_start(cfg, tmp_path)
    if start:  # a study that starts from a trained run's weights
        with pytest.raises(MTLError, match=r"cell '[^']+' gives a config the experiment rejects: model.init=.*none"):
            plan_study(cfg, [*rest, f"model.init={tmp_path / 'none'}"])  # a missing start: named before Ray starts
    plan = plan_study(
        cfg, [*rest, *start]
    )  # composes every distinct cell config, checks metrics, references and searches
    methods = [c for c in plan.cells if c["kind"] == "method"]
    assert len(methods) == math.prod(len(v) for v in cfg.axes.values())


def test_baselines_are_trained_only_for_the_reported_tasks():
    # ForkMerge's target is task0; a baseline of the noise task would be compute no row of the report uses
    plan = plan_study(*load_study("forkmerge_negative_transfer", []))
    assert {c["row"] for c in plan.cells if c["kind"] == "baseline"} == {"single-task task0"}
    plan = plan_study(*load_study("forkmerge_domainnet", []))  # 6 domains, 2 targets reported
    assert {c["row"] for c in plan.cells if c["kind"] == "baseline"} == {
        "single-task painting",
        "single-task quickdraw",
    }
    # an aggregate metric (acc_mean) needs every task's baseline
    cfg, rest = load_study("digits_methods", ["study.metrics=[test/acc_mean]"])
    assert {c["row"] for c in plan_study(cfg, rest).cells if c["kind"] == "baseline"} == {
        "single-task left",
        "single-task right",
    }


@RAY
def test_the_embedded_semi_supervised_study_runs_at_a_tiny_budget(shared_ray, tmp_path):
    row = "[{name: forkmerge, target: [clean], aux_weight: 10, label: forkmerge-10}]"  # ForkMerge with a view task
    over = [f"study.out_dir={tmp_path / 'st'}", "study.axes.seed=[0]", f"study.axes.weighting={row}", "logger=csv"]
    over += ["data.train_size=300", "data.val_size=100", "data.test_size=100", "trainer.max_epochs=1"]
    out = run_study(*load_study("ssl_digits", over))
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert sorted(cells) == ["forkmerge-10__seed0", "single-task_clean__seed0"]
    assert all(0 <= c["metrics"]["test/acc/clean"] <= 1 for c in cells.values())
    assert "rotation" not in json.dumps(cells["single-task_clean__seed0"]["metrics"])  # supervised only
    assert "val/acc/rotation" in cells["forkmerge-10__seed0"]["metrics"] and (out / "report.md").exists()


def _row(name: str) -> dict:
    """A study row of a registered weighting, with what it needs on two tasks (a target for the auxiliary methods)."""
    from test_weighting import required_options

    return {"name": name, "label": name, **required_options(name, ["task0", "task1"])}


@RAY
def test_every_weighting_trains_as_a_study_row_in_ray_workers(shared_ray, tmp_path):
    """Every registered weighting (a new one too, without editing this test) trains as a study's row, cell after
    cell in live Ray workers, at the study's equal budget: 3 steps each on 96 samples; a merging row too."""
    from mtl_lightning.weighting import WEIGHTINGS

    names = [n for n, cls in WEIGHTINGS.items() if cls.__module__.startswith("mtl_lightning.")]
    body = "exp: synthetic_mtl\nbaselines: false\nnum_cpus: 2\n"
    body += "overrides: [data.num_tasks=2, data.train_size=96, data.val_size=64, data.test_size=32, "
    body += "data.batch_size=32, trainer.max_epochs=1]\n"
    # and a merging row, on the same budget: a warm-up of 1 step, then the task models 1 each (issue 37)
    merging = {"name": "uniform", "label": "merging-ties", "overrides": ["merging=ties", "merging.lambdas=[1.0]"]}
    # and a gradient method on MTLoRA's adapters (issue 39): shared LoRA below, one per task in the last block
    lora = {"name": "pcgrad", "label": "pcgrad-mtlora", "overrides": ["model.adapter=lora", "model.lora.share=mtlora"]}
    axes = {"weighting": [*(_row(n) for n in names), merging, lora], "seed": [0]}
    body += yaml.safe_dump({"axes": axes})
    out = run_study(*load_study(write(tmp_path, body), [f"study.out_dir={tmp_path / 'st'}", "logger=csv"]))
    cells = {p.stem.removesuffix("__seed0"): json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert sorted(cells) == sorted([*names, "merging-ties", "pcgrad-mtlora"])
    assert {c["steps"] for c in cells.values()} == {3}
    adapted = cells.pop("pcgrad-mtlora")
    said = (out / adapted["run_dir"] / "console.log").read_text()
    trained = r"LoRA r=8 \(mtlora\) \([\d.]+( [kM])? parameters trained, [\d.]+( [kM])? frozen\)"
    assert re.search(trained, said), said[:500]
    assert all(0 <= adapted["metrics"][f"test/acc/task{k}"] <= 1 for k in (0, 1))
    merged = cells.pop("merging-ties")
    record = json.loads((out / merged["run_dir"] / "merging.json").read_text())
    assert record["steps"] == {"warmup": 1, "task0": 1, "task1": 1}
    assert json.loads((out / merged["run_dir"] / "metrics.json").read_text())["merging/steps"] == 3
    for name, cell in cells.items():
        acc = [cell["metrics"][f"test/acc/task{k}"] for k in (0, 1)]
        assert all(0 <= a <= 1 for a in acc), (name, acc)
        trained = yaml.safe_load((out / cell["run_dir"] / "config.yaml").read_text())
        assert trained["weighting"]["name"] == name


# a population study (no Ray): two weightings of two tasks and a PBT row, searched in process
POPULATION = """
exp: synthetic_mtl
overrides: [data.num_tasks=2, data.train_size=200, data.val_size=64, data.test_size=64, trainer.max_epochs=2]
axes: {p: [0.3, 0.7], seed: [0]}
baselines: false
backend: population
searches: [{name: pbt, backend: population, population: 2}]
"""


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_a_study_folder_is_reused_only_by_the_study_that_made_it(tmp_path, monkeypatch, capsys):
    import mtl_lightning.search.study as S

    study, out = write(tmp_path, POPULATION), tmp_path / "st"
    args = [f"study.out_dir={out}", "logger=csv"]

    def fail(*a, **k):
        raise MTLError("the cells failed")

    monkeypatch.setattr(S, "_population_cells", fail)  # the first command fails after its search, before any cell
    with pytest.raises(MTLError, match="the cells failed"):
        run_study(*load_study(study, args))
    monkeypatch.undo()
    assert (out / "searches" / "pbt.json").exists() and not list(out.glob("cells/*.json"))
    before = _listing(out)
    # another command must not inherit that search: refused without resume, and with resume when anything differs
    with pytest.raises(MTLError, match=r"holds a study already \(made by .*\): continue it with resume=true"):
        run_study(*load_study(study, [*args, "trainer.max_steps=5"]))
    with pytest.raises(MTLError, match=r"another study: trainer.max_steps -1 there, 5 here\. Resume it with"):
        run_study(*load_study(study, [*args, "trainer.max_steps=5", "resume=true"]))
    with pytest.raises(MTLError, match=r"study.axes \{.*0.7.*\} there, \{.*0.9.*\} here"):
        run_study(*load_study(study, [*args, "study.axes.p=[0.3,0.9]", "resume=true"]))
    assert _listing(out) == before  # nothing written by the refused commands
    capsys.readouterr()
    # the command that made it, resumed: its search is reused (no new search), and the cells train
    run_study(*load_study(study, [*args, "resume=true", "study.num_cpus=1"]))  # num_cpus changes no result
    printed = capsys.readouterr().out
    assert "searching" not in printed and "cells as 1 population(s)" in printed
    assert sorted(p.stem for p in out.glob("cells/*.json")) == ["p=0.3__seed0", "p=0.7__seed0", "pbt__seed0"]
    # a folder shipped without searches/ (reproduction/ keeps meta.json and cells/) resumes with its search's record
    # from meta.json: a new value of an axis trains, the search does not run again, and its row keeps its weights
    found, pbt_cell = json.loads((out / "meta.json").read_text())["searches"], (out / "cells" / "pbt__seed0.json")
    shutil.rmtree(out / "searches")
    pbt_before = pbt_cell.read_text()
    run_study(*load_study(study, [*args, "study.axes.p=[0.3,0.7,0.5]", "resume=true"]))
    printed = capsys.readouterr().out
    assert "searching" not in printed and "study.axes.p gained 0.5" in printed and "1 cells as 1 population" in printed
    assert json.loads((out / "meta.json").read_text())["searches"] == found and pbt_cell.read_text() == pbt_before


GROWN = """
exp: synthetic_mtl
overrides: [data.num_tasks=2, data.train_size=200, data.val_size=64, data.test_size=64, trainer.max_epochs=2]
axes: {p: [0.3], seed: [0]}
baselines: false
backend: population
"""


def test_a_study_gains_rows_and_takes_cells_another_study_trained(tmp_path, capsys):
    study, a, b = write(tmp_path, GROWN), tmp_path / "a", tmp_path / "b"
    run_study(*load_study(study, [f"study.out_dir={a}"]))
    first = (a / "cells" / "p=0.3__seed0.json").read_text()
    capsys.readouterr()
    # an axis that gains a value: resume trains only the cells it adds, and the report has every row
    run_study(*load_study(study, [f"study.out_dir={a}", "study.axes.p=[0.3,0.7]", "resume=true"]))
    printed = capsys.readouterr().out
    assert "study.axes.p gained 0.7: only the cells they add are trained" in printed
    assert "1 cells as 1 population(s) of 1" in printed
    assert (a / "cells" / "p=0.3__seed0.json").read_text() == first
    assert {r["row"] for r in csv.DictReader(open(a / "results.csv"))} == {"p=0.3", "p=0.7"}
    # a value gone is another study (its cells would stay in the report)
    with pytest.raises(MTLError, match=r"study.axes .* there, .* here\. Resume it with"):
        run_study(*load_study(study, [f"study.out_dir={a}", "study.axes.p=[0.7]", "resume=true"]))
    # study.cells_from: the cells another folder trained with this training config are copied, the rest train
    run_study(*load_study(study, [f"study.out_dir={b}", "study.axes.p=[0.3,0.5,0.7]", f"study.cells_from=[{a}]"]))
    printed = capsys.readouterr().out
    assert f"2 cell(s) copied from {a}" in printed and "1 cells as 1 population(s) of 1" in printed
    for cell in ("p=0.3__seed0", "p=0.7__seed0"):
        mine, theirs = (json.loads((f / "cells" / f"{cell}.json").read_text()) for f in (b, a))
        assert mine["copied_from"] == str(a) and mine["metrics"] == theirs["metrics"]
        assert (b / mine["run_dir"]).resolve() == (a / theirs["run_dir"]).resolve()
    assert "copied_from" not in json.loads((b / "cells" / "p=0.5__seed0.json").read_text())
    assert "Of these, 2 cells were trained by another study" in (b / "report.md").read_text()
    # a folder trained otherwise, one too old to tell, or no study folder at all, is refused before anything is written
    old = tmp_path / "old"
    old.mkdir()
    (old / "meta.json").write_text(
        json.dumps({k: v for k, v in json.loads((a / "meta.json").read_text()).items() if k != "plan"})
    )
    for given, message in (
        (
            [f"study.cells_from=[{a}]", "optim.lr=0.5"],
            r"trained otherwise than this study.s: optim.lr .* there, 0.5",
        ),
        ([f"study.cells_from=[{tmp_path}]"], "is not a study folder"),
        ([f"study.cells_from=[{old}]"], "was made before studies recorded the training config"),
    ):
        with pytest.raises(MTLError, match=message):
            run_study(*load_study(study, [f"study.out_dir={tmp_path / 'c'}", *given]))
        assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["weighting=pcgrad"], "search row pbt: .* so weighting=pcgrad cannot apply to its trials"),
        (["weighting=pcgrad", "study.searches=[]"], "weighting=pcgrad learns or combines weights per step"),
        (
            [
                "model.backbone=resnet18",
                "model.depth=null",
                "model.width=null",
                "model.num_heads=null",
                "model.patch_size=null",
            ],
            "BatchNorm2d layers",
        ),
        (["data.aux_tasks=[rotation]"], r"Task\(s\) \['rotation'\] read their own view"),
        (["study.backend=spark"], "Unknown study.backend='spark'. Valid choices: ray, population"),
    ],
)
def test_a_population_study_is_checked_before_anything_trains(tmp_path, overrides, message):
    study = write(tmp_path, POPULATION.replace("data.num_tasks=2,", "data.num_tasks=2, data.mode=mtl,"))
    out = tmp_path / "st"
    if "data.aux_tasks=[rotation]" in overrides:  # a view task needs images with classes: the digits
        study = write(tmp_path, POPULATION.replace("synthetic_mtl", "digits_ssl").replace("data.num_tasks=2, ", ""))
    t0 = time.monotonic()
    with pytest.raises(MTLError, match=message):
        run_study(*load_study(study, [f"study.out_dir={out}", *overrides]))
    assert not out.exists() and time.monotonic() - t0 < 30  # refused before the search, before any folder


def test_the_report_computes_delta_m_in_the_studys_convention(tmp_path):
    """LibMTL's Δm% averages each task's metrics first; Nash-MTL's is flat over the metrics and lower is better, with
    its published value beside ours."""
    directions = {"test/s/miou": True, "test/s/pix_acc": True, "test/d/abs_err": False}
    tasks_of = {"test/s/miou": "s", "test/s/pix_acc": "s", "test/d/abs_err": "d"}
    base = {"test/s/miou": 0.5, "test/s/pix_acc": 0.5, "test/d/abs_err": 1.0}
    mine = {"test/s/miou": 0.6, "test/s/pix_acc": 0.6, "test/d/abs_err": 1.3}  # +20%, +20%, 30% worse
    cells = [{"id": "b", "row": "single-task s", "kind": "baseline", "seed": 0, "metrics": base}]
    cells.append({"id": "u", "row": "uniform", "kind": "method", "seed": 0, "metrics": mine})
    for convention in ("libmtl", "nashmtl"):
        folder = tmp_path / convention
        (folder / "cells").mkdir(parents=True)
        meta = {"metrics": list(directions), "directions": directions, "tasks": ["s", "d"], "command": "c"}
        meta.update(study={"name": "s", "compare": None, "references": {"uniform": {"delta_m": 2.5}}})
        meta.update(metric_tasks=tasks_of, delta_m=convention)
        (folder / "meta.json").write_text(json.dumps(meta))
        for c in cells:
            (folder / "cells" / f"{c['id']}.json").write_text(json.dumps(c))
        report = write_report(folder).read_text()
        row = next(x for x in report.splitlines() if x.startswith("| uniform"))
        # LibMTL: ((20 + 20) / 2 - 30) / 2 = -5; Nash-MTL: -(20 + 20 - 30) / 3, better than the baseline: negative
        expected = {"libmtl": "-5.00 ± 0.00", "nashmtl": "-3.33 ± 0.00"}[convention]
        assert f"{expected} (paper +2.5)" in row, (convention, row)
    assert "flat, lower is better" in report
