"""Weight search with Ray Tune on CPU: PBT toward a known optimum, the grid sweep's outputs, resume, bad config."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments.search import main
from mtl_lightning.search import compose_search, run_search

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


# task1's training labels are noise: weight on it only hurts; the best weights put everything on task0
NOISY_AUX = ["data.num_tasks=2", "data.label_noise=[0,1.0]", "data.train_size=1000", "data.batch_size=128"]


def test_pbt_exploits_and_the_exploiter_continues_the_donor(local_ray, tmp_path):
    over = [*NOISY_AUX, "trainer.max_epochs=3", "optim.lr=3e-3", f"out_dir={tmp_path}", "logger=csv"]
    # distinct starting weights; half a CPU per trial so the 4 trials run (and are compared) side by side
    start = ["search.initial=[[0.1,0.9],[0.3,0.7],[0.7,0.3],[0.9,0.1]]", "search.cpus_per_trial=0.5"]
    scfg, rest = compose_search("synthetic_mtl", ["search=pbt", "search.population=4", *start, *over])
    out = run_search("synthetic_mtl", rest, scfg)
    assert out["initial_weights_mean"][0] == pytest.approx(0.5, abs=1e-6)
    path = tmp_path / "search" / "synthetic_mtl-pbt"
    assert (path / "best_schedule.png").stat().st_size > 0
    rows = list(csv.reader(open(path / "best_schedule.csv")))
    assert rows[0] == ["epoch", "task0", "task1"] and len(rows) == 4  # one row per epoch, across exploits
    assert out["compute_trial_epochs"] == 4 * 3
    assert list(path.glob("pbt_policy_*.txt"))  # exploits happened
    from ray.tune import ExperimentAnalysis

    changed = 0
    for df in ExperimentAnalysis(str(path)).trial_dataframes.values():
        steps = df["step"].tolist()  # an exploiter continues the donor's count: no restart from 0
        assert steps == sorted(steps) and steps[-1] == 3 * 6  # 700 train samples / 128 = 6 steps an epoch
        weights = [tuple(w) for w in df["weights"]]
        changed += len(set(weights)) > 1  # the mutated weights were applied after restoring the donor
        for w in weights:
            assert sum(w) == pytest.approx(1.0)
    assert changed >= 1


def test_pb2_runs_a_population(local_ray, tmp_path):
    over = ["data.num_tasks=2", "data.train_size=500", "trainer.max_epochs=2", f"out_dir={tmp_path}", "logger=csv"]
    scfg, rest = compose_search("synthetic_mtl", ["search=pb2", "search.population=2", *over])
    out = run_search("synthetic_mtl", rest, scfg)
    assert out["compute_trial_epochs"] == 2 * 2 and not out["failed_trials"]
    assert sum(out["best_weights"]) == pytest.approx(1.0) and 0 <= out["best_acc"] <= 1


def test_grid_sweep_writes_table_and_plots(local_ray, tmp_path, capsys):
    over = ["data.num_tasks=2", "data.train_size=300", "trainer.max_epochs=1", f"out_dir={tmp_path}"]
    over += ["logger=csv,wandb", "search.retrain=true"]
    argv = ["exp=synthetic_mtl", "search=grid", "search.grid=[0.0,0.5,1.0]", "search.capacities=[[1,16],[2,16]]"]
    assert main([*argv, *over]) == 0
    printed = capsys.readouterr()
    assert "trial(s) failed" not in printed.err
    assert "best weights" in printed.out and "retrain/test/acc_mean" in printed.out and "trial-epochs" in printed.out
    path = tmp_path / "search" / "synthetic_mtl-grid"
    rows = list(csv.DictReader(open(path / "grid.csv")))
    assert len(rows) == (3 + 2) * 2  # 3 weightings + 2 single-task baselines, at 2 capacities
    assert {(r["depth"], r["width"]) for r in rows} == {("1", "16"), ("2", "16")}
    for r in rows:
        assert 0 <= float(r["acc_mean"]) <= 1
    for png in ("grid_acc_vs_p.png", "grid_capacity.png"):
        assert (path / png).stat().st_size > 0
    runs = list(path.glob("trial_*/synthetic_mtl/*/wandb/offline-run-*"))
    assert len(runs) == 10  # one (offline) W&B run per trial


def test_interrupted_search_resumes_without_redoing_trials(tmp_path):
    cmd = [sys.executable, "-m", "experiments.search", "exp=synthetic_mtl", "search=grid", "search.grid=[0.0,0.5,1.0]"]
    cmd += ["search.baselines=false", "search.num_cpus=1", "data.num_tasks=2", "data.train_size=300"]
    cmd += ["trainer.max_epochs=2", f"out_dir={tmp_path}", "logger=csv"]
    path = tmp_path / "search" / "synthetic_mtl-grid"
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(_finished(path)) < 1:
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole search dies: driver and trial workers
    proc.wait()
    done_before = _finished(path)
    assert 1 <= len(done_before) < 3
    first = {t: (path / t / "result.json").read_text() for t in done_before}
    subprocess.run([*cmd, "resume=true"], check=True, capture_output=True)
    assert len(_finished(path)) == 3
    for t, text in first.items():  # finished trials were not run again
        assert (path / t / "result.json").read_text() == text


def _finished(path):
    out = []
    for d in path.glob("trial_*"):
        lines = (d / "result.json").read_text().splitlines() if (d / "result.json").exists() else []
        if len(lines) >= 2:  # max_epochs=2: two reports
            out.append(d.name)
    return out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["search=pbt", "search.population=1"], "at least 2 trials"),
        (["search=hyperband"], "Valid choices: grid, pb2, pbt"),
        (["search.populaton=4"], "Valid keys: search.name"),
        (["search=grid", "data.num_tasks=3"], "sweeps p over two tasks"),
        (["search=pbt", "data.tasks=[]"], "selects no task"),
        (["search=pbt", "data.tasks=[task0]"], "needs at least 2 tasks"),
    ],
)
def test_bad_search_config(argv, message, tmp_path, capsys):
    assert main(["exp=synthetic_mtl", f"out_dir={tmp_path}", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
