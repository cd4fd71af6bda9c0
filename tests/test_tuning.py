"""Tuning any option of any method: search spaces over config keys (checked before a trial starts), ASHA stopping the
bad trials early, Optuna's seeded proposals, PBT mutating a space, a study's tuned row retrained with exactly the
options found, and the report's confidence intervals and single-task tests."""

import csv
import json
import math

import pytest
from scipy import stats

from mtl_lightning.errors import MTLError
from mtl_lightning.search import compose_search, run_search
from mtl_lightning.search.report import paired_ci, versus_single
from mtl_lightning.search.space import Dist, check_space, parse

ray = pytest.importorskip("ray")
RAY = pytest.mark.xdist_group("ray")  # conftest.py says why


def test_distributions_parse_and_bad_forms_name_the_valid_ones():
    assert parse("optim.lr", "loguniform(1e-4, 1e-2)") == Dist("loguniform", (1e-4, 1e-2))
    assert parse("k", "randint(1,4)").examples() == [1, 4] and parse("k", [0, 1e-5]).form == "choice"
    assert parse("k", "quniform(0, 1, 0.1)").args == (0.0, 1.0, 0.1)
    for bad, message in [
        ("normal(0, 1)", r"Valid forms: uniform\(low, high\), loguniform"),
        ("uniform(1)", "uniform takes 2 numbers"),
        ("uniform(a, b)", "takes numbers"),
        ("loguniform(0, 1)", "0 < low < high"),
        ("uniform(2, 1)", "low < high"),
        ([], "empty list"),
        ("uniform(0.1", "quote it"),  # what YAML's `{k: uniform(0.1, 0.9)}` leaves of it
    ]:
        with pytest.raises(MTLError, match=message):
            parse("k", bad)


def test_space_keys_are_checked_against_the_composed_config():
    over = ["weighting=cagrad"]
    dists = check_space(
        {"optim": {"lr": "loguniform(1e-4,1e-2)"}, "weighting.c": "uniform(0.1,0.9)"}, "digits_mtl", over
    )
    assert set(dists) == {"optim.lr", "weighting.c"}  # nested keys (the command line's) read as dotted ones
    with pytest.raises(MTLError, match=r"'weighting.c' is not an option of exp=digits_mtl with weighting=uniform\. "):
        check_space({"weighting.c": "uniform(0.1,0.9)"}, "digits_mtl", [])  # uniform has no c: its keys listed
    with pytest.raises(MTLError, match=r"'optim.lrr' is not an option.*Valid keys: optim.gamma, optim.lr"):
        check_space({"optim.lrr": "uniform(0.1,0.9)"}, "digits_mtl", [])
    with pytest.raises(MTLError, match=r"search.space.optim.lr=\[0.001, 'fast'\]: the value 'fast' is refused"):
        check_space({"optim.lr": [0.001, "fast"]}, "digits_mtl", [])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["search=asha", "search.weights=false"], "leaves nothing to search"),
        (["search=grid", "search.space.optim.lr=loguniform(1e-4,1e-2)"], "a search.space needs search=asha"),
        (["search=pbt", "search.backend=population", "search.space.optim.lr=[0.1]"], "need search.backend=ray"),
        (["search=pb2", "search.space.optim.lr=[0.001,0.01]"], "a list of choices needs search=pbt or asha"),
        (["search=pbt", "search.algo=optuna"], "search.algo=optuna proposes the trials of search=asha"),
        (["search=asha", "search.algo=tpe"], "Valid choices: random, optuna"),
        (["search=asha", "search.reduction_factor=1"], "reduction_factor > 1"),
        (["search=asha", "search.space.weighting.c=[0.1]"], "set search.weights=false and the method"),
        (["search=asha", "search.search_lr=true", "search.space.optim.lr=[0.1]"], "keep one"),
        (["search=asha", "weighting=cagrad"], "search.weights=false and a search.space"),
        (["search=hyperband"], "Valid choices: asha, grid, pb2, pbt"),
        # issue 35: each candidate checked as a command-line value is, before any trial (one died inside Ray)
        (["search=asha", "search.space.optim.name=[adam,foo]"], r"value 'foo' is refused: Unknown optim.name='foo'"),
        (["search=asha", "search.space.optim.warmup=[0.1,1.5]"], r"value 1.5 is refused: optim.warmup=1.5 must lie"),
        (["search=asha", "search.space.data.batch_size=[0,8]"], r"value 0 is refused: data.batch_size=0 must be"),
        # ... and a grace period longer than the run (Ray's AssertionError)
        (["search=asha", "search.grace_period=5", "trainer.max_epochs=2"], r"grace_period=5 exceeds .*max_epochs=2"),
    ],
)
def test_bad_tuning_searches_name_the_key(argv, message):
    with pytest.raises(MTLError, match=message):
        compose_search("synthetic_mtl", argv)


def test_only_pbt_and_pb2_warn_of_a_run_too_short_to_perturb(capsys):
    for name in ("asha", "pbt"):  # ASHA searches and a study's tuning printed PBT's warning (issue 35)
        compose_search("synthetic_mtl", [f"search={name}", "trainer.max_epochs=1"])
        assert ("PBT perturbs every" in capsys.readouterr().err) == (name == "pbt"), name


def test_a_method_option_is_searched_with_the_method_named():
    scfg, rest = compose_search(
        "synthetic_mtl",
        ["search=asha", "search.weights=false", "weighting=cagrad", "search.space.weighting.c=uniform(0.1,0.9)"],
    )
    assert rest == ["weighting=cagrad"] and scfg.space == {"weighting": {"c": "uniform(0.1,0.9)"}}


def test_optuna_proposes_inside_the_space_reproducibly_with_its_seed():
    from ray import tune

    from mtl_lightning.search.asha import optuna_searcher

    space = {"exp": "x", "params": {"optim.lr": tune.loguniform(1e-4, 1e-2), "weighting.c": tune.uniform(0.1, 0.9)}}

    def proposals(seed):
        s = optuna_searcher(seed)
        s.set_search_properties("score", "max", space)
        return [s.suggest(f"t{i}")["params"] for i in range(6)]

    a = proposals(3)
    assert a == proposals(3) and a != proposals(4)
    assert all(1e-4 <= p["optim.lr"] <= 1e-2 and 0.1 <= p["weighting.c"] <= 0.9 for p in a)


def test_pbt_mutates_the_space_and_pb2_bounds_it():
    from ray.tune.schedulers import PopulationBasedTraining

    from mtl_lightning.config import compose
    from mtl_lightning.search.pbt import _pbt_space

    dists = {"optim.lr": parse("optim.lr", "loguniform(1e-4,1e-2)"), "optim.weight_decay": parse("wd", [0, 1e-4])}
    for name in ("pbt", "pb2"):
        scfg, _ = compose_search(
            "synthetic_mtl",
            [f"search={name}", "search.weights=false"] + (["search.space.optim.lr=loguniform(1e-4,1e-2)"]),
        )
        mine = dists if name == "pbt" else {"optim.lr": dists["optim.lr"]}  # PB2: ranges only
        space, tc = _pbt_space(scfg, compose("synthetic_mtl", []), ["task0"], {}, mine)
        assert set(space["params"]) == set(mine) and "w0" not in space
        if name == "pbt":
            assert isinstance(tc.scheduler, PopulationBasedTraining)
            assert set(tc.scheduler._hyperparam_mutations["params"]) == {"optim.lr", "optim.weight_decay"}


@RAY
def test_asha_stops_the_bad_trials_early_and_keeps_the_best(shared_ray, tmp_path):
    # the learning rate is the known best option here: over 4 orders of magnitude in 3 epochs, larger learns more
    over = ["data.num_tasks=2", "data.train_size=1200", "trainer.max_epochs=3", f"out_dir={tmp_path}", "logger=csv"]
    space = ["search.space.optim.lr=loguniform(1e-6,3e-3)", "search.trials=6", "search.grace_period=1"]
    scfg, rest = compose_search("synthetic_mtl", ["search=asha", "search.weights=false", *space, *over])
    scfg.num_cpus = 2
    out = run_search("synthetic_mtl", rest, scfg)
    rows = list(csv.DictReader(open(tmp_path / "search" / "synthetic_mtl-asha" / "trials.csv")))
    assert len(rows) == 6 and not out["failed_trials"]
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    kept = [r for r in rows if r["stopped_early"] == "False"]
    assert stopped and all(int(r["epochs"]) < 3 for r in stopped) and all(int(r["epochs"]) == 3 for r in kept)
    largest = max(rows, key=lambda r: float(r["optim.lr"]))
    assert largest in kept  # the known best option trained to the end
    assert out["best_params"]["optim.lr"] == pytest.approx(float(largest["optim.lr"]))
    assert all(float(r["optim.lr"]) < float(largest["optim.lr"]) for r in stopped)
    assert out["compute_trial_epochs"] == sum(int(r["epochs"]) for r in rows) < 6 * 3  # cheaper than 6 full runs
    assert (tmp_path / "search" / "synthetic_mtl-asha" / "trials.png").stat().st_size > 0


TUNED = """
exp: synthetic_mtl
overrides: [data.num_tasks=2, data.train_size=600, data.val_size=100, data.test_size=100, trainer.max_epochs=2]
axes:
  weighting: [uniform, {name: cagrad, label: cagrad, tune: {space: {weighting.c: "uniform(0.1, 0.9)"}}}]
  seed: [0]
baselines: false
tune: {trials: 2, grace_period: 2}
num_cpus: 2
"""


@RAY
def test_a_tuned_row_is_retrained_with_exactly_the_options_found(shared_ray, tmp_path):
    from omegaconf import OmegaConf

    from mtl_lightning.search.study import load_study, run_study

    path = tmp_path / "tuned.yaml"
    path.write_text(TUNED)
    out = run_study(*load_study(str(path), [f"study.out_dir={tmp_path / 'st'}", "logger=csv"]))
    meta = json.loads((out / "meta.json").read_text())
    found = meta["tuned"]["cagrad"]["found"]["weighting.c"]
    assert 0.1 <= found <= 0.9 and meta["tuned"]["cagrad"]["compute_trial_epochs"] == 2 * 2
    cell = json.loads((out / "cells" / "cagrad__seed0.json").read_text())
    assert f"weighting.c={found}" in cell["overrides"]
    trained = OmegaConf.load(out / cell["run_dir"] / "config.yaml")
    assert trained.weighting.name == "cagrad" and trained.weighting.c == found  # exactly the found option
    uniform = json.loads((out / "cells" / "uniform__seed0.json").read_text())
    assert not any(o.startswith("weighting.c") for o in uniform["overrides"])
    report = (out / "report.md").read_text()
    assert "`cagrad` was tuned for 4 trial-epochs (2 trials" in report and f"weighting.c={found:.4g}" in report


C = "{weighting.c: 'uniform(0.1, 0.9)'}"  # quoted: YAML's flow style would split the form at its comma


@pytest.mark.parametrize(
    "row, study_tune, message",
    [
        ("{name: cagrad, tune: {trials: 2}}", "{}", "has `tune` without a `space`"),
        ("{name: cagrad, tune: {space: " + C + ", trials: 3}}", "{trials: 2}", "same budget"),
        ("{name: cagrad, tune: {space: " + C + ", rungs: 3}}", "{}", "tune keys \\['rungs'\\]"),
        ("{name: cagrad, tune: {space: " + C + ", scheduler: pbt}}", "{}", "scheduler: asha"),
        ("{name: cagrad, tune: {space: {weighting.cc: 'uniform(0.1, 0.9)'}}}", "{}", "tuned row 'cagrad'.*weighting.c"),
    ],
)
def test_bad_tuned_rows_are_named(tmp_path, row, study_tune, message):
    from mtl_lightning.search.study import load_study, plan_study

    path = tmp_path / "bad.yaml"
    body = f"exp: synthetic_mtl\noverrides: [data.num_tasks=2]\naxes:\n  weighting: [uniform, {row}, "
    body += "{name: imtl_l, tune: {space: {optim.lr: 'loguniform(1e-4, 1e-2)'}}}]\n"
    path.write_text(body + f"tune: {study_tune}\n")
    with pytest.raises(MTLError, match=message):
        plan_study(*load_study(str(path), []))


def test_confidence_intervals_and_single_task_tests_on_a_hand_made_table():
    a, b = [0.70, 0.74, 0.71, 0.69], [0.66, 0.70, 0.70, 0.64]
    low, high = paired_ci(a, b)
    d = [x - y for x, y in zip(a, b)]
    want = stats.t.interval(0.95, 3, loc=sum(d) / 4, scale=stats.sem(d))
    assert (low, high) == pytest.approx(want)
    meta = {
        "metric_tasks": {"test/acc/a": "a", "test/err/b": "b"},
        "directions": {"test/acc/a": True, "test/err/b": False},
    }
    cells = []
    for s, (acc, err) in enumerate([(0.8, 0.30), (0.82, 0.29), (0.79, 0.31)]):
        cells.append({"row": "m", "seed": s, "kind": "method", "metrics": {"test/acc/a": acc, "test/err/b": err}})
        cells.append({"row": "single-task a", "seed": s, "kind": "baseline", "metrics": {"test/acc/a": 0.75}})
        cells.append({"row": "single-task b", "seed": s, "kind": "baseline", "metrics": {"test/err/b": 0.20 + s / 100}})
    out = versus_single(meta, cells)["m"]
    assert out["test/acc/a"]["diff"] == pytest.approx((0.05 + 0.07 + 0.04) / 3) and out["test/acc/a"]["p"] < 0.05
    assert out["test/err/b"]["diff"] == pytest.approx(-(0.10 + 0.08 + 0.09) / 3)  # lower is better: signed
    assert out["test/err/b"]["high"] < 0 and not math.isnan(out["test/err/b"]["low"])


def test_a_space_in_the_studys_tune_tunes_every_row_and_a_row_adds_its_methods_keys(tmp_path):
    from mtl_lightning.search.study import load_study, tune_keys, tuned_rows

    path = tmp_path / "every.yaml"
    path.write_text(
        "exp: synthetic_mtl\noverrides: [data.num_tasks=2]\n"
        "axes:\n  weighting: [uniform, {name: cagrad, tune: {space: {weighting.c: 'uniform(0.1, 0.9)'}}}]\n"
        "tune: {space: {optim.lr: 'loguniform(1e-4, 1e-2)'}, trials: 3}\n"
    )
    cfg, _ = load_study(str(path), [])
    rows = tuned_rows(cfg, ["task0", "task1"])
    assert set(rows) == {"uniform", "cagrad"}
    assert set(rows["uniform"]["space"]) == {"optim.lr"} and set(rows["cagrad"]["space"]) == {"optim.lr", "weighting.c"}
    assert rows["uniform"]["budget"] == rows["cagrad"]["budget"] == {"trials": 3}  # the same budget for every row
    assert "search.trials=3" in tune_keys(rows["cagrad"]) and "search.space.weighting.c=uniform(0.1, 0.9)" in tune_keys(
        rows["cagrad"]
    )


def test_pbt_perturbs_every_trial_at_the_same_epoch_and_never_at_the_last():
    """Issue 35: a trial took its donor's final (epoch-3) checkpoint at its own epoch 2, then trained nothing and
    reported a copy of the donor's row."""
    from ray.tune.schedulers import TrialScheduler

    from mtl_lightning.search.schedulers import PB2, PBT

    for kind, extra in (
        (PBT, {"hyperparam_mutations": {"w0": [0.1, 0.2]}}),
        (PB2, {"hyperparam_bounds": {"w0": [0, 1]}}),
    ):
        sched = kind(
            last_epoch=3, time_attr="training_iteration", perturbation_interval=1, metric="score", mode="max", **extra
        )
        assert sched._synch  # exploits wait for every trial to reach the epoch: no donor is ahead of its receiver

        class Controller:  # what a perturbation would ask first
            def get_trials(self):
                raise AssertionError("perturbed at the last epoch")

            get_live_trials = get_trials

        result = {"training_iteration": 3, "score": 1.0}
        assert sched.on_trial_result(Controller(), object(), result) == TrialScheduler.CONTINUE, kind
