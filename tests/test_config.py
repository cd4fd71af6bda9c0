import re
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


@pytest.mark.parametrize(
    "argv, message",
    [
        # a self-supervised task alone serves nothing
        (["exp=digits_ssl", "data.tasks=[rotation]"], r"only self-supervised task\(s\).*data.tasks=\[clean,rotation\]"),
        # a flat list where one weight vector per member belongs: the key and the expected shape
        (["exp=digits_mtl", "population.weights=[0.5,0.5]"], r"population.weights=\[0.5, 0.5\].*one weight vector per"),
        # several devices for batches drawn on one: refused before start-up, with what to do instead
        (
            ["exp=digits_ssl", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"],
            r"semi-supervised batches .* trainer.devices=2 asks for 2\. Train it on one device \(trainer.devices=1\)",
        ),
        (["exp=digits_mtl", "population.pbt=true"], r"population.pbt=true runs PBT .* gives none"),
    ],
)
def test_newcomer_mistakes_are_one_clear_paragraph(argv, message, tmp_path, capsys):
    assert main([*argv, f"out_dir={tmp_path}", "trainer.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1  # once, in one paragraph
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_non_vit_backbone_drops_the_experiments_vit_shape():
    # digits_ssl shapes a ViT (depth, width, heads, patch); model.backbone=wrn28_2 asks for another model
    cfg = compose("digits_ssl", ["model.backbone=wrn28_2"])
    assert [cfg.model[k] for k in ("depth", "width", "num_heads", "patch_size")] == [None] * 4
    assert compose("digits_ssl", ["model.backbone=vit_tiny_patch16_224"]).model.depth == 3  # a ViT keeps them
    with pytest.raises(MTLError, match="model.depth shape ViT backbones only"):  # what the user set is theirs
        from mtl_lightning.network import create_backbone

        create_backbone(compose("digits_ssl", ["model.backbone=wrn28_2", "model.depth=2"]).model, 1, 16)


def test_pbt_without_a_perturbation_says_so(capsys):
    from mtl_lightning.search import compose_search

    compose_search("synthetic_mtl", ["search=pbt", "trainer.max_epochs=1"])
    assert "warning: PBT perturbs every search.perturbation_interval=1 epoch(s)" in capsys.readouterr().err
    compose_search("synthetic_mtl", ["search=pbt", "trainer.max_epochs=2"])
    assert "warning" not in capsys.readouterr().err


def test_the_console_shows_a_summary_and_epochs_not_the_config(tmp_path, capsys):
    argv = ["exp=digits_mtl", f"out_dir={tmp_path}", "data.train_size=64", "data.val_size=32", "data.test_size=32"]
    assert main([*argv, "trainer.max_epochs=2"]) == 0
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    assert (
        lines[0].startswith("exp=digits_mtl: tasks left, right; vit_small_patch16_224 (") and "outputs in" in lines[0]
    )
    assert [x.split(",")[0] for x in lines[1:3]] == ["epoch 1/2", "epoch 2/2"] and "val/acc_mean" in lines[2]
    assert "data:" not in printed.out and "GPU available" not in printed.out + printed.err
    assert "litlogger" not in printed.out + printed.err and "LeafSpec" not in printed.err
    assert len(lines) < 20  # summary, epochs, the metrics table
    config = next(tmp_path.glob("digits_mtl/*/config.yaml")).read_text()  # the full config is in the run folder
    assert "data:" in config and "batch_size" in config
    assert main([*argv, "trainer.max_epochs=1", "--print-config"]) == 0
    assert "batch_size:" in capsys.readouterr().out  # and behind a flag


def test_messages_name_the_real_cause(tmp_path, capsys):
    """Issue 35: a YAML parser error without its line for a study's unquoted `plugins=[...]`; `--predictt` called
    "not key=value"."""
    from experiments.evaluate import main as evaluate_main
    from mtl_lightning.search.study import load_study

    study = tmp_path / "mine.yaml"
    study.write_text("exp: digits_mtl\noverrides: [plugins=[a.py], trainer.max_epochs=1]\naxes: {seed: [0]}\n")
    with pytest.raises(MTLError, match=r"mine.yaml, line 2: .* must be quoted in a YAML list: overrides: \['plugins="):
        load_study(str(study), [])
    assert evaluate_main([str(tmp_path), "--predictt", "x.csv"]) == 2
    assert "unknown option --predictt. Options: --predict FILE" in capsys.readouterr().err


def test_the_metric_table_keeps_large_values_apart(capsys):
    from experiments.run import print_table

    print_table({"val/mu/mae": 12345.678901, "test/mu/mae": 123456.7, "val/acc/x": 0.5, "test/acc/x": 0.25})
    rows = {r.split()[0]: r.split() for r in capsys.readouterr().out.splitlines() if r.strip()}
    assert rows["mu/mae"] == ["mu/mae", "12345.6789", "123456.7000"]  # issue 35: QM9's meV MAEs ran together
    assert rows["acc/x"] == ["acc/x", "0.5000", "0.2500"]
