"""The reports shipped in reproduction/ rebuild, byte for byte, from what is shipped beside them (meta.json and the
cells' records), with the documented command."""

import json
import shlex
import shutil
from pathlib import Path

import pytest

from experiments.study import main

SHIPPED = Path(__file__).resolve().parents[1] / "reproduction"


@pytest.mark.parametrize("name", sorted(p.name for p in SHIPPED.iterdir() if (p / "report.md").exists()))
def test_every_shipped_report_rebuilds_from_what_is_shipped(name, tmp_path):
    copy = tmp_path / name
    shutil.copytree(SHIPPED / name, copy, ignore=shutil.ignore_patterns("tune", "searches"))
    for made in ("report.md", "results.csv"):
        (copy / made).unlink()
    assert main(["--report", str(copy)]) == 0
    for made in ("report.md", "results.csv"):
        assert (copy / made).read_text() == (SHIPPED / name / made).read_text(), made
    assert "Command: `python -m experiments.study " in (copy / "report.md").read_text()


@pytest.mark.parametrize("name", sorted(p.name for p in SHIPPED.iterdir() if (p / "meta.json").exists()))
def test_every_shipped_study_resumes_with_the_command_that_made_it(name, monkeypatch):
    """`resume=true` with the report's command is accepted (and so can train a row added to the study's axes):
    keys added to the config since the folder was made, at their defaults, are no difference."""
    from mtl_lightning.search.study import check_reuse, load_study, plan_record, plan_study, typed_defaults

    meta = json.loads((SHIPPED / name / "meta.json").read_text())
    study, *overrides = shlex.split(meta["command"])[3:]
    if any(o.startswith("model.init=") for o in meta["study"]["overrides"]):
        pytest.skip("its cells start from a trunk run the study's description says to train first")
    monkeypatch.chdir(SHIPPED.parent)  # the command's paths (study.out_dir=reproduction/...) are the repo's
    cfg, overrides = load_study(study, [*overrides, "resume=true"])
    plan = plan_study(cfg, overrides)
    check_reuse(SHIPPED / name, plan_record(cfg, plan), True, typed_defaults(plan.train_cfg))
