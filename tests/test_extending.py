"""Your own method, dataset, task or architecture from your own file: the four examples/ plugins train through
experiments.run, a Ray search (its workers import them; one plugin file is gone from the disk once Ray has it), a
study's cells, a population and a resume that does not name them; any checkpoint evaluates to its run's numbers;
--list marks plugin entries; a plugin that fails, a name registered twice and a resumed run whose plugin is missing
are one clear paragraph each; no import circle remains in the package."""

import ast
import csv
import json
import math
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.run import main as run_main
from experiments.run import run
from mtl_lightning.config import compose
from mtl_lightning.errors import MTLError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {n: ROOT / "examples" / f"{n}.py" for n in ("loss_weighting", "gradient_aggregator", "folder_dataset")}
EXAMPLES["custom_task"] = ROOT / "examples" / "custom_task.py"
PLUGINS = "plugins=[" + ",".join(map(str, EXAMPLES.values())) + "]"
QUIET = ["trainer.enable_progress_bar=false", "logger=csv"]
RAY = pytest.mark.xdist_group("ray")  # conftest.py says why


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The folder format examples/folder_dataset.py reads: 900 of scikit-learn's digit scans as PNGs, and a CSV of
    their split and two labels per image (the digit, its parity)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("my_data")
    (root / "images").mkdir()
    d = load_digits()
    rows = []
    for i in range(900):
        Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        rows.append([f"{i}.png", "train" if i < 540 else "val" if i < 720 else "test", d.target[i], d.target[i] % 2])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "split", "digit", "parity"], *rows])
    return root


def folder_run(folder, out, *extra):
    """The folder dataset and the loss weighting, 10 short epochs (chance: 0.1 digit, 0.5 parity)."""
    over = [PLUGINS, "data=image_folder", f"data.root={folder}", "weighting=loss_power", "weighting.alpha=0.5"]
    return [*over, "data.batch_size=32", f"out_dir={out}", *QUIET, *extra]


def value_run(*extra):
    """The custom task (a digit's value as a number) on the digits' two domains with the gradient aggregator."""
    over = [PLUGINS, "data=digits_value", "data.mixing=loss", "data.train_size=1000", "data.batch_size=32"]
    return [*over, "weighting=unit_mean", "trainer.max_epochs=4", *QUIET, *extra]


def trivial_mae() -> float:
    """The mean absolute error of always answering the training digits' median, on the test digits."""
    from mtl_lightning.data import create_datamodule

    dm = create_datamodule(compose("digits_mdl", value_run()).data)
    dm.setup()
    train, test = (dm.splits[s].labels[:, 2].float() for s in ("train", "test"))
    return float((test - train.median()).abs().mean())


def test_the_examples_are_short_complete_files():
    for name, path in EXAMPLES.items():
        tree = ast.parse(path.read_text())
        code = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        lines = {ln for node in code for ln in range(node.lineno, node.end_lineno + 1)}
        assert ast.get_docstring(tree) and "plugins=[examples/" in ast.get_docstring(tree), name  # how to run it
        assert len(lines) <= 45, (name, len(lines))


def test_a_dataset_and_a_weighting_from_files_train_evaluate_and_resume(folder, tmp_path):
    first = run(compose("digits_mtl", folder_run(folder, tmp_path, "trainer.max_epochs=10", "run_name=a")))
    assert first["test/acc/digit"] > 0.4 and first["test/acc/parity"] > 0.65  # it learned (chance 0.1, 0.5)
    run_dir = Path(first["run_dir"])
    assert (run_dir / "config.yaml").read_text().count(str(EXAMPLES["folder_dataset"])) == 1  # recorded, absolute
    # a fresh process evaluates the final model from its checkpoint alone (the plugins come from its config): the
    # run's own numbers, exactly, and each task's predictions for the test split
    preds, out = tmp_path / "preds.csv", tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "experiments.evaluate", str(run_dir), "--predict", str(preds), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads(out.read_text())
    assert again == {k: v for k, v in first.items() if k != "run_dir"}
    assert "acc/digit" in proc.stdout and "Traceback" not in proc.stderr
    table = list(csv.DictReader(open(preds)))
    hits = [float(r["digit"]) == float(r["digit_target"]) for r in table]
    assert len(table) == 180 and sum(hits) / len(hits) == pytest.approx(first["test/acc/digit"])
    from mtl_lightning.checkpoint import load_model  # the library's loader imports them from the checkpoint too

    assert [t.name for t in load_model(run_dir / "checkpoints" / "last.ckpt").tasks] == ["digit", "parity"]
    # resumed without naming the plugins: config.yaml records them
    resumed = run(
        compose("digits_mtl", [*folder_run(folder, tmp_path)[1:], "resume=last", "run_name=a", "trainer.max_epochs=11"])
    )
    assert resumed["run_dir"] == first["run_dir"] and resumed["test/acc/digit"] > 0.4
    # another model than the checkpoint's: one paragraph, named
    with pytest.raises(MTLError, match="model.depth 3 there, 2 here"):
        from mtl_lightning.evaluate import find_checkpoint, load_for_evaluation

        load_for_evaluation(find_checkpoint(run_dir), ["model.depth=2"])


# A plugin mixture of class ids and a number per sample, in one float label tensor (issue 35: the labels were cast to
# int64, every fraction in [0, 1) became 0): the left digit as a fraction (d / 10 + 0.05), NaN (none) for every 4th.
MIXED = """
from dataclasses import dataclass
import torch
from mtl_lightning import DATASETS, LabelledTensors, Regression
from mtl_lightning.data.digits import DigitsConfig, DigitsDataModule

@dataclass
class MixedConfig(DigitsConfig):
    name: str = "digits_brightness"
    bad: str = "none"  # class_fraction | class_range | int_regression: label tensors setup refuses

@DATASETS.register("digits_brightness")
class DigitsBrightness(DigitsDataModule):
    Config = MixedConfig

    def describe(self):
        return [*super().describe(), Regression("brightness")]

    def load(self):
        out = {}
        for k, s in super().load().items():
            level = s.labels[:, 0].float() / 10 + 0.05  # the left digit as a fraction: 0.05 ... 0.95
            level[::4] = float("nan")
            labels = torch.cat([s.labels.float(), level[:, None]], 1)
            if self.cfg.bad == "class_fraction":
                labels[3, 0] = 2.5
            if self.cfg.bad == "class_range":
                labels[5, 1] = 10
            if self.cfg.bad == "int_regression":
                labels = labels.nan_to_num(-1).long()
            out[k] = LabelledTensors(s.images, labels, s.domains)
        return out
"""


def test_a_mixed_classification_and_regression_plugin_dataset_runs_resumes_evaluates_predicts(tmp_path):
    plugin = tmp_path / "mixed.py"
    plugin.write_text(MIXED)
    over = [f"plugins=[{plugin}]", "data=digits_brightness", "data.train_size=3000", "data.batch_size=32"]
    over += ["data.val_size=200", "data.test_size=200", f"out_dir={tmp_path / 'runs'}", "run_name=m", *QUIET]
    first = run(compose("digits_mtl", [*over, "trainer.max_epochs=3"]))
    from mtl_lightning.data import create_datamodule

    dm = create_datamodule(compose("digits_mtl", over).data)
    dm.setup()
    train, test = (dm.splits[s].labels[:, 2] for s in ("train", "test"))
    assert train.dtype == torch.float32 and 0 < float(train.nanmean()) < 1  # kept as the fractions they are
    trivial = float((test - train.nanmedian()).abs().nanmean())
    assert (
        first["test/brightness/mae"] < 0.9 * trivial and first["test/acc/left"] > 0.4
    )  # both learn (truncated: MAE ~0.5)
    # resumed to a fourth epoch, then evaluated and predicted by a fresh process
    resumed = run(compose("digits_mtl", [*over, "trainer.max_epochs=4", "resume=last"]))
    assert resumed["run_dir"] == first["run_dir"] and resumed["test/brightness/mae"] < 0.9 * trivial
    preds, out = tmp_path / "preds.csv", tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "experiments.evaluate", first["run_dir"], "--predict", str(preds), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text()) == {k: v for k, v in resumed.items() if k != "run_dir"}
    table = list(csv.DictReader(open(preds)))
    assert len(table) == 200 and all(r["left"].lstrip("-").isdigit() for r in table)  # class ids are integers
    targets = np.array([float(r["brightness_target"]) for r in table])
    assert np.allclose(targets, test.numpy(), equal_nan=True)  # the fractions, NaN where there is none
    mae = np.nanmean(np.abs(np.array([float(r["brightness"]) for r in table]) - targets))
    assert mae == pytest.approx(resumed["test/brightness/mae"], rel=1e-4)
    with pytest.raises(MTLError, match=r"--predict .*preds.txt: give a file ending in .npz"):
        from mtl_lightning.evaluate import find_checkpoint, load_for_evaluation, write_predictions

        write_predictions(load_for_evaluation(find_checkpoint(first["run_dir"]), [])[1], "test", tmp_path / "preds.txt")
    # refused before any folder: a class id with a fraction, a regression target stored as an integer
    bad = [o.replace("run_name=m", "run_name=bad") for o in over]
    with pytest.raises(MTLError, match=r"train split: task 'left' is Classification.*row 3 holds 2.5"):
        run(compose("digits_mtl", [*bad, "data.bad=class_fraction"]))
    with pytest.raises(MTLError, match=r"train split: task 'brightness' is Regression.*labels are int64"):
        run(compose("digits_mtl", [*bad, "data.bad=int_regression"]))
    with pytest.raises(
        MTLError, match=r"task 'right' has 10 classes \(ids 0 to 9, -1 = none\), but row 5 holds class 10"
    ):
        run(compose("digits_mtl", [*bad, "data.bad=class_range"]))  # was an IndexError traceback at the first step
    assert not (tmp_path / "runs" / "digits_mtl" / "bad").exists()


def test_a_task_and_a_gradient_aggregator_from_files_train(tmp_path):
    m = run(compose("digits_mdl", value_run(f"out_dir={tmp_path}")))
    assert m["test/value/mae"] < trivial_mae() - 0.2  # the number is read from the image, not guessed
    assert m["test/acc/clean"] > 0.2 and m["test/acc/shifted"] > 0.2  # the classification heads too (chance 0.1)


def test_a_population_of_a_plugin_dataset(folder, tmp_path):
    over = folder_run(folder, tmp_path, "trainer.max_epochs=2", "population.weights=[[0.5,0.5],[0.9,0.1]]")
    m = run(compose("digits_mtl", [o for o in over if not o.startswith("weighting")]))
    assert 0 <= m["val/acc/digit/m1"] <= 1 and (Path(m["run_dir"]) / "members" / "m1" / "metrics.json").exists()


def probe_plugin(folder: Path) -> tuple[Path, str]:
    """A plugin file of its own (an architecture: HPS under a fresh name), to be taken off the disk mid-search."""
    name = f"probe_{uuid.uuid4().hex[:8]}"
    path = folder / f"{name}.py"
    path.write_text(
        "from mtl_lightning import ARCHITECTURES\nfrom mtl_lightning.architectures.hps import HPS\n\n\n"
        f"@ARCHITECTURES.register({name!r})\nclass Probe(HPS):\n    pass\n"
    )
    return path, name


@RAY
def test_ray_workers_import_the_plugins_even_where_the_file_is_not_on_disk(no_ray, folder, tmp_path, monkeypatch):
    import ray

    from mtl_lightning.search import compose_search, run_search

    probe, name = probe_plugin(tmp_path)
    init = ray.init

    def init_then_remove(*args, **kwargs):  # Ray has taken the file (runtime_env); the workers' disk has it no more
        out = init(*args, **kwargs)
        probe.unlink()
        return out

    monkeypatch.setattr(ray, "init", init_then_remove)
    over = folder_run(folder, tmp_path, "trainer.max_epochs=1", f"model.architecture={name}")
    over = [o for o in over if not o.startswith("weighting")]  # the grid trains fixed weights
    over[0] = over[0][:-1] + f",{probe}]"
    scfg, rest = compose_search("digits_mtl", ["search=grid", "search.grid=[0.5]", "search.baselines=false", *over])
    out = run_search("digits_mtl", rest, scfg)
    assert not probe.exists() and out["failed_trials"] == []
    (row,) = list(csv.DictReader(open(Path(out["search_dir"]) / "grid.csv")))
    # the trial trained on the plugin dataset (its tasks) with the plugin architecture; that they learn is
    # test_a_dataset_and_a_weighting_from_files_train_evaluate_and_resume's, outside Ray
    assert int(row["steps"]) > 0 and 0 <= float(row["acc/digit"]) <= 1 and 0 <= float(row["acc/parity"]) <= 1


@RAY
def test_study_cells_train_the_plugin_methods_in_ray_workers(no_ray, tmp_path):
    from mtl_lightning.search.study import load_study, run_study

    study = tmp_path / "plugins.yaml"
    study.write_text(  # one epoch: that the plugins learn is test_a_task_and_a_gradient_aggregator_from_files_train's
        f"exp: digits_mdl\noverrides: {json.dumps(value_run('trainer.max_epochs=1'))}\n"
        "axes: {weighting: [loss_power, unit_mean], seed: [0]}\nbaselines: false\ncompare: null\nnum_cpus: 2\n"
    )
    out = run_study(*load_study(str(study), [f"study.out_dir={tmp_path / 'st'}"]))
    cells = {p.stem: json.loads(p.read_text())["metrics"] for p in (out / "cells").glob("*.json")}
    assert sorted(cells) == ["loss_power__seed0", "unit_mean__seed0"]
    for m in cells.values():  # trained with the plugin task and methods: their metrics, finite
        assert math.isfinite(m["test/value/mae"]) and 0 <= m["test/acc_mean"] <= 1


def test_list_marks_plugin_entries(capsys):
    assert run_main(["--list", PLUGINS]) == 0
    listed = capsys.readouterr().out
    for name, where in [("loss_power", "loss_weighting"), ("unit_mean", "gradient_aggregator")]:
        line = next(x for x in listed.splitlines() if x.split()[:1] == [name])
        assert f"plugin {EXAMPLES[where]}" in line
    assert next(x for x in listed.splitlines() if x.split()[:1] == ["pcgrad"]).strip() == "pcgrad"  # built in


def test_an_entry_point_plugin_is_loaded_without_being_named(tmp_path, monkeypatch):
    import importlib.metadata as md

    import mtl_lightning.plugins as P

    name = f"lab_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from mtl_lightning import WEIGHTINGS\nfrom mtl_lightning.weighting.uniform import Uniform\n\n\n"
        f"@WEIGHTINGS.register({name!r})\nclass Lab(Uniform):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = md.EntryPoint(name="my-lab", value=name, group=P.GROUP)
    monkeypatch.setattr(P, "entry_points", lambda group: [ep] if group == P.GROUP else [])
    monkeypatch.setattr(P, "_entry_points_loaded", False)
    assert compose("digits_mtl", [f"weighting={name}"]).weighting.name == name
    from mtl_lightning.registry import where
    from mtl_lightning.weighting import WEIGHTINGS

    assert where(WEIGHTINGS.get(name)) == "entry point my-lab (installed)"


def test_bad_plugins_are_one_clear_paragraph(tmp_path):
    broken = tmp_path / f"broken_{uuid.uuid4().hex[:8]}.py"
    broken.write_text("import numpy\nraise ValueError('the lab server is down')\n")
    with pytest.raises(MTLError, match=rf"failed to import: ValueError: the lab server is down \({broken}, line 2\)"):
        compose("digits_mtl", [f"plugins=[{broken}]"])
    typo = tmp_path / f"typo_{uuid.uuid4().hex[:8]}.py"
    typo.write_text("x = 1\ndef f(:\n    pass\n")  # issue 35: a SyntaxError without file and line
    with pytest.raises(MTLError, match=rf"failed to import: SyntaxError: .* \({typo}, line 2: def f\(:\)"):
        compose("digits_mtl", [f"plugins=[{typo}]"])
    twice = tmp_path / f"twice_{uuid.uuid4().hex[:8]}.py"
    twice.write_text(
        "from mtl_lightning import WEIGHTINGS\nfrom mtl_lightning.weighting.uniform import Uniform\n\n\n"
        "@WEIGHTINGS.register('uniform')\nclass Mine(Uniform):\n    pass\n"
    )
    with pytest.raises(MTLError, match=rf"'uniform' is registered twice: by mtl_lightning .* and by plugin {twice}"):
        compose("digits_mtl", [f"plugins=[{twice}]"])
    with pytest.raises(MTLError, match=r"nowhere.py does not exist"):
        compose("digits_mtl", [f"plugins=[{tmp_path / 'nowhere.py'}]"])
    with pytest.raises(MTLError, match=r"The plugin no_such_lab_module failed to import: ModuleNotFoundError"):
        compose("digits_mtl", ["plugins=[no_such_lab_module]"])
    (tmp_path / "json.py").write_text("x = 1\n")  # named like a module already imported
    with pytest.raises(MTLError, match=r"named like the module 'json'.*Rename the file"):
        compose("digits_mtl", [f"plugins=[{tmp_path / 'json.py'}]"])


def weighting_plugin(tmp_path, body: str) -> tuple[Path, str]:
    name = f"w_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(
        "import torch\nfrom mtl_lightning import WEIGHTINGS, Weighting\n\n\n"
        f"@WEIGHTINGS.register({name!r})\nclass Lab(Weighting):\n    def weights(self, losses):\n        {body}\n"
    )
    return path, name


@pytest.mark.parametrize(
    "body, message",
    [  # issue 35: a NaN weight was blamed on the tasks' losses ("lower the lr"); a wrong shape was a traceback
        ("return losses * float('nan')", r"weights\(\) returned non-finite weights \[nan, nan\] for the finite task"),
        ("return torch.ones(3)", r"weights\(\) returned shape \(3,\) for 2 tasks \['left', 'right'\]; it must"),
    ],
)
def test_a_plugin_weighting_that_returns_bad_weights_is_named(body, message, tmp_path, capsys):
    path, name = weighting_plugin(tmp_path, body)
    argv = ["exp=digits_mtl", f"plugins={path}", f"weighting={name}", f"out_dir={tmp_path / 'runs'}", *QUIET]
    assert run_main([*argv, "trainer.max_steps=2", "data.train_size=64"]) == 2  # one path: no brackets needed
    err = capsys.readouterr().err
    assert re.search(rf"weighting={name} \(Lab, plugin {path}\): " + message, err), err
    assert "Traceback" not in err and "lower" not in err and not (tmp_path / "runs").exists()


def test_a_resumed_run_whose_plugin_is_gone_says_which_and_where(tmp_path):
    probe, name = probe_plugin(tmp_path)
    over = ["data.train_size=64", "data.val_size=32", "data.test_size=32", "trainer.max_steps=2", *QUIET]
    over.append(f"out_dir={tmp_path / 'runs'}")
    run(compose("digits_mtl", [f"plugins=[{probe}]", f"model.architecture={name}", "run_name=p", *over]))
    shutil.move(probe, tmp_path / "elsewhere.py")
    cmd = [sys.executable, "-m", "experiments.run", "exp=digits_mtl", "resume=last", "run_name=p", *over]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"was trained with the plugin {probe} (its config.yaml records it), which cannot be imported" in proc.stderr


def test_no_import_circle_in_the_package():
    """Every module's imports (at the top and inside functions) form no cycle: a module never needs, even lazily,
    one that needs it back."""
    modules = {}
    for path in sorted((ROOT / "mtl_lightning").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                subs = [f"{target}.{a.name}" for a in node.names]
                deps |= {s for s in subs if s in modules}
                if target in modules and not all(s in modules for s in subs):
                    deps.add(target)  # `from .x import name`: x itself; `from . import sub`: only the submodule
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
        graph[name] = deps - {name}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == "open":
                pytest.fail("import circle: " + " -> ".join([*stack[stack.index(d) :], d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)
