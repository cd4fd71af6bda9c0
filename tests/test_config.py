import subprocess
import sys

import pytest

from experiments.run import main
from mtl_lightning.config import compose, list_experiments
from mtl_lightning.errors import MTLError


def test_experiments_listed():
    assert {"digits_mtl", "digits_mdl", "synthetic_mtl", "synthetic_mdl"} <= set(list_experiments())


def test_delta_over_typed_base():
    cfg = compose("digits_mdl", ["model.depth=2", "weighting=fixed", "weighting.weights=[3,1]"])
    assert cfg.data.mode == "mdl" and cfg.data.mixing == "sample"  # from the experiment file
    assert cfg.model.depth == 2 and cfg.weighting.weights == [3.0, 1.0]  # from the command line
    assert cfg.optim.lr == 2e-3 and cfg.optim.weight_decay == 0.05  # the delta, and the base beneath it
    assert cfg.exp == "digits_mdl"


def test_another_weighting_on_the_command_line_drops_the_experiments_weighting_options():
    # digits_forkmerge sets target and interval_epochs, ForkMerge's options: weighting=uniform is plain joint training
    assert compose("digits_forkmerge", ["weighting=uniform"]).weighting == {"name": "uniform"}
    cfg = compose("digits_forkmerge", ["weighting.aux_weight=2"])  # the same method keeps them, the cli on top
    assert cfg.weighting.target == ["left"] and cfg.weighting.interval_epochs == 1 and cfg.weighting.aux_weight == 2
    with pytest.raises(MTLError, match="'weighting.target'"):  # a key of another method is still an error
        compose("digits_mtl", ["weighting=uniform", "weighting.target=[left]"])


@pytest.mark.parametrize(
    "exp, overrides, expected",
    [
        ("nope", [], ["exp='nope'", "digits_mtl"]),
        ("digits_mtl", ["model.dept=3"], ["'model.dept'", "depth", "width"]),
        ("digits_mtl", ["trainer.max_epochs=abc"], ["'trainer.max_epochs'", "abc"]),
        ("digits_mtl", ["weighting=magic"], ["weighting='magic'", "fixed", "uniform", "uncertainty"]),
        ("digits_mtl", ["data=imagenet"], ["data='imagenet'", "digits", "synthetic"]),
        (
            "digits_mtl",
            ["data.num_tasks=3"],
            ["'data.num_tasks'", "mode"],
        ),  # a synthetic key, not a digits one
        ("digits_mtl", ["seed"], ["key=value"]),
    ],
)
def test_bad_config_names_key_and_choices(exp, overrides, expected):
    with pytest.raises(MTLError) as e:
        compose(exp, overrides)
    for s in expected:
        assert s in str(e.value)


def test_cli_error_is_one_paragraph_without_traceback(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "experiments.run", "exp=digits_mtl", "model.dept=3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "'model.dept'" in p.stderr


def test_cli_list(capsys):
    assert main(["--list"]) == 0
    assert "digits_mtl" in capsys.readouterr().out
    assert main(["exp=digits_mtl", "exp=digits_mdl"]) == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=0", "data.batch_size=0 must be at least 1"),
        ("trainer.max_epochs=-3", "trainer.max_epochs=-3 must be a positive number, or -1"),
        ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
    ],
)
def test_bad_numbers_are_clear_errors(override, message, tmp_path, capsys):
    assert main(["exp=digits_mtl", f"out_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
